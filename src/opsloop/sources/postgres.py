"""Postgres source: watermark reads (``COPY`` → Arrow) and logical-replication CDC (``pgcdc``).

Watermark mode reads ``WHERE <watermark> >= <committed watermark> − lag`` per table. ``>=`` re-reads
the rows at the boundary (a row committed later with the same timestamp is not lost) and the MERGE
keeps them single (an equal ``updated_at`` never updates). The new watermark is the maximum seen,
committed with the data. Deletes are invisible to a watermark; with ``sync.deleteDetection: keys``
the primary keys are scanned after the load and target rows whose key vanished are deleted (or
flagged, per ``cdc.deleteMode``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from opsloop.errors import ConfigError, TerminalError, TransientError
from opsloop.sources.base import LoadRequest, Position, Sink
from opsloop.sources.pgcopy import SESSION_SETTINGS, PgTable, copy_to_arrow, describe_table
from opsloop.spec import PipelineSpec, SourceSpec, TableSpec
from opsloop.transform.pyvalues import max_time

_AUTH_HINTS = ("password authentication failed", "does not exist", "no pg_hba.conf entry", "permission denied")


def connect(dsn: str, timeout: int = 10, replication: bool = False, what: str = "source") -> psycopg.Connection:
    """An autocommit connection (UTC, ISO dates); vendor errors → Terminal (auth/config) or Transient."""
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": timeout, "application_name": "opsloop-ingest"}
    # COPY output goes to Arrow's CSV reader, which reads UTF-8: have the server convert (LATIN1 …) —
    # a SQL_ASCII database would otherwise hand out bytes, even for catalog names
    kwargs["client_encoding"] = "UTF8"
    if replication:
        kwargs["replication"] = "database"
    try:
        conn = psycopg.connect(dsn, **kwargs)
    except psycopg.OperationalError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if any(h in str(exc) for h in _AUTH_HINTS):
            raise TerminalError(f"Postgres {what}: cannot connect: {msg}") from exc
        raise TransientError(f"Postgres {what}: cannot connect: {msg}") from exc
    if not replication:
        conn.execute(SESSION_SETTINGS)
    return conn


def translate(exc: psycopg.Error, what: str) -> Exception:
    """psycopg error → Terminal (SQL, privilege, data) or Transient (connection, lock, in use)."""
    msg = str(exc).strip()
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.ObjectInUse | psycopg.errors.LockNotAvailable):
        return TransientError(f"Postgres {what}: {msg}")
    if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.SerializationFailure):
        return TransientError(f"Postgres {what}: {msg}")
    return TerminalError(f"Postgres {what}: {msg}")


def table_keys(info: PgTable, table: TableSpec) -> tuple[str, ...]:
    keys = tuple(table.primary_key) or info.primary_key
    if not keys:
        raise ConfigError(f"Postgres table {info.qualified} has no primary key: set primaryKey for it in the spec")
    missing = [k for k in keys if k not in {c.name for c in info.columns}]
    if missing:
        raise ConfigError(f"Postgres table {info.qualified}: primaryKey column(s) {missing} do not exist")
    return keys


@dataclass
class SourceReport:
    """What a source run says besides the per-stream counts (slot lag, positions, warnings)."""

    mode: str
    slot_lag_bytes: int | None = None
    slot_retained_bytes: int | None = None
    cursor_before: str | None = None
    cursor_after: str | None = None
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "warnings": list(self.warnings)}
        for k in ("slot_lag_bytes", "slot_retained_bytes", "cursor_before", "cursor_after"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out.update(self.details)
        return out


class PostgresSource:
    """Reads the tables of one ``database`` source spec into a :class:`Sink`."""

    def __init__(self, dsn: str, spec: PipelineSpec, source: SourceSpec, connect_timeout: int = 10) -> None:
        self.dsn = dsn
        self.spec = spec
        self.source = source
        self.timeout = connect_timeout

    def connect(self, replication: bool = False) -> psycopg.Connection:
        return connect(self.dsn, self.timeout, replication, what=f"source {self.source.id}")

    def run(self, sink: Sink, full_refresh: bool = False, since: datetime | None = None) -> SourceReport:
        if self.spec.is_cdc(self.source):
            if since is not None:
                raise ConfigError(
                    f"source {self.source.id} reads by CDC and replays from its replication slot; `since` applies "
                    "to watermark sources — use full_refresh=True to resync it"
                )
            from opsloop.sources.pgcdc import PostgresCdc

            return PostgresCdc(self, sink).run(full_refresh=full_refresh)
        return self.run_watermark(sink, full_refresh, since)

    # -- watermark mode -----------------------------------------------------------------------
    def run_watermark(self, sink: Sink, full_refresh: bool = False, since: datetime | None = None) -> SourceReport:
        report = SourceReport(mode="full" if self.source.sync.strategy == "full" else "watermark")
        with self.connect() as conn:
            for table in self.source.tables:
                try:
                    self._watermark_table(conn, table, sink, full_refresh, since)
                except psycopg.Error as exc:
                    raise translate(exc, f"read of {table.name}") from exc
        return report

    def _watermark_table(
        self, conn: psycopg.Connection, table: TableSpec, sink: Sink, full_refresh: bool, since: datetime | None
    ) -> None:
        info = describe_table(conn, table.name, table.columns)
        keys = table_keys(info, table)
        schema = info.arrow_schema()
        full = self.source.sync.strategy == "full"
        wm_col = None if full else self.source.watermark_field(table)
        if wm_col is not None and wm_col not in schema.names:
            raise ConfigError(
                f"source {self.source.id}: watermark column {wm_col!r} is not a column of {info.qualified}"
            )
        state = None if full_refresh else sink.state(table.name)
        before: datetime | None = state.get("watermark") if state else None
        start = since or (before - self.source.sync.lag if before is not None else None)
        query = sql.SQL("SELECT {} FROM {}").format(info.select_list(), info.ident)
        if wm_col is not None and start is not None:
            query = sql.SQL("{} WHERE {} >= {}").format(query, sql.Identifier(wm_col), sql.Literal(start))
        tracker = _MaxTracker(wm_col, before)
        batches = tracker.track(
            copy_to_arrow(conn, query, schema, chunk_rows=self.source.chunk_rows, what=f"COPY of {info.qualified}")
        )
        kind = "full" if full or start is None else "incremental"
        sink.load(
            LoadRequest(
                table,
                schema,
                batches,
                position=lambda: Position(watermark=tracker.value),
                replace=full_refresh,
                kind=kind,
                position_before=Position(watermark=before),
                keys=keys,
                unique=True,
            )
        )
        if self.source.sync.delete_detection == "keys" and not full_refresh and state is not None:
            key_schema = pa.schema([schema.field(k) for k in keys])
            key_cols = [c for c in info.columns if c.name in keys]
            key_query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(c.select_sql() for c in sorted(key_cols, key=lambda c: keys.index(c.name))),
                info.ident,
            )
            keyed = copy_to_arrow(conn, key_query, key_schema, chunk_rows=500_000, what=f"key scan of {info.qualified}")
            sink.delete_missing(table, key_schema, keyed, keys)


class _MaxTracker:
    """Passes batches through and remembers the maximum of the watermark column."""

    def __init__(self, column: str | None, start: datetime | None) -> None:
        self.column = column
        self.value = start

    def track(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if self.column is not None and batch.num_rows:
                top = max_time(batch.column(self.column))
                if top is not None and (self.value is None or top > self.value):
                    self.value = top
            yield batch
