"""Upsert a few rows from query parameters with the shared MERGE builder (ledger, KPI table).

One statement per call — no staging table — so concurrent writers (parallel stages, K scoring
partitions) never share a scratch table, and replaying the same rows changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opsloop.warehouse.base import MergeSpec, TableRef, TableSchema, Warehouse
from opsloop.warehouse.merge import Dialect, merge_sql


@dataclass(frozen=True)
class _AdapterDialect(Dialect):
    """The shared MERGE builder, with table names and parameters rendered by the adapter itself."""

    wh: Any = None

    def table(self, ref: TableRef) -> str:
        return str(self.wh.quote(ref))

    def param(self, name: str) -> str:
        return str(self.wh.param(name))


def adapter_dialect(wh: Warehouse) -> Dialect:
    return _AdapterDialect(wh.dialect, wh=wh)


def upsert_rows_sql(
    wh: Warehouse | Dialect,
    target: TableRef,
    schema: TableSchema,
    keys: tuple[str, ...],
    rows: Sequence[Mapping[str, Any]],
) -> tuple[str, dict[str, Any]]:
    """One MERGE upserting ``rows`` by ``keys`` from parameters; NULLs are typed literals.

    Columns absent from ``rows`` are NULL; several rows become ``UNION ALL`` of parameter SELECTs.
    """
    d = wh if isinstance(wh, Dialect) else adapter_dialect(wh)
    ts = "TIMESTAMP" if d.is_bigquery else "TIMESTAMPTZ"
    selects: list[str] = []
    params: dict[str, Any] = {}
    for i, row in enumerate(rows):
        parts = []
        for col in schema.columns:
            typ = ts if col.type == "TIMESTAMP" else d.type_name(col.type)
            value = row.get(col.name)
            if value is None:
                parts.append(f"CAST(NULL AS {typ}) AS {d.ident(col.name)}")
            else:
                params[f"p{i}_{col.name}"] = value
                parts.append(f"CAST({d.param(f'p{i}_{col.name}')} AS {typ}) AS {d.ident(col.name)}")
        selects.append("SELECT " + ", ".join(parts))
    spec = MergeSpec(target, tuple(schema.names), keys)
    return merge_sql(d, spec, source_sql="\n    UNION ALL ".join(selects)), params


@contextlib.contextmanager
def held_open(wh: Warehouse) -> Iterator[None]:
    """DuckDB file: keep one connection open over a burst of small operations, so each does not
    reopen (and checkpoint) the database; other warehouses: nothing to do."""
    connect = getattr(wh, "connect", None)
    if wh.dialect != "duckdb" or connect is None or str(getattr(wh, "path", "")) == ":memory:":
        yield
        return
    with connect():
        yield
