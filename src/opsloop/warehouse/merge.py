"""One SQL builder for both dialects: MERGE, DDL and the state upsert.

Identifiers reaching this module were validated (``check_ident``), then quoted per dialect:
BigQuery uses backticks with a project prefix, DuckDB double quotes (dataset = schema).
Unit tests snapshot the exact SQL for both dialects and parse the BigQuery form with sqlglot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opsloop.spec.base import check_ident
from opsloop.warehouse.base import Column, MergeSpec, StateUpdate, TableRef, TableSchema

DUCKDB_TYPES = {
    "STRING": "VARCHAR",
    "INT64": "BIGINT",
    "FLOAT64": "DOUBLE",
    "NUMERIC": "DECIMAL(38, 9)",
    "BOOL": "BOOLEAN",
    "TIMESTAMP": "TIMESTAMPTZ",
    "DATE": "DATE",
    "BYTES": "BLOB",
    "JSON": "JSON",
}
BIGQUERY_TYPES = {t: t for t in DUCKDB_TYPES}


@dataclass(frozen=True)
class Dialect:
    """Quoting and type names of one SQL dialect."""

    name: str
    project: str | None = None
    dataset_prefix: str = ""

    @property
    def is_bigquery(self) -> bool:
        return self.name == "bigquery"

    def ident(self, name: str) -> str:
        check_ident(name)
        return f"`{name}`" if self.is_bigquery else f'"{name}"'

    def dataset(self, name: str) -> str:
        """The physical dataset (schema) name: the logical name with the environment prefix."""
        return check_ident(self.dataset_prefix + name)

    def table(self, ref: TableRef) -> str:
        ds = self.dataset(ref.dataset)
        if self.is_bigquery:
            prefix = f"{self.project}." if self.project else ""
            return f"`{prefix}{ds}.{ref.table}`"
        if ref.temp:  # the connection's temporary catalog has one schema: the dataset goes into the name
            return f'temp.main."{ds}__{ref.table}"'
        return f'{self.catalog_prefix()}"{ds}"."{ref.table}"'

    def catalog_prefix(self) -> str:
        """DuckDB: qualify with the catalog (the file's name) so a schema named like the file is unambiguous."""
        if self.is_bigquery or not self.project:
            return ""
        return '"' + self.project.replace('"', '""') + '".'

    def schema(self, name: str) -> str:
        """A quoted dataset/schema name (DuckDB: catalog-qualified)."""
        return self.catalog_prefix() + self.ident(self.dataset(name))

    def param(self, name: str) -> str:
        check_ident(name)
        return f"@{name}" if self.is_bigquery else f"${name}"

    def type_name(self, logical: str) -> str:
        return (BIGQUERY_TYPES if self.is_bigquery else DUCKDB_TYPES)[logical]


def column_ddl(d: Dialect, col: Column) -> str:
    return f"{d.ident(col.name)} {d.type_name(col.type)}"


def create_table_sql(d: Dialect, ref: TableRef, schema: TableSchema) -> str:
    """CREATE TABLE IF NOT EXISTS, with partitioning/clustering on BigQuery."""
    cols = ",\n  ".join(column_ddl(d, c) for c in schema.columns)
    sql = f"CREATE TABLE IF NOT EXISTS {d.table(ref)} (\n  {cols}\n)"
    if d.is_bigquery:
        if schema.partition_by:
            pcol = schema.column(schema.partition_by)
            expr = d.ident(schema.partition_by)
            if pcol is not None and pcol.type == "TIMESTAMP":
                expr = f"DATE({expr})"
            sql += f"\nPARTITION BY {expr}"
        if schema.cluster_by:
            sql += "\nCLUSTER BY " + ", ".join(d.ident(c) for c in schema.cluster_by)
    return sql


def add_column_sql(d: Dialect, ref: TableRef, col: Column) -> str:
    return f"ALTER TABLE {d.table(ref)} ADD COLUMN {column_ddl(d, col)}"


def _dedup_source(d: Dialect, spec: MergeSpec, source: str) -> str:
    order = [f"{d.ident(c)} DESC NULLS LAST" for c in spec.order_by]
    if spec.tiebreak:
        order.append(f"{d.ident(spec.tiebreak)} DESC")
    if not order:
        # no ordering column: any one row per key; MERGE must still see one row per key
        order = [f"{d.ident(spec.keys[0])}"]
    part = ", ".join(d.ident(k) for k in spec.keys)
    return (
        f"SELECT * FROM {source} WHERE TRUE\n"
        f"    QUALIFY ROW_NUMBER() OVER (PARTITION BY {part} ORDER BY {', '.join(order)}) = 1"
    )


def _literal(d: Dialect, typ: str, value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"unsafe partition bound {value!r}")
    return f"{typ} '{value}'"


def _conditions(d: Dialect, spec: MergeSpec, t: str, s: str) -> tuple[str, str, str | None]:
    """(newer, not_older, is_delete): when a staging row ``s`` updates / deletes its target row ``t``."""
    if spec.order_by:
        ob = d.ident(spec.order_by[0])
        newer = f"({t}.{ob} IS NULL OR {s}.{ob} > {t}.{ob})"
        not_older = f"({t}.{ob} IS NULL OR {s}.{ob} >= {t}.{ob})"
    else:
        diffs = [f"{t}.{d.ident(c)} IS DISTINCT FROM {s}.{d.ident(c)}" for c in spec.columns if c not in spec.keys]
        newer = "(" + " OR ".join(diffs) + ")" if diffs else "FALSE"
        not_older = "TRUE"
    is_del = f"COALESCE({s}.{d.ident(spec.delete_flag)}, FALSE)" if spec.delete_flag else None
    return newer, not_older, is_del


def merge_sql(
    d: Dialect,
    spec: MergeSpec,
    staging: TableRef | None = None,
    source_sql: str | None = None,
    partition_bounds: tuple[str, str] | None = None,
) -> str:
    """Build the MERGE statement. Exactly one of ``staging`` / ``source_sql`` is given."""
    if (staging is None) == (source_sql is None):
        raise ValueError("give exactly one of staging or source_sql")
    src = d.table(staging) if staging is not None else f"({source_sql})"
    t, s = "t", "s"
    on = [f"{t}.{d.ident(k)} = {s}.{d.ident(k)}" for k in spec.keys]
    if partition_bounds and spec.partition_column:
        lo, hi = partition_bounds
        pc = f"{t}.{d.ident(spec.partition_column)}"
        typ = "DATE" if spec.partition_type == "DATE" else "TIMESTAMP"
        on.append(f"({pc} IS NULL OR {pc} BETWEEN {_literal(d, typ, lo)} AND {_literal(d, typ, hi)})")
    non_keys = [c for c in spec.columns if c not in spec.keys]
    newer, not_older, is_del = _conditions(d, spec, t, s)
    clauses = []
    if is_del:
        clauses.append(f"WHEN MATCHED AND {is_del} AND {not_older} THEN DELETE")
    if non_keys:
        upd_cond = f"NOT {is_del} AND {newer}" if is_del else newer
        sets = ", ".join(f"{d.ident(c)} = {s}.{d.ident(c)}" for c in non_keys)
        clauses.append(f"WHEN MATCHED AND {upd_cond} THEN UPDATE SET {sets}")
    cols = ", ".join(d.ident(c) for c in spec.columns)
    vals = ", ".join(f"{s}.{d.ident(c)}" for c in spec.columns)
    ins_cond = f" AND NOT {is_del}" if is_del else ""
    clauses.append(f"WHEN NOT MATCHED{ins_cond} THEN INSERT ({cols}) VALUES ({vals})")
    return (
        f"MERGE INTO {d.table(spec.target)} AS {t}\n"
        f"USING (\n    {_dedup_source(d, spec, src)}\n) AS {s}\n"
        f"ON {' AND '.join(on)}\n" + "\n".join(clauses)
    )


MERGE_WORK = "_opsloop_merge"
MATCHED_COL = "_opsloop_matched"
ROW_COL = "_opsloop_row"


@dataclass(frozen=True)
class MergePlan:
    """One MERGE as statements run in order in one transaction. ``counts`` (if any) selects
    ``inserted, updated, deleted``; without it the adapter reads them from the statement's result."""

    statements: tuple[str, ...]
    counts: str | None = None
    cleanup: tuple[str, ...] = ()


def merge_plan(
    d: Dialect, spec: MergeSpec, staging: TableRef, partition_bounds: tuple[str, str] | None = None
) -> MergePlan:
    """The MERGE of ``staging`` into the target, in the form each engine runs fastest.

    BigQuery: the one MERGE statement (:func:`merge_sql`). DuckDB: the same semantics as a
    DELETE + INSERT in one transaction — its MERGE updates row by row in place (100k changes into 1M
    rows: 1.3 s CPU vs 0.3 s). A temporary work table lists the deduplicated staging rows that change
    the target (new keys; newer versions; deletes not older than the target row) by staging row id,
    key and delete flag, flagged ``_opsloop_matched``; the matched target rows are deleted, then the
    listed non-delete staging rows inserted. Older or equal versions never reach the work table, so a
    replayed batch changes nothing.
    """
    if d.is_bigquery:
        return MergePlan((merge_sql(d, spec, staging=staging, partition_bounds=partition_bounds),))
    t, s, m = "t", "s", "m"
    work = f"temp.main.{d.ident(MERGE_WORK)}"  # session-local, never written to the database file
    k0 = d.ident(spec.keys[0])
    on = " AND ".join(f"{t}.{d.ident(k)} = {s}.{d.ident(k)}" for k in spec.keys)
    newer, not_older, is_del = _conditions(d, spec, t, s)
    found, missing = f"{t}.{k0} IS NOT NULL", f"{t}.{k0} IS NULL"  # merge keys are never NULL (checked)
    if is_del:
        applies = (
            f"({missing} AND NOT {is_del})\n   OR ({found} AND {is_del} AND {not_older})\n"
            f"   OR ({found} AND NOT {is_del} AND {newer})"
        )
    else:
        applies = f"{missing} OR {newer}"
    staged = d.table(staging)
    cols = ", ".join(d.ident(c) for c in spec.columns)
    m_del = f"COALESCE({d.ident(spec.delete_flag)}, FALSE)" if spec.delete_flag else "FALSE"
    keep = f"NOT {m_del}" if spec.delete_flag else "TRUE"
    matched = d.ident(MATCHED_COL)
    if "rowid" in {c.lower() for c in (*spec.columns, spec.tiebreak or "", spec.delete_flag or "")}:
        # a column named rowid hides the pseudo-column: the work table carries the whole rows
        flagged, source = f"{s}.*", staged
        insert_from = f"{work} WHERE {keep}"
    else:
        # the work table holds only the staging row ids, keys and delete flags of the rows that
        # apply (materialising every column again cost more than the join); the INSERT reads the
        # staging rows by row id
        row = d.ident(ROW_COL)
        needed = [*spec.keys, *spec.order_by, spec.tiebreak, spec.delete_flag]
        if not spec.order_by:  # "newer" compares every column
            needed += spec.columns
        picked = list(dict.fromkeys(c for c in needed if c))
        carried = dict.fromkeys(c for c in (*spec.keys, spec.delete_flag) if c)
        flagged = ", ".join([f"{s}.{row}", *(f"{s}.{d.ident(c)}" for c in carried)])
        source = f"(SELECT rowid AS {row}, {', '.join(d.ident(c) for c in picked)} FROM {staged})"
        insert_from = f"{staged} WHERE rowid IN (SELECT {row} FROM {work} WHERE {keep})"
    build = (
        f"CREATE OR REPLACE TEMP TABLE {d.ident(MERGE_WORK)} AS\n"
        f"SELECT {flagged}, {found} AS {matched}\n"
        f"FROM (\n    {_dedup_source(d, spec, source)}\n) AS {s}\n"
        f"LEFT JOIN {d.table(spec.target)} AS {t} ON {on}\nWHERE {applies}"
    )
    mk = " AND ".join(f"{t}.{d.ident(k)} = {m}.{d.ident(k)}" for k in spec.keys)
    delete = f"DELETE FROM {d.table(spec.target)} AS {t} USING {work} AS {m} WHERE {m}.{matched} AND {mk}"
    insert = f"INSERT INTO {d.table(spec.target)} ({cols}) SELECT {cols} FROM {insert_from}"
    counts = (
        f"SELECT count(*) FILTER (WHERE NOT {matched} AND NOT {m_del}), "
        f"count(*) FILTER (WHERE {matched} AND NOT {m_del}), count(*) FILTER (WHERE {matched} AND {m_del}) FROM {work}"
    )
    return MergePlan((build, delete, insert), counts, (f"DROP TABLE IF EXISTS {work}",))


STATE_TABLE = "_opsloop_state"
STATE_SCHEMA = TableSchema(
    (
        Column("pipeline", "STRING", False),
        Column("source", "STRING", False),
        Column("watermark", "TIMESTAMP"),
        Column("cursor", "STRING"),
        Column("last_run_id", "STRING"),
        Column("extra", "STRING"),
        Column("updated_at", "TIMESTAMP"),
    )
)
_STATE_PARAMS = ("pipeline", "source", "watermark", "cursor", "last_run_id", "extra")


def state_params(state: StateUpdate) -> dict[str, Any]:
    """The parameters of :func:`state_merge_sql` for ``state``."""
    return {
        "pipeline": state.pipeline,
        "source": state.source,
        "watermark": state.watermark,
        "cursor": state.cursor,
        "last_run_id": state.run_id,
        "extra": state.extra,
    }


def state_merge_sql(d: Dialect, meta_dataset: str) -> str:
    """Upsert one ``_opsloop_state`` row from parameters (same builder as data MERGEs)."""
    ts = "TIMESTAMP" if d.is_bigquery else "TIMESTAMPTZ"
    sel = ", ".join(
        (f"CAST({d.param(p)} AS {ts}) AS {d.ident(p)}" if p == "watermark" else f"{d.param(p)} AS {d.ident(p)}")
        for p in _STATE_PARAMS
    )
    sel += f", CURRENT_TIMESTAMP() AS {d.ident('updated_at')}" if d.is_bigquery else ', now() AS "updated_at"'
    spec = MergeSpec(
        target=TableRef(meta_dataset, STATE_TABLE),
        columns=(*_STATE_PARAMS, "updated_at"),
        keys=("pipeline", "source"),
    )
    return merge_sql(d, spec, source_sql=f"SELECT {sel}")
