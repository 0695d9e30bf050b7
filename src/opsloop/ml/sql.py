"""Warehouse-side helpers shared by the ML stages: templated SQL, in-warehouse MERGE from a query,
hash partitions of an entity key."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from opsloop.errors import TerminalError
from opsloop.warehouse.base import MergeSpec, TableRef, Warehouse
from opsloop.warehouse.write import WriteResult

_REF = re.compile(r"\{\{\s*ref\(\s*['\"]([A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*)['\"]\s*\)\s*\}\}")


def render_sql(wh: Warehouse, sql: str) -> str:
    """Resolve ``{{ ref('dataset.table') }}`` and, off BigQuery, transpile BigQuery SQL with sqlglot."""
    refs: list[TableRef] = []

    def _sub(m: re.Match[str]) -> str:
        refs.append(TableRef.parse(m.group(1)))
        return f"__opsloop_ref_{len(refs) - 1}__"

    body = _REF.sub(_sub, sql)
    if "{{" in body:
        raise TerminalError(f"feature SQL: unresolved template near {body[body.index('{{') :][:60]!r}")
    if wh.dialect != "bigquery":
        import sqlglot

        try:
            body = sqlglot.transpile(body, read="bigquery", write=wh.dialect)[0]
        except sqlglot.errors.ParseError as exc:
            raise TerminalError(f"feature SQL does not parse as BigQuery SQL: {exc}") from exc
    for i, ref in enumerate(refs):
        body = body.replace(f"__opsloop_ref_{i}__", wh.quote(ref))
    return body


def merge_from_query(
    wh: Warehouse,
    target: TableRef,
    select_sql: str,
    params: Mapping[str, Any] | None,
    keys: tuple[str, ...],
    staging_suffix: str = "",
    required: tuple[str, ...] = (),
) -> WriteResult:
    """``CREATE OR REPLACE`` a staging table from ``select_sql`` in the warehouse, MERGE it into
    ``target`` on ``keys`` (update only when a column differs) and drop it. No data leaves the
    warehouse; rerunning the same query changes nothing."""
    stg = TableRef(target.dataset, f"_stg_{target.table}{staging_suffix}")
    wh.ensure_dataset(target.dataset)
    result = WriteResult(str(target))
    try:
        result.jobs.append(wh.execute(f"CREATE OR REPLACE TABLE {wh.quote(stg)} AS\n{select_sql}", params, "stage"))
        schema = wh.table_schema(stg)
        if schema is None:
            raise TerminalError(f"{target}: staging query produced no table")
        missing = [c for c in (*keys, *required) if schema.column(c) is None]
        if missing:
            raise TerminalError(f"{target}: the query does not return column(s) {missing} (it returns {schema.names})")
        wh.ensure_table(target, schema)
        count = wh.query(f"SELECT COUNT(*) AS n FROM {wh.quote(stg)}").column(0)[0].as_py()
        result.rows_staged = int(count or 0)
        if result.rows_staged:
            merged = wh.merge(MergeSpec(target, tuple(schema.names), keys), stg)
            result.jobs.append(merged)
            result.inserted, result.updated = merged.inserted, merged.updated
    finally:
        wh.drop_table(stg)
    return result


def sample_predicate(wh: Warehouse, column: str, fraction: float) -> str:
    """SQL that is true for a stable ``fraction`` of the keys (hash of ``column``; same rows every time)."""
    keep = max(0, min(1_000_000, int(fraction * 1_000_000)))
    col = wh.quote(column)
    if wh.dialect == "bigquery":
        return f"MOD(ABS(FARM_FINGERPRINT(CAST({col} AS STRING))), 1000000) < {keep}"
    return f"(hash(CAST({col} AS VARCHAR)) % 1000000) < {keep}"


def partition_predicate(wh: Warehouse, column: str, partitions: int, partition: int) -> str:
    """SQL that is true for the rows of hash partition ``partition`` of ``partitions`` (stable per dialect)."""
    if not 0 <= partition < partitions:
        raise TerminalError(f"partition {partition} is outside 0..{partitions - 1}")
    col = wh.quote(column)
    if wh.dialect == "bigquery":
        return f"MOD(ABS(FARM_FINGERPRINT(CAST({col} AS STRING))), {int(partitions)}) = {int(partition)}"
    return f"(hash(CAST({col} AS VARCHAR)) % {int(partitions)}) = {int(partition)}"
