"""``opsloop`` command line: local stack, spec validation (and, as they land, reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from opsloop.errors import OpsloopError

if TYPE_CHECKING:
    from opsloop.devstack.stack import LocalStack


def _stack(args: argparse.Namespace) -> int:
    from opsloop.devstack.stack import LocalStack

    stack = LocalStack.from_env(Path.cwd())
    if args.action == "up":
        names = tuple(args.services.split(",")) if args.services else ("prefect", "mlflow", "sandbox", "worker")
        started = stack.up(names)
        print(f"local stack under {stack.home} — started: {', '.join(started) or 'nothing (already running)'}")
        _print_urls(stack)
    elif args.action == "down":
        stopped = stack.down()
        print(f"local stack stopped ({', '.join(stopped) or 'nothing was running'}); data kept in {stack.home}")
    else:
        status = stack.status()
        for name, ok in status.items():
            print(f"  {name:<10} {'up' if ok else 'down'}")
        if any(status.values()):
            _print_urls(stack)
    return 0


def _print_urls(stack: LocalStack) -> None:
    for what, where in stack.urls().items():
        print(f"  {what:<18} {where}")
    print(f"  {'shell env':<18} source {stack.home / 'env'}   (then: prefect deployment run 'nightly/nightly')")


def _spec(args: argparse.Namespace) -> int:
    from opsloop.spec import load_spec

    for path in args.paths:
        spec = load_spec(path)
        print(f"{path}: ok ({spec.name}: {len(spec.sources)} sources, {len(spec.destinations)} destinations)")
    return 0


def _costs(args: argparse.Namespace) -> int:
    from opsloop.reports.terminal import costs_command

    return costs_command(args)


def _costs_args(co: argparse.ArgumentParser) -> None:
    from datetime import date

    co.add_argument("--month", help="YYYY-MM (default: the previous month)")
    co.add_argument("--start", type=date.fromisoformat, help="first day YYYY-MM-DD (instead of --month)")
    co.add_argument("--end", type=date.fromisoformat, help="last day YYYY-MM-DD, inclusive")
    co.add_argument("--warehouse-path", help="DuckDB file (default: $OPSLOOP_HOME/warehouse.duckdb)")
    co.add_argument("--bigquery-project", help="read the ledger from BigQuery (application-default credentials)")
    co.add_argument("--location", default="EU", help="BigQuery location (default EU)")
    co.add_argument("--meta-dataset", default="opsloop_meta", help="dataset/schema of the run_costs ledger")
    co.add_argument("--pipeline", help="only this pipeline")
    co.add_argument("--spec", help="pipeline spec whose costs.budgetPerRunUsd marks runs over budget")
    co.add_argument("--ui-url", help="Prefect UI base URL for run links (default: PREFECT_UI_URL)")
    co.add_argument("--all-runs", action="store_true", help="list every run, not only the top 10")
    co.add_argument("--output-dir", help="also write the CSV and HTML report into this directory")
    co.set_defaults(func=_costs)


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
    co = sub.add_parser("costs", help="cost ledger for a month or date range (same numbers as the cost report)")
    _costs_args(co)
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except OpsloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
