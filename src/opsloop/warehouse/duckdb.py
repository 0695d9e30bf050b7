"""DuckDB adapter: the embedded default warehouse (a file under the local data dir).

A connection is opened per operation and closed after it, so several processes (the K scoring
partitions of a fan-out, the UI-triggered rerun) can take turns on one file; a lock conflict is
retried for ``lock_timeout`` seconds, then reported as a TransientError naming the file. A
multi-step write (stage → MERGE → state → cleanup) runs inside :meth:`DuckDBAdapter.session`, which
keeps one connection for all its operations (an open costs 10–40 ms and each close checkpoints), and
:meth:`DuckDBAdapter.transaction` groups them into one commit.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from opsloop import faults
from opsloop.heap import duckdb_release_unused
from opsloop.transform import pyvalues
from opsloop.warehouse.base import (
    Column,
    JobStats,
    MergeSpec,
    StateUpdate,
    TableRef,
    TableSchema,
    clean_labels,
    record_job,
)
from opsloop.warehouse.duckdb_conn import DuckDBFile
from opsloop.warehouse.duckdb_support import (
    arrow_schema_logical,
    logical,
    pulled,
    translate,
)
from opsloop.warehouse.merge import (
    STATE_SCHEMA,
    STATE_TABLE,
    Dialect,
    add_column_sql,
    create_table_sql,
    merge_plan,
    state_merge_sql,
    state_params,
)

__all__ = ["DuckDBAdapter", "arrow_schema_logical"]

# A checkpoint vacuums the row groups it rewrites that hold deleted rows. After a MERGE that updates
# 5 % of a 1M-row table (DELETE + INSERT) that rewrites most of the table — 0.5 s CPU to reclaim
# ~2 % of it, on every batch. So a MERGE leaves vacuuming off until deleted rows are this share of
# the target; then its commit is checkpointed with vacuuming on.
VACUUM_DEAD_SHARE = 0.2


class DuckDBAdapter(DuckDBFile):
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
        super().__init__(path, lock_timeout, threads, memory_limit)
        self.meta_dataset = meta_dataset
        self.labels = clean_labels(labels or {})
        self.jobs: list[JobStats] = []
        # the catalog DuckDB names after the file; qualifying with it keeps "x"."t" unambiguous when a
        # schema has the file's name (bench.duckdb + schema bench)
        catalog = Path(self.path).name.split(".")[0] if self.path != ":memory:" else "memory"  # as DuckDB names it
        self._sql = Dialect("duckdb", project=catalog)
        self._state_ready = False

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
        clone._session = self._session
        return clone

    def stages_in_memory(self) -> bool:
        """Inside a :meth:`session` every operation uses its one connection, so a load's staging
        table can be a temporary table of that connection (:func:`~opsloop.warehouse.write.staging_ref`)."""
        return self._session.con is not None

    def param(self, name: str) -> str:
        return self._sql.param(name)

    def quote(self, ref: TableRef | str) -> str:
        return self._sql.table(ref) if isinstance(ref, TableRef) else self._sql.ident(ref)

    def defer_vacuum(self, *refs: TableRef, dead_share: float = VACUUM_DEAD_SHARE, defer: bool = True) -> bool:
        """Inside a :meth:`session`: let its checkpoints (the one when it closes included) leave row
        groups as they are — no vacuum — unless one of ``refs`` already holds more than
        ``dead_share`` deleted rows (then vacuuming stays on and reclaims them, as after a MERGE).
        For a run of writes in several sessions, such as the sync log's flushes: with vacuuming on,
        each one's checkpoint rewrites row groups the previous ones wrote — an append-only log's
        last row groups, merged again at every append; a state table's row groups that lost rows,
        though the next flushes delete the rest of them. A row group whose rows were all deleted is
        dropped either way. ``defer=False`` turns vacuuming back on for the session. Returns True
        when vacuuming was deferred (outside a session: nothing done, False)."""
        if self._session.con is None:
            return False
        with self.connect() as con:
            for ref in refs if defer else ():
                physical, live = self._row_counts(con, ref)
                if physical - live > dead_share * physical:
                    defer = False
                    break
            con.execute("SET max_vacuum_tasks = 0" if defer else "RESET max_vacuum_tasks")
        return defer

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
            # duckdb_columns() directly: information_schema.columns is a view over it (3 ms → 1.3 ms)
            rows = con.execute(
                "SELECT column_name, data_type, is_nullable FROM duckdb_columns() "
                "WHERE schema_name = ? AND table_name = ? ORDER BY column_index",
                [self._sql.dataset(ref.dataset), ref.table],
            ).fetchall()
        if not rows:
            return None
        return TableSchema(tuple(Column(n, logical(t), bool(nl)) for n, t, nl in rows))

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
        reader = pa.RecordBatchReader.from_batches(schema, pulled(batches, raised))
        if not ref.temp:
            self.ensure_dataset(ref.dataset)
        create = "CREATE OR REPLACE TEMP TABLE" if ref.temp else "CREATE OR REPLACE TABLE"
        try:
            with self.connect() as con, self._one_thread(con):
                con.register("_opsloop_src", reader)
                con.execute(f"{create} {self._sql.table(ref)} AS SELECT * FROM _opsloop_src")
                con.unregister("_opsloop_src")
                (rows,) = con.execute(f"SELECT count(*) FROM {self._sql.table(ref)}").fetchone() or (0,)
        except Exception as exc:
            if raised and raised[0] is not exc:
                raise raised[0] from exc  # e.g. the NULL-merge-key check or a source error, by its own text
            raise
        pa.default_memory_pool().release_unused()  # the batches are in DuckDB: their freed pages go back now
        return self._record("load", started, str(ref), rows=int(rows))

    def insert_batches(
        self,
        ref: TableRef,
        batches: Iterable[pa.RecordBatch],
        schema: pa.Schema,
        columns: Sequence[str] | None = None,
        skip_flag: str | None = None,
    ) -> JobStats:
        """Stream batches straight into the existing table ``ref`` (``columns``, default all, by name;
        rows whose ``skip_flag`` column is true are left out). Inside :meth:`transaction` nothing is
        visible until the commit; large appends go to the file as they arrive (bounded memory)."""
        started = time.perf_counter()
        raised: list[BaseException] = []
        reader = pa.RecordBatchReader.from_batches(schema, pulled(batches, raised))
        cols = ", ".join(self._sql.ident(n) for n in (columns or schema.names))
        where = f" WHERE NOT COALESCE({self._sql.ident(skip_flag)}, FALSE)" if skip_flag else ""
        try:
            with self.connect() as con, self._one_thread(con):
                con.register("_opsloop_src", reader)
                try:
                    sql = f"INSERT INTO {self._sql.table(ref)} ({cols}) SELECT {cols} FROM _opsloop_src{where}"
                    (rows,) = con.execute(sql).fetchone() or (0,)
                finally:
                    con.unregister("_opsloop_src")
        except Exception as exc:
            if raised and raised[0] is not exc:
                raise raised[0] from exc
            raise
        return self._record("insert", started, str(ref), rows=int(rows), inserted=int(rows))

    def append(self, ref: TableRef, data: pa.Table, job_key: str | None = None, checked: bool = False) -> JobStats:
        """Append rows (logs, ledgers); creates the table from the data's schema when missing.
        ``checked``: the caller ensured the table and its columns already (three catalog queries
        less — a CRM push's sync-log flushes append to tables ensured when the push began)."""
        started = time.perf_counter()
        if not checked:
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
        """MERGE staging into target (:func:`merge_plan`'s DELETE + INSERT form) and, in the same
        transaction, commit the state row."""
        started = time.perf_counter()
        # the staged batches are in DuckDB now; Arrow's allocator keeps the pages they freed (≈25 MB
        # per 100k CDC changes) unless told, and DuckDB's working memory would add to them at the peak
        pa.default_memory_pool().release_unused()
        plan = merge_plan(self._sql, spec, staging)
        if state is not None:
            self._ensure_state_table()
        vacuum = False
        with self.transaction(), self.connect() as con:
            physical, live = self._row_counts(con, spec.target)
            for stmt in plan.statements:
                con.execute(stmt)
                duckdb_release_unused()
            assert plan.counts is not None
            inserted, updated, deleted = con.execute(plan.counts).fetchone() or (0, 0, 0)
            for stmt in plan.cleanup:
                con.execute(stmt)
            duckdb_release_unused()
            faults.checkpoint("after_merge_before_state")
            if state is not None:
                con.execute(state_merge_sql(self._sql, self.meta_dataset), state_params(state))
                duckdb_release_unused()
            # an update is a delete + an insert: the old version stays in the file until a vacuum
            physical += inserted + updated
            dead = physical - (live + inserted - deleted)
            vacuum = dead > VACUUM_DEAD_SHARE * physical
            con.execute("RESET max_vacuum_tasks" if vacuum else "SET max_vacuum_tasks = 0")
        duckdb_release_unused()
        if vacuum:  # now, while the row groups this MERGE changed are the dirty ones; skipped (a later
            # checkpoint vacuums) when another transaction of this process is open
            with self.connect() as con, contextlib.suppress(duckdb.TransactionException):
                con.execute("CHECKPOINT")
        return self._record(
            "merge",
            started,
            str(spec.target),
            rows=int(inserted + updated + deleted),
            inserted=int(inserted),
            updated=int(updated),
            deleted=int(deleted),
        )

    def _row_counts(self, con: duckdb.DuckDBPyConnection, ref: TableRef) -> tuple[int, int]:
        """(rows stored incl. deleted ones not vacuumed yet, live rows) of a table."""
        row = con.execute(
            "SELECT estimated_size FROM duckdb_tables() WHERE database_name = ? AND schema_name = ? AND table_name = ?",
            [self._sql.project, self._sql.dataset(ref.dataset), ref.table],
        ).fetchone()
        (live,) = con.execute(f"SELECT count(*) FROM {self._sql.table(ref)}").fetchone() or (0,)
        return max(int(row[0]) if row else 0, int(live)), int(live)

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
        outer = self._session.con
        # in a session, a cursor (its own connection to the same database) keeps the stream alive while
        # the consumer runs other operations on the session connection
        with contextlib.closing(outer.cursor()) if outer is not None else self.connect() as con:
            try:
                reader = con.sql(sql, params=dict(params) if params else None).to_arrow_reader(batch_rows)
                for batch in reader:
                    total += batch.num_rows
                    yield batch
            except duckdb.Error as exc:
                raise translate(exc, self.path) from exc
        self._record("read", started, rows=total)

    # -- state ---------------------------------------------------------------------------------
    def _ensure_state_table(self) -> None:
        if not self._state_ready:
            self.ensure_table(TableRef(self.meta_dataset, STATE_TABLE), STATE_SCHEMA)
            self._state_ready = not self._session.in_tx  # a rollback would undo the CREATE

    def get_state(self, pipeline: str, source: str) -> dict[str, Any] | None:
        self._ensure_state_table()
        t = self._sql.table(TableRef(self.meta_dataset, STATE_TABLE))
        found = self.query(
            f"SELECT * FROM {t} WHERE pipeline = $pipeline AND source = $source",
            {"pipeline": pipeline, "source": source},
        )
        rows = pyvalues.rows(found)  # without pyarrow's pandas-backed timestamp conversion
        return rows[0] if rows else None

    def commit_state(self, state: StateUpdate) -> JobStats:
        started = time.perf_counter()
        self._ensure_state_table()
        with self.connect() as con:
            con.execute(state_merge_sql(self._sql, self.meta_dataset), state_params(state))
        return self._record("state", started, f"{self.meta_dataset}.{STATE_TABLE}", rows=1)

    def close(self) -> None:
        """Nothing stays open between operations (a :meth:`session` closes at the end of its block)."""
