"""The production work pool: Cloud Run v2 (push), with credentials on the pool, never on deployments.

    # write the template committed as deployments/cloud-run-base-job-template.json
    python -m deployments.cloud_run template

    # create/update the pool and the Prefect variables prefect.yaml references (idempotent)
    python -m deployments.cloud_run pool --region europe-west3 \\
        --service-account opsloop-runner@PROJECT.iam.gserviceaccount.com \\
        --image-repository europe-west3-docker.pkg.dev/PROJECT/opsloop/opsloop \\
        --credentials-block gcp-credentials/opsloop-deployer

Why the pool and not the deployment: ``prefect deploy`` resolves ``{{ prefect.blocks.… }}`` inside a
deployment's ``job_variables`` and stores the resolved value — a whole service-account key — in
plaintext on the deployment. A ``$ref`` to the block on the pool's base job template is stored
as a reference and resolved by Prefect only when it submits the job. With no credentials block,
Prefect Cloud's push pool uses nothing and the flow code authenticates as the Cloud Run job's
runtime service account (``service_account_name``) through Application Default Credentials.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

TEMPLATE_FILE = Path(__file__).with_name("cloud-run-base-job-template.json")
POOL = "opsloop-cloud-run"
PUSH_TYPE = "cloud-run-v2:push"  # Prefect Cloud; a self-hosted server runs the same template as cloud-run-v2
VARIABLES = ("opsloop_gcp_region", "opsloop_runtime_service_account", "opsloop_image_repository")

# non-secret defaults every opsloop job gets; sizes are overridden per deployment in prefect.yaml
DEFAULTS: dict[str, Any] = {
    "region": "europe-west3",
    "cpu": "1000m",
    "memory": "2Gi",
    "timeout": 3600,
    "max_retries": 0,
    "env": {"DO_NOT_TRACK": "1", "OPSLOOP_ENV": "prod"},
    "labels": {"app": "opsloop"},
}


def prefect_gcp_template() -> dict[str, Any]:
    """prefect-gcp's own cloud-run-v2 base job template (the schema job variables must satisfy)."""
    from prefect_gcp.workers.cloud_run_v2 import CloudRunWorkerV2

    return copy.deepcopy(CloudRunWorkerV2.get_default_base_job_template())


def base_job_template(credentials_block_id: str | None = None, region: str | None = None) -> dict[str, Any]:
    """prefect-gcp's template with opsloop's defaults; ``credentials`` as a block ``$ref`` if given."""
    tmpl = prefect_gcp_template()
    props = tmpl["variables"]["properties"]
    for key, value in DEFAULTS.items():
        props[key]["default"] = copy.deepcopy(value)
    if region:
        props["region"]["default"] = region
    if credentials_block_id:
        props["credentials"]["default"] = {"$ref": {"block_document_id": str(credentials_block_id)}}
    return tmpl


def write_template(path: Path = TEMPLATE_FILE) -> Path:
    path.write_text(json.dumps(base_job_template(), indent=2, sort_keys=True) + "\n")
    return path


def _block_id(ref: str) -> str:
    from prefect.blocks.core import Block

    try:
        block = Block.load(ref)
    except ValueError as exc:
        raise SystemExit(f"credentials block {ref!r} not found: create it first (docs/operations.md)") from exc
    if block._block_document_id is None:
        raise SystemExit(f"credentials block {ref!r} has no document id")
    return str(block._block_document_id)


def ensure_pool(
    name: str = POOL, pool_type: str = PUSH_TYPE, credentials_block: str | None = None, region: str | None = None
) -> str:
    """Create the pool, or update its base job template if it exists. Returns 'created' or 'updated'."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    tmpl = base_job_template(_block_id(credentials_block) if credentials_block else None, region)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=tmpl))
            return "created"
        except ObjectAlreadyExists:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=tmpl))
            return "updated"


def set_variables(values: dict[str, str]) -> None:
    """Set the (non-secret) Prefect variables prefect.yaml's production deployments reference."""
    from prefect.variables import Variable

    for name, value in values.items():
        if name not in VARIABLES:
            raise SystemExit(f"unknown variable {name!r}; expected one of {VARIABLES}")
        Variable.set(name, value, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("template", help=f"write {TEMPLATE_FILE.name}")
    t.add_argument("--out", type=Path, default=TEMPLATE_FILE)
    p = sub.add_parser("pool", help="create/update the Cloud Run pool and the Prefect variables")
    p.add_argument("--name", default=POOL)
    p.add_argument("--type", default=PUSH_TYPE, help="cloud-run-v2:push (Prefect Cloud) or cloud-run-v2 (worker)")
    p.add_argument("--region", required=True)
    p.add_argument("--service-account", required=True, help="runtime service account e-mail of the jobs")
    p.add_argument("--image-repository", required=True, help="Artifact Registry repository/image name")
    p.add_argument("--credentials-block", help="GcpCredentials block Prefect uses to submit jobs (push pools)")
    args = ap.parse_args(argv)
    if args.cmd == "template":
        print(f"wrote {write_template(args.out)}")
        return 0
    what = ensure_pool(args.name, args.type, args.credentials_block, args.region)
    set_variables(
        {
            "opsloop_gcp_region": args.region,
            "opsloop_runtime_service_account": args.service_account,
            "opsloop_image_repository": args.image_repository,
        }
    )
    print(f"work pool {args.name} ({args.type}) {what}; variables {', '.join(VARIABLES)} set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
