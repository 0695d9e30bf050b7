"""Helpers of the bad-input catalogue: specs for a Postgres ``transactions`` table and for CSV/Parquet
files, an ingest runner, row counters and replication-slot cleanup.

Every case drives the real path (source reader → dedup → quality gates → PII → stage → MERGE + state
in DuckDB) and asserts the exact outcome: an error naming the field / record / block, or
quarantine rows with their reason, and row counts proving nothing vanished.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opsloop.ingest import ingest_source
from opsloop.sources.files import FileSource
from opsloop.sources.postgres import PostgresSource
from opsloop.spec import PipelineSpec, parse_spec
from opsloop.warehouse.duckdb import DuckDBAdapter

SALT = b"bad-inputs-salt"
TX_DDL = (
    "CREATE TABLE transactions (event_id text PRIMARY KEY, customer_id text, amount numeric(12,2), "
    "currency text, qty int, note text, event_time timestamptz DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now())"
)
# the shipped spec's transactions rules, on a table of this test
TX_CHECKS: list[dict[str, Any]] = [
    {"column": "amount", "rule": "min", "value": 0},
    {"column": "customer_id", "rule": "not_null"},
    {"column": "currency", "rule": "accepted_values", "value": ["EUR", "USD", "GBP"]},
]


def pg_spec(
    strategy: str = "cdc",
    checks: list[dict[str, Any]] | None = None,
    schema_policy: Any = None,
    max_share: float = 0.5,
    slot: str | None = None,
) -> PipelineSpec:
    """One Postgres source (``transactions``) → ``ops.transactions`` MERGEd on ``event_id``."""
    return parse_spec(pg_spec_data(strategy, checks, schema_policy, max_share, slot))


def pg_spec_data(
    strategy: str = "cdc",
    checks: list[dict[str, Any]] | None = None,
    schema_policy: Any = None,
    max_share: float = 0.5,
    slot: str | None = None,
) -> dict[str, Any]:
    """The YAML mapping of :func:`pg_spec` (to write a spec file for a flow run)."""
    slot = slot or f"bi_{uuid.uuid4().hex[:10]}"
    transform: dict[str, Any] = {
        "qualityChecks": TX_CHECKS if checks is None else checks,
        "quarantine": {"maxShare": max_share, "minRows": 1},
        "deduplicate": [{"keys": ["event_id"], "orderBy": "updated_at DESC"}],
    }
    if schema_policy is not None:
        transform["schemaPolicy"] = schema_policy
    return {
        "name": "bi",
        "cdc": {"enabled": strategy == "cdc", "source": "pg", "slotName": slot, "publication": slot},
        "sources": [
            {
                "id": "pg",
                "type": "database",
                "connection": "opsloop-postgres/test",
                "tables": [{"name": "transactions", "primaryKey": ["event_id"]}],
                "sync": {"strategy": strategy, "watermarkField": "updated_at"},
            }
        ],
        "transform": transform,
        "destinations": [
            {
                "type": "warehouse",
                "stream": "pg.transactions",
                "dataset": "ops",
                "table": "transactions",
                "mergeKeys": ["event_id"],
                "orderBy": "updated_at",
            }
        ],
    }


def file_spec(
    pattern: str | Path,
    checks: list[dict[str, Any]] | None = None,
    dedup: bool = True,
    schema_policy: Any = None,
    max_share: float = 1.0,
) -> PipelineSpec:
    """One file source (table ``events``, key ``id``, watermark ``updated_at``) → ``raw_files.events``."""
    transform: dict[str, Any] = {"qualityChecks": checks or [], "quarantine": {"maxShare": max_share}}
    if dedup:
        transform["deduplicate"] = [{"keys": ["id"], "orderBy": "updated_at DESC"}]
    if schema_policy is not None:
        transform["schemaPolicy"] = schema_policy
    return parse_spec(
        {
            "name": "bi_files",
            "sources": [
                {
                    "id": "files",
                    "type": "file",
                    "path": str(pattern),
                    "tables": [{"name": "events", "primaryKey": ["id"]}],
                    "sync": {"strategy": "watermark", "watermarkField": "updated_at"},
                }
            ],
            "transform": transform,
        }
    )


def ingest_pg(wh: DuckDBAdapter, spec: PipelineSpec, dsn: str, run_id: str, **kw: Any) -> dict[str, Any]:
    src = spec.source("pg")
    return ingest_source(wh, spec, src, PostgresSource(dsn, spec, src), run_id=run_id, salt=SALT, **kw)


def ingest_files(wh: DuckDBAdapter, spec: PipelineSpec, run_id: str, **kw: Any) -> dict[str, Any]:
    src = spec.sources[0]
    return ingest_source(wh, spec, src, FileSource(spec, src), run_id=run_id, salt=SALT, **kw)


def exec_sql(dsn: str, *statements: str, params: tuple[Any, ...] | None = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s, params)  # type: ignore[arg-type]


def count(wh: DuckDBAdapter, table: str, where: str = "") -> int:
    if wh.table_schema(_ref(table)) is None:
        return 0
    return int(wh.query(f"SELECT count(*) AS n FROM {table} {where}").to_pylist()[0]["n"])


def quarantine(wh: DuckDBAdapter, run_id: str | None = None) -> list[dict[str, Any]]:
    if wh.table_schema(_ref("opsloop_meta._quarantine")) is None:
        return []
    where = "WHERE run_id = $r" if run_id else ""
    return wh.query(
        f"SELECT rule, column_name, reason, row_json, run_id FROM opsloop_meta._quarantine {where} ORDER BY reason",
        {"r": run_id} if run_id else None,
    ).to_pylist()


def _ref(name: str) -> Any:
    from opsloop.warehouse.base import TableRef

    ds, table = name.split(".")
    return TableRef(ds, table)


@pytest.fixture
def wh(tmp_path: Path) -> DuckDBAdapter:
    return DuckDBAdapter(tmp_path / "wh.duckdb")
