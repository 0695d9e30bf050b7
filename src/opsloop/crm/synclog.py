"""The push's warehouse tables (all in the meta dataset) and how results are written.

* ``_sync_state`` — per pipeline + destination + entity: hash and values of the last payload the
  CRM **confirmed**, the bucket (for the significance rule), CRM id, run and time. Advanced only
  for confirmed records.
* ``_sync_log`` — one row per attempted record (or held by review), kept forever: run id,
  destination, entity, external id, payload hash, status (created | updated | failed | rejected |
  held | review_rejected), vendor error code / message, attempt, api, CRM id, time.
* ``_sync_retry`` — records whose last attempt failed: attempts so far and the payload hash; a
  success deletes the row; at ``sync.retryCap`` attempts the record is logged ``rejected`` and
  skipped until its payload changes.
* ``_sync_runs`` — one summary row per run and destination (calls used, calls left…); today's
  calls feed the ``sync.apiBudgetShare`` cap.

Order per flush: log (append) → ``after_push_before_sync_state`` → state MERGE → retry MERGE. A
crash after the log and before the state re-pushes those records next run (idempotent upserts by
external id), so the state never claims more than the CRM holds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from opsloop import faults
from opsloop.crm.base import BatchResult, outcome_arrays
from opsloop.warehouse.base import MergeSpec, TableRef, TableSchema, Warehouse

STATE, LOG, RETRY, RUNS = "_sync_state", "_sync_log", "_sync_retry", "_sync_runs"
TS = pa.timestamp("us", tz="UTC")

STATE_ARROW = pa.schema(
    [
        ("pipeline", pa.string()),
        ("destination", pa.string()),
        ("entity", pa.string()),
        ("external_id", pa.string()),
        ("payload_hash", pa.string()),
        ("payload", pa.string()),
        ("bucket", pa.string()),
        ("crm_id", pa.string()),
        ("run_id", pa.string()),
        ("pushed_at", TS),
    ]
)
LOG_ARROW = pa.schema(
    [
        ("run_id", pa.string()),
        ("pipeline", pa.string()),
        ("destination", pa.string()),
        ("entity", pa.string()),
        ("external_id", pa.string()),
        ("payload_hash", pa.string()),
        ("status", pa.string()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
        ("attempt", pa.int64()),
        ("api", pa.string()),
        ("crm_id", pa.string()),
        ("at", TS),
    ]
)
RETRY_ARROW = pa.schema(
    [
        ("pipeline", pa.string()),
        ("destination", pa.string()),
        ("entity", pa.string()),
        ("payload_hash", pa.string()),
        ("attempts", pa.int64()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
        ("run_id", pa.string()),
        ("updated_at", TS),
        ("_delete", pa.bool_()),
    ]
)
RUNS_ARROW = pa.schema(
    [
        ("run_id", pa.string()),
        ("pipeline", pa.string()),
        ("destination", pa.string()),
        ("dry_run", pa.bool_()),
        ("status", pa.string()),
        ("candidates", pa.int64()),
        ("pushed", pa.int64()),
        ("created", pa.int64()),
        ("updated", pa.int64()),
        ("failed", pa.int64()),
        ("rejected", pa.int64()),
        ("held", pa.int64()),
        ("deferred", pa.int64()),
        ("api_calls", pa.int64()),
        ("api_used", pa.int64()),
        ("api_limit", pa.int64()),
        ("api_left", pa.int64()),
        ("note", pa.string()),
        ("started_at", TS),
        ("finished_at", TS),
    ]
)
KEYS = ("pipeline", "destination", "entity")
# a push replaces most of a destination's state rows, flush by flush: vacuuming the state table before
# half of it is dead rewrites rows the next flushes delete anyway
STATE_DEAD_SHARE = 0.5


@contextlib.contextmanager
def held_open(wh: Warehouse) -> Iterator[None]:
    """DuckDB only: keep one connection open over a burst of warehouse operations, so each does not
    reopen (and checkpoint) the file — about 20× cheaper per operation. Used around the diff and
    each flush, never while waiting on the CRM, so other processes still get their turn."""
    connect = getattr(wh, "connect", None)
    if getattr(wh, "dialect", "") != "duckdb" or connect is None or str(getattr(wh, "path", "")) == ":memory:":
        yield
        return
    session = getattr(wh, "session", None)  # one connection for every operation in the block
    with session() if session is not None else connect():
        yield


def _duckdb(wh: Warehouse) -> bool:
    return getattr(wh, "dialect", "") == "duckdb" and callable(getattr(wh, "connect", None))


def _unique(table: pa.Table) -> bool:
    """True if no entity appears twice (then a plain delete + insert equals the MERGE)."""
    n = table.num_rows
    return n < 2 or pc.count_distinct(table.column("entity")).as_py() == n


@contextlib.contextmanager
def _transaction(wh: Warehouse) -> Iterator[None]:
    """The adapter's transaction when it has one (DuckDB: BEGIN … COMMIT on the held connection)."""
    tx = getattr(wh, "transaction", None)
    if tx is None:
        yield
        return
    with tx():
        yield


def schema_of(
    arrow: pa.Schema, drop: Sequence[str] = (), partition_by: str | None = None, cluster_by: Sequence[str] = ()
) -> TableSchema:
    fields = [f for f in arrow if f.name not in drop]
    return TableSchema.from_arrow(pa.schema(fields), partition_by=partition_by, cluster_by=cluster_by)


class SyncTables:
    """The four tables for one warehouse; ``slug`` names this destination's staging tables."""

    def __init__(self, wh: Warehouse, pipeline: str, destination: str) -> None:
        self.wh = wh
        self.pipeline = pipeline
        self.destination = destination
        meta = wh.meta_dataset
        self.state, self.log, self.retry, self.runs = (TableRef(meta, t) for t in (STATE, LOG, RETRY, RUNS))
        slug = re.sub(r"[^a-z0-9]+", "_", destination.lower()).strip("_")
        self.stg_state = TableRef(meta, f"_stg_sync_state_{slug}")
        self.stg_retry = TableRef(meta, f"_stg_sync_retry_{slug}")
        self._ensured = False  # ensure() ran: appends skip their own table check

    def ensure(self) -> None:
        """Create the four tables (or add missing columns); one schema read each when they exist."""
        wh = self.wh
        for ref, schema in (
            (self.state, schema_of(STATE_ARROW, cluster_by=("destination", "entity"))),
            (self.log, schema_of(LOG_ARROW, partition_by="at", cluster_by=("destination", "entity"))),
            (self.retry, schema_of(RETRY_ARROW, drop=("_delete",))),
            (self.runs, schema_of(RUNS_ARROW)),
        ):
            have = wh.table_schema(ref)
            if have is None or any(have.column(c.name) is None for c in schema.columns):
                wh.ensure_table(ref, schema)
        self._ensured = True

    # -- writing results -----------------------------------------------------------------------
    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.wh.append(self.log, pa.Table.from_pylist(rows, schema=LOG_ARROW))

    def flush(self, results: list[BatchResult], run_id: str, retry_cap: int, job_key: str) -> dict[str, Any]:
        """Write a run of batch results: log → (fault point) → state → retry. Returns status counts
        and, under ``failed_by_code``, the failed records per vendor error code.

        On DuckDB a flush's checkpoint writes its own rows and leaves the tables' others in place
        (no vacuum, which rewrote row groups of the earlier flushes at every flush) until deleted
        state / retry rows are more than half the table; then that flush's checkpoint vacuums. The
        session the run row is written in follows the same rule (it used to vacuum every time:
        ~0.6 s at the end of each 100k-record push, rewriting row groups the next push replaces).
        A row group whose rows were all deleted — a destination's rows replaced by a full push — is
        dropped at any checkpoint, so the tables stay within about twice their live rows.

        Built with Arrow compute from the staged rows (no per-row Python objects), then one append
        and one upsert per table (on DuckDB straight from the Arrow tables, in one transaction)."""
        results = [r for r in results if len(r)]
        if not results:
            return {}
        now = datetime.now(UTC)
        rows = pa.concat_tables([r.rows for r in results]).combine_chunks()
        n = rows.num_rows
        raw_status, crm_id, code, message = outcome_arrays(results)
        ok = pc.not_equal(raw_status, "failed")
        attempt = rows.column("attempt")
        status = pc.if_else(
            pc.and_(pc.invert(ok), pc.greater_equal(attempt, retry_cap)), pa.scalar("rejected"), raw_status
        )
        apis = {r.api for r in results}
        if len(apis) == 1:
            api = pa.repeat(pa.scalar(apis.pop(), pa.string()), n)
        else:
            api = pa.concat_arrays([pa.repeat(pa.scalar(r.api, pa.string()), len(r)) for r in results])

        def const(value: Any, k: int, typ: pa.DataType = pa.string()) -> pa.Array:
            return pa.repeat(pa.scalar(value, typ), k)

        log = pa.table(
            [
                const(run_id, n),
                const(self.pipeline, n),
                const(self.destination, n),
                rows.column("entity"),
                rows.column("external_id"),
                rows.column("payload_hash"),
                status,
                code,
                message,
                attempt,
                api,
                crm_id,
                const(now, n, TS),
            ],
            schema=LOG_ARROW,
        )
        good = rows.filter(ok)
        m = good.num_rows
        state = pa.table(
            [
                const(self.pipeline, m),
                const(self.destination, m),
                good.column("entity"),
                good.column("external_id"),
                good.column("payload_hash"),
                good.column("payload"),
                good.column("bucket"),
                crm_id.filter(ok),
                const(run_id, m),
                const(now, m, TS),
            ],
            schema=STATE_ARROW,
        )
        # failed records upsert their attempt count; confirmed ones delete a pending retry row
        need = pc.or_(pc.invert(ok), rows.column("pending_retry"))
        rt = rows.filter(need)
        k = rt.num_rows
        rt_ok = ok.filter(need)
        retry = pa.table(
            [
                const(self.pipeline, k),
                const(self.destination, k),
                rt.column("entity"),
                rt.column("payload_hash"),
                pc.if_else(rt_ok, pa.scalar(0, pa.int64()), rt.column("attempt")),
                pc.if_else(rt_ok, pa.scalar(None, pa.string()), code.filter(need)),
                pc.if_else(rt_ok, pa.scalar(None, pa.string()), message.filter(need)),
                const(run_id, k),
                const(now, k, TS),
                rt_ok,
            ],
            schema=RETRY_ARROW,
        )
        with held_open(self.wh):
            self._defer_vacuum()
            self.wh.append(self.log, log, checked=self._ensured)
            faults.checkpoint("after_push_before_sync_state")
            if _duckdb(self.wh) and _unique(state) and _unique(retry):
                self._upsert_duckdb(state, retry)
            else:
                if m:
                    self._merge(self.state, self.stg_state, state, f"{job_key}_state", order_by=("pushed_at",))
                if k:
                    self._merge(self.retry, self.stg_retry, retry, f"{job_key}_retry", delete_flag="_delete")
        counts: dict[str, Any] = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(status).to_pylist()}
        failed = pc.equal(raw_status, "failed")
        if pc.any(failed).as_py():
            by_code = pc.value_counts(pc.fill_null(code.filter(failed), "UNKNOWN")).to_pylist()
            counts["failed_by_code"] = {str(v["values"]): int(v["counts"]) for v in by_code}
        return counts

    def checkpoint(self) -> None:
        """DuckDB, inside a session (a background flush's): write the committed flushes into the file
        now, beside the push's last requests, instead of when the session closes after the last answer
        (100k-record HubSpot push: that closing checkpoint 0.07 → 0.02 s). Elsewhere: nothing."""
        checkpoint = getattr(self.wh, "checkpoint", None)
        if checkpoint is not None:
            checkpoint(release=False)

    def _defer_vacuum(self) -> None:
        """DuckDB, inside a session: its checkpoints leave row groups as they are unless the state or
        retry table holds more than :data:`STATE_DEAD_SHARE` deleted rows (see :meth:`flush`)."""
        defer_vacuum = getattr(self.wh, "defer_vacuum", None)
        if defer_vacuum is not None:
            defer_vacuum(self.state, self.retry, dead_share=STATE_DEAD_SHARE)

    def _upsert_duckdb(self, state: pa.Table, retry: pa.Table) -> None:
        """The state and retry upserts of one flush on DuckDB, in one transaction, reading the Arrow
        tables directly (no staging tables). Same outcome as the MERGEs of :meth:`_merge`: a state
        row replaces an older one (``pushed_at``), a retry row with ``_delete`` removes its entity.

        When every state row this destination holds is older than the flush's (the usual case: a
        flush's rows carry its own time), whatever matches is replaced: one join deletes, and every
        staged row is inserted without a second join to find the ones a newer row keeps out."""
        if not state.num_rows and not retry.num_rows:
            return
        wh = self.wh
        q = wh.quote
        on = " AND ".join(f"t.{q(c)} = s.{q(c)}" for c in KEYS)
        # every staged row is this pipeline's and destination's: naming them lets DuckDB skip the
        # other destinations' row groups of the target instead of joining against the whole table
        mine = f"t.{q('pipeline')} = $pipeline AND t.{q('destination')} = $destination"
        state_cols = ", ".join(q(c) for c in STATE_ARROW.names)
        retry_cols = ", ".join(q(c) for c in RETRY_ARROW.names if c != "_delete")
        pushed = q("pushed_at")
        delete_state = f"DELETE FROM {q(self.state)} t USING _opsloop_sync_state s WHERE {mine} AND {on}"
        insert_state = f"INSERT INTO {q(self.state)} ({state_cols}) SELECT {state_cols} FROM _opsloop_sync_state s"
        retry_sql = [
            f"DELETE FROM {q(self.retry)} t USING _opsloop_sync_retry s WHERE {mine} AND {on}",
            f"INSERT INTO {q(self.retry)} ({retry_cols}) SELECT {retry_cols} FROM _opsloop_sync_retry s "
            f"WHERE NOT s.{q('_delete')}",
        ]
        params = {"pipeline": self.pipeline, "destination": self.destination}
        with _transaction(wh), wh.connect() as con:  # type: ignore[attr-defined]
            con.register("_opsloop_sync_state", state)
            con.register("_opsloop_sync_retry", retry)
            try:
                statements: list[str] = []
                if state.num_rows:
                    row = con.execute(f"SELECT max({pushed}) FROM {q(self.state)} t WHERE {mine}", params).fetchone()
                    newest = row[0] if row else None
                    if newest is None or newest < pc.min(state.column("pushed_at")).as_py():
                        statements += [delete_state, insert_state]
                    else:  # a row as new as the flush's may be kept: only older ones are replaced
                        statements += [
                            f"{delete_state} AND (t.{pushed} IS NULL OR s.{pushed} > t.{pushed})",
                            f"{insert_state} WHERE NOT EXISTS (SELECT 1 FROM {q(self.state)} t WHERE {mine} AND {on})",
                        ]
                if retry.num_rows:
                    statements += retry_sql
                for sql in statements:
                    con.execute(sql, params if "$pipeline" in sql else None)
            finally:
                con.unregister("_opsloop_sync_state")
                con.unregister("_opsloop_sync_retry")

    def _merge(
        self,
        target: TableRef,
        stg: TableRef,
        table: pa.Table,
        job_key: str,
        order_by: tuple[str, ...] = (),
        delete_flag: str | None = None,
    ) -> None:
        self.wh.load_staging(stg, table, table.schema, job_key=job_key)
        columns = tuple(n for n in table.schema.names if n != delete_flag)
        self.wh.merge(
            MergeSpec(target, columns, KEYS, order_by=order_by, delete_flag=delete_flag), stg, job_key=job_key
        )
        self.wh.drop_table(stg)

    def record_run(self, row: dict[str, Any]) -> None:
        full = {name: row.get(name) for name in RUNS_ARROW.names}
        with held_open(self.wh):
            self._defer_vacuum()
            self.wh.append(self.runs, pa.Table.from_pylist([full], schema=RUNS_ARROW), checked=self._ensured)

    # -- reading -------------------------------------------------------------------------------
    def calls_today(self) -> int:
        """API calls opsloop spent on this destination since 00:00 UTC (dry runs included)."""
        p = self.wh.param
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        rows = self.wh.query(
            f"SELECT COALESCE(SUM(api_calls), 0) AS n FROM {self.wh.quote(self.runs)} "
            f"WHERE destination = {p('destination')} AND started_at >= {p('midnight')}",
            {"destination": self.destination, "midnight": midnight},
        ).to_pylist()
        return int(rows[0]["n"] or 0) if rows else 0
