"""Helpers for the ingest tests: spec builder, slot cleanup, source/target snapshots."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from opsloop.ingest import ingest_source
from opsloop.sources.base import LoadRequest, Position, Sink
from opsloop.sources.postgres import PostgresSource
from opsloop.spec import PipelineSpec, parse_spec
from opsloop.warehouse.duckdb import DuckDBAdapter

SALT = b"test-salt"
ITEMS_DDL = (
    "CREATE TABLE items (id int PRIMARY KEY, name text, email text, amount numeric(12,2), "
    "qty int, active boolean, updated_at timestamptz NOT NULL DEFAULT now())"
)


def make_spec(
    strategy: str = "cdc",
    slot: str | None = None,
    delete_mode: str = "hard",
    checks: list[dict[str, Any]] | None = None,
    pii: dict[str, Any] | None = None,
    tables: list[str] | None = None,
    lag: str = "0s",
    quarantine: dict[str, Any] | None = None,
    schema_policy: Any = None,
    name: str = "t",
) -> PipelineSpec:
    tables = tables or ["items"]
    slot = slot or f"s_{uuid.uuid4().hex[:10]}"
    transform: dict[str, Any] = {"qualityChecks": checks or []}
    if pii:
        transform["pii"] = pii
    if quarantine:
        transform["quarantine"] = quarantine
    if schema_policy:
        transform["schemaPolicy"] = schema_policy
    return parse_spec(
        {
            "name": name,
            "cdc": {
                "enabled": strategy == "cdc",
                "source": "pg",
                "slotName": slot,
                "publication": slot,
                "deleteMode": delete_mode,
            },
            "sources": [
                {
                    "id": "pg",
                    "type": "database",
                    "connection": "opsloop-postgres/test",
                    "tables": [{"name": t, "primaryKey": ["id"]} for t in tables],
                    "sync": {"strategy": strategy, "watermarkField": "updated_at", "lag": lag},
                }
            ],
            "transform": transform,
            "destinations": [
                {"type": "warehouse", "stream": f"pg.{t}", "dataset": "ops", "table": t, "mergeKeys": ["id"],
                 "orderBy": "updated_at"}
                for t in tables
            ],
        }
    )  # fmt: skip


def run_ingest(wh: DuckDBAdapter, spec: PipelineSpec, dsn: str, run_id: str = "r", **kw: Any) -> dict[str, Any]:
    src = spec.source("pg")
    return ingest_source(wh, spec, src, PostgresSource(dsn, spec, src), run_id=run_id, salt=SALT, **kw)


def exec_sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s)


def seed_items(dsn: str, n: int = 50) -> None:
    exec_sql(
        dsn,
        ITEMS_DDL,
        f"INSERT INTO items SELECT g, 'name ' || g, 'user' || g || '@example.com', g * 1.25, g % 7, g % 2 = 0, "
        f"now() - interval '1 hour' + g * interval '1 ms' FROM generate_series(1, {n}) g",
    )


def _norm(v: Any) -> Any:
    if isinstance(v, Decimal):
        return v.quantize(Decimal("0.01"))
    if isinstance(v, datetime):
        return v.timestamp()
    return v


def source_rows(dsn: str, table: str = "items", cols: str = "id, name, amount, qty, active, updated_at") -> list[tuple]:
    with psycopg.connect(dsn) as c:
        return [tuple(_norm(v) for v in r) for r in c.execute(f"SELECT {cols} FROM {table} ORDER BY id").fetchall()]


def target_rows(
    wh: DuckDBAdapter,
    table: str = "ops.items",
    cols: str = "id, name, amount, qty, active, updated_at",
    where: str = "",
) -> list[tuple]:
    t = wh.query(f"SELECT {cols} FROM {table} {where} ORDER BY id")
    return [tuple(_norm(v) for v in r.values()) for r in t.to_pylist()]


def slot_info(dsn: str, slot: str) -> dict[str, Any] | None:
    with psycopg.connect(dsn) as c:
        row = c.execute(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return {"confirmed": row[0], "restart": row[1]} if row else None


@pytest.fixture
def wh(tmp_path: Any) -> DuckDBAdapter:
    return DuckDBAdapter(tmp_path / "wh.duckdb")


class TableSource:
    """An in-memory source: one LoadRequest per table, watermark = max(updated_at)."""

    def __init__(self, spec: PipelineSpec, tables: dict[str, pa.Table], replace: bool = False) -> None:
        self.spec = spec
        self.tables = tables
        self.replace = replace

    def run(self, sink: Sink, full_refresh: bool = False, since: datetime | None = None) -> dict[str, Any]:
        src = self.spec.sources[0]
        for t in src.tables:
            data = self.tables[t.name]
            top = data.column("updated_at").to_pylist() if "updated_at" in data.column_names else []
            wm = max((v for v in top if v is not None), default=None)
            sink.load(
                LoadRequest(
                    t,
                    data.schema,
                    data.to_batches(max_chunksize=3),
                    position=lambda wm=wm: Position(watermark=wm),
                    replace=self.replace or full_refresh,
                )
            )
        return {"mode": "memory"}
