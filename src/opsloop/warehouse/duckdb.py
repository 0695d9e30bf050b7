"""DuckDB adapter: the embedded default warehouse (a file under the local data dir).

A connection is opened per operation and closed after it, so several processes (the K scoring
partitions of a fan-out, the UI-triggered rerun) can take turns on one file; a lock conflict is
retried for ``lock_timeout`` seconds, then reported as a TransientError naming the file.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from opsloop import faults
from opsloop.errors import TerminalError, TransientError
from opsloop.warehouse.base import (
    Column,
    JobStats,
    MergeSpec,
    StateUpdate,
    TableRef,
    TableSchema,
    arrow_to_logical,
    clean_labels,
    record_job,
)
from opsloop.warehouse.merge import (
    STATE_SCHEMA,
    STATE_TABLE,
    Dialect,
    add_column_sql,
    create_table_sql,
    merge_sql,
    state_merge_sql,
)

_DUCK_TO_LOGICAL = {
    "VARCHAR": "STRING",
    "BIGINT": "INT64",
    "INTEGER": "INT64",
    "SMALLINT": "INT64",
    "TINYINT": "INT64",
    "HUGEINT": "INT64",
    "UBIGINT": "INT64",
    "UINTEGER": "INT64",
    "DOUBLE": "FLOAT64",
    "FLOAT": "FLOAT64",
    "BOOLEAN": "BOOL",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMP",
    "TIMESTAMP": "TIMESTAMP",
    "DATE": "DATE",
    "BLOB": "BYTES",
    "JSON": "JSON",
}


def _logical(duck_type: str) -> str:
    if duck_type.startswith("DECIMAL"):
        return "NUMERIC"
    return _DUCK_TO_LOGICAL.get(duck_type, "STRING")


def _translate(exc: Exception, where: str) -> Exception:
    msg = str(exc)
    low = msg.lower()
    if "could not set lock" in low or "conflicting lock" in low:
        return TransientError(f"DuckDB file {where} is locked by another process: {msg}")
    if "no space left" in low or "disk full" in low or "file too large" in low or "quota exceeded" in low:
        # before the TransactionException check: a failed commit for want of space is no conflict
        return TerminalError(f"DuckDB {where}: disk full — free space and rerun: {msg}")
    if "read-only" in low or "read only" in low or "permission denied" in low:
        return TerminalError(f"DuckDB {where}: cannot write (read-only or permission denied): {msg}")
    if isinstance(exc, duckdb.TransactionException):
        return TransientError(f"DuckDB {where}: transaction conflict: {msg}")
    return TerminalError(f"DuckDB {where}: {msg}")


class DuckDBAdapter:
    """Warehouse protocol on a DuckDB file. ``dataset`` ↔ schema, ``table`` ↔ table."""

    dialect = "duckdb"

    def __init__(
        self,
        path: str | Path,
        meta_dataset: str = "opsloop_meta",
        labels: Mapping[str, Any] | None = None,
        lock_timeout: float = 120.0,
        threads: int | None = None,
        memory_limit: str | None = None,
    ) -> None:
        self.path = str(path)
        self.meta_dataset = meta_dataset
        self.labels = clean_labels(labels or {})
        self.lock_timeout = lock_timeout
        self.threads = threads
        self.memory_limit = memory_limit
        self.jobs: list[JobStats] = []
        # the catalog DuckDB names after the file; qualifying with it keeps "x"."t" unambiguous when a
        # schema has the file's name (bench.duckdb + schema bench)
        catalog = Path(self.path).name.split(".")[0] if self.path != ":memory:" else "memory"  # as DuckDB names it
        self._sql = Dialect("duckdb", project=catalog)
        self._state_ready = False
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    # -- plumbing ------------------------------------------------------------------------------
    def with_labels(self, **labels: Any) -> DuckDBAdapter:
        clone = DuckDBAdapter(
            self.path,
            self.meta_dataset,
            {**self.labels, **labels},
            self.lock_timeout,
            self.threads,
            self.memory_limit,
        )
        clone.jobs = self.jobs
        return clone

    def param(self, name: str) -> str:
        return self._sql.param(name)

    def quote(self, ref: TableRef | str) -> str:
        return self._sql.table(ref) if isinstance(ref, TableRef) else self._sql.ident(ref)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one operation; retries while another process holds the file lock."""
        deadline = time.monotonic() + self.lock_timeout
        config: dict[str, Any] = {}
        if self.threads:
            config["threads"] = self.threads
        if self.memory_limit:
            config["memory_limit"] = self.memory_limit
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(self.path, config=config)
                break
            except duckdb.Error as exc:
                err = _translate(exc, self.path)
                if isinstance(err, TransientError) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise err from exc
        try:
            yield con
        except duckdb.Error as exc:
            raise _translate(exc, self.path) from exc
        finally:
            con.close()

    def _record(
        self,
        kind: str,
        started: float,
        target: str | None = None,
        rows: int = 0,
        inserted: int = 0,
        updated: int = 0,
        deleted: int = 0,
    ) -> JobStats:
        stats = JobStats(
            kind=kind,
            job_id=f"duckdb_{uuid.uuid4().hex[:12]}",
            target=target,
            rows=rows,
            inserted=inserted,
            updated=updated,
            deleted=deleted,
            seconds=time.perf_counter() - started,
            labels=dict(self.labels),
        )
        self.jobs.append(stats)
        record_job(stats)
        return stats

    # -- DDL -----------------------------------------------------------------------------------
    def ensure_dataset(self, dataset: str) -> None:
        with self.connect() as con:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {self._sql.schema(dataset)}")

    def table_schema(self, ref: TableRef) -> TableSchema | None:
        with self.connect() as con:
            rows = con.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                [self._sql.dataset(ref.dataset), ref.table],
            ).fetchall()
        if not rows:
            return None
        return TableSchema(tuple(Column(n, _logical(t), nl == "YES") for n, t, nl in rows))

    def ensure_table(self, ref: TableRef, schema: TableSchema) -> TableSchema:
        """Create the table if missing; add columns the schema has and the table lacks."""
        self.ensure_dataset(ref.dataset)
        existing = self.table_schema(ref)
        with self.connect() as con:
            if existing is None:
                con.execute(create_table_sql(self._sql, ref, schema))
            else:
                for col in schema.columns:
                    if existing.column(col.name) is None:
                        con.execute(add_column_sql(self._sql, ref, col))
        return self.table_schema(ref) or schema

    def drop_table(self, ref: TableRef) -> None:
        with self.connect() as con:
            con.execute(f"DROP TABLE IF EXISTS {self._sql.table(ref)}")

    # -- loading -------------------------------------------------------------------------------
    def load_staging(
        self, ref: TableRef, data: pa.Table | Iterable[pa.RecordBatch], schema: pa.Schema, job_key: str
    ) -> JobStats:
        """Replace ``ref`` with the streamed batches (bounded memory: DuckDB pulls batch by batch)."""
        started = time.perf_counter()
        batches = data.to_batches() if isinstance(data, pa.Table) else data
        raised: list[BaseException] = []

        def pulled() -> Iterator[pa.RecordBatch]:
            try:
                yield from batches
            except BaseException as exc:  # DuckDB wraps it (message + traceback text): keep the original
                raised.append(exc)
                raise

        reader = pa.RecordBatchReader.from_batches(schema, pulled())
        self.ensure_dataset(ref.dataset)
        try:
            with self.connect() as con:
                con.register("_opsloop_src", reader)
                con.execute(f"CREATE OR REPLACE TABLE {self._sql.table(ref)} AS SELECT * FROM _opsloop_src")
                con.unregister("_opsloop_src")
                (rows,) = con.execute(f"SELECT count(*) FROM {self._sql.table(ref)}").fetchone() or (0,)
        except Exception as exc:
            if raised and raised[0] is not exc:
                raise raised[0] from exc  # e.g. the NULL-merge-key check or a source error, by its own text
            raise
        return self._record("load", started, str(ref), rows=int(rows))

    def append(self, ref: TableRef, data: pa.Table, job_key: str | None = None) -> JobStats:
        """Append rows (logs, ledgers); creates the table from the data's schema when missing."""
        started = time.perf_counter()
        self.ensure_table(ref, TableSchema.from_arrow(data.schema))
        cols = ", ".join(self._sql.ident(n) for n in data.column_names)
        with self.connect() as con:
            con.register("_opsloop_rows", data)
            con.execute(f"INSERT INTO {self._sql.table(ref)} ({cols}) SELECT {cols} FROM _opsloop_rows")
            con.unregister("_opsloop_rows")
        return self._record("append", started, str(ref), rows=data.num_rows, inserted=data.num_rows)

    def merge(
        self, spec: MergeSpec, staging: TableRef, state: StateUpdate | None = None, job_key: str | None = None
    ) -> JobStats:
        """MERGE staging into target and, in the same transaction, commit the state row."""
        started = time.perf_counter()
        sql = merge_sql(self._sql, spec, staging=staging) + "\nRETURNING merge_action"
        if state is not None:
            self._ensure_state_table()
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                actions = con.sql(sql).to_arrow_table()
                faults.checkpoint("after_merge_before_state")
                if state is not None:
                    con.execute(state_merge_sql(self._sql, self.meta_dataset), _state_params(state))
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
        counts = {"INSERT": 0, "UPDATE": 0, "DELETE": 0}
        if actions.num_rows:
            vc = pc.value_counts(actions.column(0)).to_pylist()
            counts.update({v["values"]: int(v["counts"]) for v in vc})
        return self._record(
            "merge",
            started,
            str(spec.target),
            rows=sum(counts.values()),
            inserted=counts["INSERT"],
            updated=counts["UPDATE"],
            deleted=counts["DELETE"],
        )

    # -- queries -------------------------------------------------------------------------------
    def execute(self, sql: str, params: Mapping[str, Any] | None = None, kind: str = "query") -> JobStats:
        started = time.perf_counter()
        with self.connect() as con:
            res = con.execute(sql, dict(params) if params else None)
            try:
                row = res.fetchone()
                affected = int(row[0]) if row and isinstance(row[0], int) else 0
            except duckdb.Error:
                affected = 0
        return self._record(kind, started, rows=affected)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        started = time.perf_counter()
        with self.connect() as con:
            table = con.sql(sql, params=dict(params) if params else None).to_arrow_table()
        self._record("query", started, rows=table.num_rows)
        return table

    def read_batches(
        self, sql: str, params: Mapping[str, Any] | None = None, batch_rows: int = 100_000
    ) -> Iterator[pa.RecordBatch]:
        """Stream a query's result as Arrow record batches of at most ``batch_rows`` rows."""
        started = time.perf_counter()
        total = 0
        with self.connect() as con:
            reader = con.sql(sql, params=dict(params) if params else None).to_arrow_reader(batch_rows)
            for batch in reader:
                total += batch.num_rows
                yield batch
        self._record("read", started, rows=total)

    # -- state ---------------------------------------------------------------------------------
    def _ensure_state_table(self) -> None:
        if not self._state_ready:
            self.ensure_table(TableRef(self.meta_dataset, STATE_TABLE), STATE_SCHEMA)
            self._state_ready = True

    def get_state(self, pipeline: str, source: str) -> dict[str, Any] | None:
        self._ensure_state_table()
        t = self._sql.table(TableRef(self.meta_dataset, STATE_TABLE))
        rows = self.query(
            f"SELECT * FROM {t} WHERE pipeline = $pipeline AND source = $source",
            {"pipeline": pipeline, "source": source},
        ).to_pylist()
        return rows[0] if rows else None

    def commit_state(self, state: StateUpdate) -> JobStats:
        started = time.perf_counter()
        self._ensure_state_table()
        with self.connect() as con:
            con.execute(state_merge_sql(self._sql, self.meta_dataset), _state_params(state))
        return self._record("state", started, f"{self.meta_dataset}.{STATE_TABLE}", rows=1)

    def close(self) -> None:
        """Nothing stays open between operations."""


def _state_params(state: StateUpdate) -> dict[str, Any]:
    return {
        "pipeline": state.pipeline,
        "source": state.source,
        "watermark": state.watermark,
        "cursor": state.cursor,
        "last_run_id": state.run_id,
        "extra": state.extra,
    }


def arrow_schema_logical(schema: pa.Schema) -> dict[str, str]:
    """Column → logical type, e.g. for schema-drift checks against a target table."""
    return {f.name: arrow_to_logical(f.type) for f in schema}
