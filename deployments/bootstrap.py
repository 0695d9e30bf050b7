"""Register opsloop's block types and create the local block documents (idempotent).

    python -m deployments.bootstrap            # local documents for the embedded stack
    python -m deployments.bootstrap --types-only   # only register block types (production)
    python -m deployments.bootstrap --check --warehouse opsloop-bigquery/prod --mlflow opsloop-mlflow/prod
                                               # which block documents a workspace still lacks

Existing documents are updated in place, except the PII salt: a salt is generated once and never
replaced, because replacing it would change every keyed hash already in the warehouse.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
from typing import Any

from prefect.blocks.core import Block
from prefect.blocks.system import Secret

import blocks
from opsloop.devstack.stack import WORK_POOL, LocalStack

BLOCK_TYPES: list[type[Block]] = [getattr(blocks, name) for name in blocks.__all__ if name[0].isupper()]
PII_SALT = "opsloop-pii-salt"
DEFAULT_SPEC = "pipelines/customer_ops_ai.yaml"


def register_types() -> list[str]:
    from prefect_gcp import GcpCredentials

    for cls in [*BLOCK_TYPES, Secret, GcpCredentials]:
        cls.register_type_and_schema()
    return [cls.get_block_type_slug() for cls in BLOCK_TYPES]


def required_blocks(spec_path: str, warehouse: str, mlflow: str) -> dict[str, str]:
    """Every block document a run of ``spec_path`` needs: ``slug/name`` → what uses it."""
    from opsloop.spec import load_spec

    spec = load_spec(spec_path)
    uses: list[tuple[str, str]] = [(warehouse, "warehouse parameter"), (mlflow, "mlflow parameter")]
    uses += [(str(s.connection), f"sources[{s.id}].connection") for s in spec.sources if s.connection]
    uses += [
        (str(d.connection), f"destinations[{i}].connection ({d.crm} {d.object})")
        for i, d in enumerate(spec.destinations)
        if d.connection
    ]
    if spec.transform.pii.salt_secret_ref:
        uses.append((str(spec.transform.pii.salt_secret_ref), "transform.pii.saltSecretRef (never rotate)"))
    need: dict[str, str] = {}
    for ref, why in uses:
        need[ref] = f"{need[ref]}; {why}" if ref in need else why
    return need


def check_blocks(need: dict[str, str]) -> dict[str, bool]:
    """Which of ``need`` exist in the current workspace (a BigQuery block's credentials included)."""
    found: dict[str, bool] = {}
    for ref in need:
        found[ref] = _exists(ref)
    return found


def _exists(ref: str) -> bool:
    try:
        Block.load(ref)
    except ValueError:
        return False
    return True


def local_documents(stack: LocalStack) -> dict[str, Block]:
    """The block documents of the embedded default stack, by ``slug/name``."""
    from blocks.mlflow import MLflowConnector
    from blocks.postgres import PostgresConnector
    from blocks.warehouse import DuckDBConnector

    docs: dict[str, Block] = {
        "opsloop-duckdb/local": DuckDBConnector(path=str(stack.warehouse_path)),
        "opsloop-postgres/source": PostgresConnector(dsn=stack.pg.dsn("source")),
        "opsloop-mlflow/local": MLflowConnector(tracking_uri=stack.mlflow_url),
    }
    extra = getattr(blocks, "local_crm_documents", None)
    if extra is not None:
        docs.update(extra(stack.sandbox_url))
    return docs


def ensure_work_pool(name: str = WORK_POOL) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def bootstrap(stack: LocalStack, types_only: bool = False) -> dict[str, Any]:
    slugs = register_types()
    created: list[str] = []
    if not types_only:
        for ref, doc in local_documents(stack).items():
            doc.save(ref.split("/", 1)[1], overwrite=True)
            created.append(ref)
        if not _exists(f"secret/{PII_SALT}"):
            Secret(value=secrets.token_urlsafe(32)).save(PII_SALT)
            created.append(f"secret/{PII_SALT}")
        ensure_work_pool()
    return {"block_types": slugs, "documents": created}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types-only", action="store_true", help="only register block types")
    ap.add_argument("--check", action="store_true", help="list the block documents a run needs; exit 1 if missing")
    ap.add_argument("--spec", default=DEFAULT_SPEC, help="pipeline spec (for --check)")
    ap.add_argument("--warehouse", default="opsloop-duckdb/local", help="warehouse block (for --check)")
    ap.add_argument("--mlflow", default="opsloop-mlflow/local", help="MLflow block (for --check)")
    args = ap.parse_args()
    if args.check:
        need = required_blocks(args.spec, args.warehouse, args.mlflow)
        found = check_blocks(need)
        for ref, why in need.items():
            print(f"  {'ok     ' if found[ref] else 'MISSING'} {ref:<36} {why}")
        raise SystemExit(0 if all(found.values()) else 1)
    out = bootstrap(LocalStack.from_env(), types_only=args.types_only)
    print(f"registered block types: {', '.join(out['block_types'])}")
    for ref in out["documents"]:
        print(f"  block document ready: {ref}")


if __name__ == "__main__":
    main()
