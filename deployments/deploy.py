"""Deploy the flows in ``prefect.yaml`` to one target.

    python -m deployments.deploy local                 # every local deployment → pool opsloop-local
    python -m deployments.deploy prod                  # build + push the image, deploy every *-prod
    python -m deployments.deploy prod --image REF      # deploy *-prod with an image built elsewhere
                                                       # (CI, or offline checks): no build/push steps
    python -m deployments.deploy local --names nightly,ingest

Targets come from the deployment names: ``*-prod`` is production, the rest is local. The command
run is ``prefect --no-prompt deploy [--prefect-file F] -n <name> …`` from the repository root.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "prefect.yaml"
PROD_SUFFIX = "-prod"


def load_config(path: Path = PREFECT_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise SystemExit(f"{path}: no deployments list")
    return data


def target_of(name: str) -> str:
    return "prod" if name.endswith(PROD_SUFFIX) else "local"


def deployment_names(config: dict[str, Any], target: str) -> list[str]:
    return [str(d["name"]) for d in config["deployments"] if target_of(str(d["name"])) == target]


def with_prebuilt_image(config: dict[str, Any], image: str) -> dict[str, Any]:
    """A copy where production deployments skip build/push and run ``image``."""
    out = copy.deepcopy(config)
    for d in out["deployments"]:
        if target_of(str(d["name"])) != "prod":
            continue
        d["build"] = None
        d["push"] = None
        d.setdefault("work_pool", {}).setdefault("job_variables", {})["image"] = image
    return out


def git_tag() -> str:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "latest"
    return res.stdout.strip() or "latest"


def deploy_command(names: list[str], prefect_file: Path | None = None) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy"]
    if prefect_file is not None:
        cmd += ["--prefect-file", str(prefect_file)]
    for n in names:
        cmd += ["-n", n]
    return cmd


def deploy(
    target: str, names: list[str] | None = None, image: str | None = None, env: dict[str, str] | None = None
) -> int:
    """Run ``prefect deploy`` for ``target``; returns its exit code."""
    config = load_config()
    wanted = names or deployment_names(config, target)
    unknown = sorted(set(wanted) - set(deployment_names(config, target)))
    if unknown:
        raise SystemExit(f"not {target} deployments in prefect.yaml: {unknown}")
    run_env = {**os.environ, **(env or {})}
    run_env.setdefault("OPSLOOP_IMAGE_TAG", git_tag())
    run_env.setdefault("OPSLOOP_REPO", str(REPO))
    with tempfile.TemporaryDirectory(prefix="opsloop-deploy-") as tmp:
        prefect_file = None
        if image is not None:
            prefect_file = Path(tmp) / "prefect.yaml"
            prefect_file.write_text(yaml.safe_dump(with_prebuilt_image(config, image), sort_keys=False))
        cmd = deploy_command(wanted, prefect_file)
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, cwd=REPO, env=run_env).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["local", "prod"])
    ap.add_argument("--names", help="comma-separated subset of the target's deployment names")
    ap.add_argument("--image", help="prod only: deploy this already-pushed image; skips build and push")
    args = ap.parse_args(argv)
    if args.image and args.target != "prod":
        ap.error("--image only applies to the prod target")
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    return deploy(args.target, names, args.image)


if __name__ == "__main__":
    sys.exit(main())
