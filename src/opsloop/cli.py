"""``opsloop`` command line: local stack, spec validation (and, as they land, reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opsloop.errors import OpsloopError


def _stack(args: argparse.Namespace) -> int:
    from opsloop.devstack.stack import LocalStack

    stack = LocalStack.from_env(Path.cwd())
    if args.action == "up":
        names = tuple(args.services.split(",")) if args.services else ("prefect", "mlflow", "sandbox", "worker")
        started = stack.up(names)
        print(f"started: {', '.join(started) or 'nothing (already running)'}")
        for what, where in stack.urls().items():
            print(f"  {what:<18} {where}")
        print(f"  shell env:         source {stack.home / 'env'}")
    elif args.action == "down":
        stack.down()
        print("local stack stopped")
    else:
        for name, ok in stack.status().items():
            print(f"  {name:<10} {'up' if ok else 'down'}")
    return 0


def _spec(args: argparse.Namespace) -> int:
    from opsloop.spec import load_spec

    for path in args.paths:
        spec = load_spec(path)
        print(f"{path}: ok ({spec.name}: {len(spec.sources)} sources, {len(spec.destinations)} destinations)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="opsloop", description="opsloop: an operations-AI loop on Prefect")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stack", help="start/stop the embedded local stack")
    st.add_argument("action", choices=["up", "down", "status"])
    st.add_argument("--services", help="comma-separated subset: prefect,mlflow,sandbox,worker")
    st.set_defaults(func=_stack)
    sp = sub.add_parser("spec", help="validate pipeline specs")
    sp.add_argument("paths", nargs="+")
    sp.set_defaults(func=_spec)
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except OpsloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
