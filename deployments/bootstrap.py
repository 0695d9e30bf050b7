"""Register opsloop's block types and create the local block documents (idempotent).

    python -m deployments.bootstrap            # local documents for the embedded stack
    python -m deployments.bootstrap --types-only   # only register block types (production)

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


def register_types() -> list[str]:
    for cls in [*BLOCK_TYPES, Secret]:
        cls.register_type_and_schema()
    return [cls.get_block_type_slug() for cls in BLOCK_TYPES]


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
    args = ap.parse_args()
    out = bootstrap(LocalStack.from_env(), types_only=args.types_only)
    print(f"registered block types: {', '.join(out['block_types'])}")
    for ref in out["documents"]:
        print(f"  block document ready: {ref}")


if __name__ == "__main__":
    main()
