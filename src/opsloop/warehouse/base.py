"""The warehouse protocol every adapter (DuckDB, BigQuery) implements, and its value types."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from opsloop.spec.base import check_ident

LOGICAL_TYPES = ("STRING", "INT64", "FLOAT64", "NUMERIC", "BOOL", "TIMESTAMP", "DATE", "BYTES", "JSON")


@dataclass(frozen=True)
class TableRef:
    """``dataset.table``; both parts validated as identifiers, so they are safe to quote into SQL.

    ``temp``: a table of the session connection's temporary catalog (DuckDB staging, see
    :func:`opsloop.warehouse.write.staging_ref`), which never reaches the warehouse file."""

    dataset: str
    table: str
    temp: bool = False

    def __post_init__(self) -> None:
        check_ident(self.dataset)
        check_ident(self.table)

    @classmethod
    def parse(cls, name: str) -> TableRef:
        dataset, _, table = name.partition(".")
        if not table:
            raise ValueError(f"{name!r} is not a dataset.table name")
        return cls(dataset, table)

    def __str__(self) -> str:
        return f"{self.dataset}.{self.table}"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True

    def __post_init__(self) -> None:
        check_ident(self.name)
        if self.type not in LOGICAL_TYPES:
            raise ValueError(f"column {self.name}: unknown type {self.type!r} (one of {LOGICAL_TYPES})")


@dataclass(frozen=True)
class TableSchema:
    columns: tuple[Column, ...]
    partition_by: str | None = None
    cluster_by: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @classmethod
    def from_arrow(
        cls, schema: pa.Schema, partition_by: str | None = None, cluster_by: Iterable[str] = ()
    ) -> TableSchema:
        return cls(
            tuple(Column(f.name, arrow_to_logical(f.type)) for f in schema),
            partition_by,
            tuple(cluster_by),
        )


def arrow_to_logical(t: pa.DataType) -> str:
    """Map an Arrow type to opsloop's logical warehouse type."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "STRING"
    if pa.types.is_boolean(t):
        return "BOOL"
    if pa.types.is_integer(t):
        return "INT64"
    if pa.types.is_floating(t):
        return "FLOAT64"
    if pa.types.is_decimal(t):
        return "NUMERIC"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "BYTES"
    if pa.types.is_null(t):
        return "STRING"
    if pa.types.is_dictionary(t):
        return arrow_to_logical(t.value_type)
    raise ValueError(f"unsupported Arrow type {t}")


LOGICAL_TO_ARROW: dict[str, pa.DataType] = {
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "FLOAT64": pa.float64(),
    "NUMERIC": pa.decimal128(38, 9),
    "BOOL": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "DATE": pa.date32(),
    "BYTES": pa.binary(),
    "JSON": pa.string(),
}


@dataclass
class JobStats:
    """What one warehouse job did and cost; the cost ledger sums these per run and stage."""

    kind: str
    job_id: str | None = None
    target: str | None = None
    bytes_processed: int = 0
    bytes_billed: int = 0
    slot_ms: int = 0
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    seconds: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    cache_hit: bool = False
    started: datetime | None = None


_JOB_LOG: list[JobStats] = []
_JOB_LOG_LOCK = threading.Lock()
_JOB_LOG_MAX = 200_000


def record_job(stats: JobStats) -> None:
    """Process-wide log of every warehouse job, so a stage can sum its own jobs by flow_run_id label."""
    with _JOB_LOG_LOCK:
        _JOB_LOG.append(stats)
        if len(_JOB_LOG) > _JOB_LOG_MAX:
            del _JOB_LOG[: len(_JOB_LOG) - _JOB_LOG_MAX]


def jobs_for(flow_run_id: str, task: str | None = None) -> list[JobStats]:
    """Jobs recorded in this process whose labels carry ``flow_run_id`` (and ``task`` if given)."""
    with _JOB_LOG_LOCK:
        return [
            j
            for j in _JOB_LOG
            if j.labels.get("flow_run_id") == flow_run_id and (task is None or j.labels.get("task") == task)
        ]


@dataclass(frozen=True)
class MergeSpec:
    """MERGE ``staging`` into ``target`` on ``keys``.

    * in-batch duplicates: the latest row by ``order_by`` (then ``tiebreak``) wins (QUALIFY);
    * matched: updated only if the staging row is newer by ``order_by[0]`` (no order: if any column
      differs), so replaying a batch changes nothing;
    * ``delete_flag``: a staging column; true rows delete the matched target row (hard delete) and
      are never inserted;
    * ``partition_column``: BigQuery prunes the target to the staging rows' partition range
      (the partition column must not change for a key).
    """

    target: TableRef
    columns: tuple[str, ...]
    keys: tuple[str, ...]
    order_by: tuple[str, ...] = ()
    tiebreak: str | None = None
    delete_flag: str | None = None
    partition_column: str | None = None
    partition_type: str = "TIMESTAMP"

    def __post_init__(self) -> None:
        for name in (*self.columns, *self.keys, *self.order_by):
            check_ident(name)
        for opt in (self.tiebreak, self.delete_flag, self.partition_column):
            if opt is not None:
                check_ident(opt)
        if not self.keys:
            raise ValueError(f"MERGE into {self.target}: at least one key column is required")
        missing = [k for k in (*self.keys, *self.order_by) if k not in self.columns]
        if missing:
            raise ValueError(f"MERGE into {self.target}: key/order columns {missing} are not in columns")


@dataclass(frozen=True)
class StateUpdate:
    """A row of ``_opsloop_state``: where a source's incremental read stands."""

    pipeline: str
    source: str
    run_id: str
    watermark: datetime | None = None
    cursor: str | None = None
    extra: str | None = None


_LABEL_RE = re.compile(r"[^a-z0-9_-]")


def clean_labels(labels: Mapping[str, Any]) -> dict[str, str]:
    """BigQuery label rules: lowercase keys/values, [a-z0-9_-], ≤ 63 chars, keys start with a letter."""
    out: dict[str, str] = {}
    for k, v in labels.items():
        if v is None:
            continue
        key = _LABEL_RE.sub("_", str(k).lower())[:63]
        if not key or not key[0].isalpha():
            key = ("l" + key)[:63]
        out[key] = _LABEL_RE.sub("_", str(v).lower())[:63]
    return out


@runtime_checkable
class Warehouse(Protocol):
    """What the rest of opsloop needs from a warehouse. Adapters raise Terminal/TransientError."""

    dialect: str
    meta_dataset: str
    jobs: list[JobStats]

    def with_labels(self, **labels: Any) -> Warehouse: ...
    def param(self, name: str) -> str: ...
    def quote(self, ref: TableRef | str) -> str: ...
    def ensure_dataset(self, dataset: str) -> None: ...
    def ensure_table(self, ref: TableRef, schema: TableSchema) -> TableSchema: ...
    def table_schema(self, ref: TableRef) -> TableSchema | None: ...
    def drop_table(self, ref: TableRef) -> None: ...
    def load_staging(
        self, ref: TableRef, data: pa.Table | Iterable[pa.RecordBatch], schema: pa.Schema, job_key: str
    ) -> JobStats: ...
    def append(self, ref: TableRef, data: pa.Table, job_key: str | None = None, checked: bool = False) -> JobStats: ...
    def merge(
        self, spec: MergeSpec, staging: TableRef, state: StateUpdate | None = None, job_key: str | None = None
    ) -> JobStats: ...
    def execute(self, sql: str, params: Mapping[str, Any] | None = None, kind: str = "query") -> JobStats: ...
    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table: ...
    def read_batches(
        self, sql: str, params: Mapping[str, Any] | None = None, batch_rows: int = 100_000
    ) -> Iterator[pa.RecordBatch]: ...
    def get_state(self, pipeline: str, source: str) -> dict[str, Any] | None: ...
    def commit_state(self, state: StateUpdate) -> JobStats: ...
    def close(self) -> None: ...
