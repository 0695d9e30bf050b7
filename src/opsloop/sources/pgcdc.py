"""Postgres CDC through a logical replication slot (``pgoutput``) and a publication.

Per run:

1. **Setup**: ``wal_level`` must be ``logical``; the publication (``FOR TABLE`` the spec's tables)
   is created or extended; missing privileges are named (REPLICATION, CREATE on the database,
   table ownership).
2. **Initial snapshot** (first run, a new table, ``full_refresh``): the slot is (re)created over a
   replication connection with ``EXPORT_SNAPSHOT``; a REPEATABLE READ transaction imports that
   snapshot and COPYs every table. The snapshot sees exactly the data before the slot's consistent
   point, the slot streams exactly what committed after it: nothing lost, nothing twice. Snapshot
   rows carry ``_lsn = 0``, the position committed with them is the consistent point.
3. **Stream**: ``pg_logical_slot_peek_binary_changes`` in batches up to the WAL position at the start
   of the run; each batch is decoded (:mod:`pgoutput`), loaded per table (MERGE + the batch's end LSN
   in the same warehouse transaction), and only then is the slot advanced to that LSN. A crash
   between the two replays the batch next time; transactions at or below a table's committed LSN are
   skipped and the MERGE ignores rows whose ``_lsn`` is not newer, so the replay changes nothing.
4. **Lag**: ``pg_current_wal_lsn() − confirmed_flush_lsn`` is reported and warned about above
   ``cdc.lagWarnBytes``.

A slot that disappeared (or moved past what the warehouse committed) cannot be replayed from: the
run stops with an error that asks for ``full_refresh=True``, which re-snapshots.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, LiteralString

import psycopg
import pyarrow as pa
from psycopg import pq, sql

from opsloop import faults
from opsloop.errors import ConfigError, TerminalError, TransientError
from opsloop.heap import arrow_pool_for_one_shot_batches
from opsloop.sources.base import DELETED_COL, LSN_COL, SEQ_COL, LoadRequest, Position, Sink, parse_extra
from opsloop.sources.pgcdc_setup import ensure_publication
from opsloop.sources.pgchanges import TableChanges
from opsloop.sources.pgcopy import PgTable, copy_to_arrow, copy_values, describe_table
from opsloop.sources.pgoutput import ChangeBatch, lsn_to_int, lsn_to_str
from opsloop.sources.postgres import SourceReport, table_keys, translate
from opsloop.spec import TableSpec

if TYPE_CHECKING:
    from opsloop.sources.postgres import PostgresSource

FLUSH_WAIT_SECONDS = 10.0
INSERT_LSN = "SELECT pg_current_wal_insert_lsn()::text"
FLUSH_LSN = "SELECT pg_current_wal_flush_lsn()::text"


def flushed_end(conn: psycopg.Connection) -> str:
    """The WAL position to read up to, once it is flushed (logical decoding reads only flushed WAL).

    WAL that no commit flushed — an asynchronous commit, the background writer's snapshot record,
    page images for hint bits after a big read — can stay unflushed for seconds: the WAL writer
    flushes only whole pages unless an asynchronous commit waits. So when the position is ahead of
    the flushed one, a transaction that writes one logical-decoding message (which pgoutput passes
    on only to subscribers that ask for messages) commits synchronously: its commit comes after the
    position and flushes everything before it — a transaction that writes no WAL of its own would
    not. (A run right after another client's full-table read used to wait the whole
    ``FLUSH_WAIT_SECONDS``.)"""
    end = _lsn(conn, INSERT_LSN)
    if lsn_to_int(_lsn(conn, FLUSH_LSN)) >= lsn_to_int(end):
        return end
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'opsloop', 'flush')")
    deadline = time.monotonic() + FLUSH_WAIT_SECONDS
    while lsn_to_int(_lsn(conn, FLUSH_LSN)) < lsn_to_int(end) and time.monotonic() < deadline:
        time.sleep(0.05)
    return end


def _lsn(conn: psycopg.Connection, query: LiteralString) -> str:
    row = conn.execute(query).fetchone()
    assert row is not None
    return str(row[0])


class PostgresCdc:
    def __init__(
        self, src: PostgresSource, sink: Sink, after_snapshot_export: Callable[[], None] | None = None
    ) -> None:
        self.src = src
        self.sink = sink
        cdc = src.spec.cdc
        self.slot = cdc.slot_name or f"opsloop_{src.spec.name}"
        self.publication = cdc.publication or self.slot
        self.batch_changes = cdc.batch_changes
        self.lag_warn = cdc.lag_warn_bytes
        self.tables: dict[str, tuple[TableSpec, PgTable, tuple[str, ...]]] = {}
        self.after_snapshot_export = after_snapshot_export  # test hook: runs once the snapshot is pinned
        self.report = SourceReport(mode="cdc")

    # -- entry -------------------------------------------------------------------------------
    def run(self, full_refresh: bool = False) -> SourceReport:
        with self.src.connect() as conn:
            try:
                self._run(conn, full_refresh)
            except psycopg.Error as exc:
                raise translate(exc, f"CDC of source {self.src.source.id}") from exc
        return self.report

    def _run(self, conn: psycopg.Connection, full_refresh: bool) -> None:
        self._check_server(conn)
        for t in self.src.source.tables:
            info = describe_table(conn, t.name, t.columns)
            self.tables[info.name] = (t, info, table_keys(info, t))
        added = self._ensure_publication(conn)
        states = {name: self.sink.state(t.name) for name, (t, _, _) in self.tables.items()}
        extras = {name: parse_extra(s) for name, s in states.items()}
        gens = {e.get("gen") for e in extras.values()}
        slot = self._slot(conn)
        reasons = []
        if full_refresh:
            reasons.append("full_refresh requested")
        if any(s is None or not s.get("cursor") for s in states.values()):
            reasons.append("no committed position for " + ", ".join(n for n, s in states.items() if not s))
        elif len(gens) != 1 or None in gens:
            reasons.append("tables were snapshotted at different slot generations (an interrupted snapshot)")
        if added:
            reasons.append(f"table(s) {added} added to the publication")
        if any(e.get("slot") not in (None, self.slot) for e in extras.values()):
            reasons.append("the spec names a different slot than the one the state was built from")
        if reasons:
            self.report.details["snapshot_reason"] = "; ".join(reasons)
            cursors = self._snapshot(conn, slot)
        else:
            cursors = {n: lsn_to_int(str(s["cursor"])) for n, s in states.items() if s}
            self._check_slot(slot, cursors)
            self.report.cursor_before = lsn_to_str(min(cursors.values()))
        self._stream(conn, cursors, gen=self._gen)
        self._lag(conn)

    @property
    def _gen(self) -> str:
        return str(self.report.details.get("slot_generation", ""))

    # -- setup ---------------------------------------------------------------------------------
    def _check_server(self, conn: psycopg.Connection) -> None:
        row = conn.execute(
            "SELECT current_setting('wal_level'), current_user, current_database(), "
            "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)"
        ).fetchone()
        assert row is not None
        wal_level, self.user, self.database, can_replicate = row
        if wal_level != "logical":
            raise ConfigError(
                f"Postgres source {self.src.source.id}: wal_level is {wal_level!r}; CDC needs wal_level = logical "
                "(ALTER SYSTEM SET wal_level = logical, then restart the server)"
            )
        if not can_replicate:
            raise TerminalError(
                f"Postgres role {self.user!r} lacks the REPLICATION privilege needed for logical replication slot "
                f"{self.slot!r}: ALTER ROLE {self.user} REPLICATION (or connect as a role that has it)"
            )

    def _ensure_publication(self, conn: psycopg.Connection) -> list[str]:
        """Create the publication or add missing tables; returns the tables that were added."""
        infos = [info for _, info, _ in self.tables.values()]
        return ensure_publication(conn, self.publication, infos, role=self.user, database=self.database)

    def _slot(self, conn: psycopg.Connection) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT plugin, confirmed_flush_lsn::text, active, database FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        ).fetchone()
        if row is None:
            return None
        plugin, confirmed, active, database = row
        return {"plugin": plugin, "confirmed": confirmed, "active": active, "database": database}

    def _check_slot(self, slot: dict[str, Any] | None, cursors: dict[str, int]) -> None:
        low = min(cursors.values())
        if slot is None:
            raise TerminalError(
                f"replication slot {self.slot!r} no longer exists (dropped?); the changes after LSN "
                f"{lsn_to_str(low)} committed in the warehouse cannot be replayed. A full resync is needed: "
                "rerun ingest with full_refresh=True"
            )
        if slot["plugin"] != "pgoutput" or slot["database"] != self.database:
            raise TerminalError(
                f"replication slot {self.slot!r} belongs to plugin {slot['plugin']!r} in database {slot['database']!r},"
                " not to this pipeline — choose another cdc.slotName"
            )
        confirmed = lsn_to_int(slot["confirmed"]) if slot["confirmed"] else 0
        if confirmed > low:
            raise TerminalError(
                f"replication slot {self.slot!r} is at {lsn_to_str(confirmed)}, past the position the warehouse "
                f"committed ({lsn_to_str(low)}): changes in between are lost. A full resync is needed: rerun ingest "
                "with full_refresh=True"
            )

    # -- snapshot ------------------------------------------------------------------------------
    def _snapshot(self, conn: psycopg.Connection, slot: dict[str, Any] | None) -> dict[str, int]:
        if slot is not None:
            self._drop_slot(conn)
        repl = self.src.connect(replication=True)
        try:
            res = repl.pgconn.exec_(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT")
                .format(sql.Identifier(self.slot))
                .as_bytes(repl)
            )
            if res.status != pq.ExecStatus.TUPLES_OK:
                msg = (res.error_message or b"").decode(errors="replace").strip()
                raise TerminalError(f"cannot create replication slot {self.slot!r}: {msg}")
            point = (res.get_value(0, 1) or b"").decode()
            snapshot = (res.get_value(0, 2) or b"").decode()
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        finally:
            repl.close()  # the importing transaction keeps the snapshot
        gen = lsn_to_int(point)
        self.report.details["slot_generation"] = point
        self.report.cursor_before = None
        if self.after_snapshot_export is not None:
            self.after_snapshot_export()
        try:
            for table, info, keys in self.tables.values():
                self._snapshot_table(conn, table, info, keys, point)
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return dict.fromkeys(self.tables, gen)

    def _snapshot_table(
        self, conn: psycopg.Connection, table: TableSpec, info: PgTable, keys: tuple[str, ...], point: str
    ) -> None:
        schema = info.arrow_schema().append(pa.field(LSN_COL, pa.int64())).append(pa.field(DELETED_COL, pa.bool_()))
        query = sql.SQL("SELECT {}, 0::bigint, false FROM {}").format(info.select_list(), info.ident)
        self.sink.load(
            LoadRequest(
                table,
                schema,
                copy_to_arrow(
                    conn,
                    query,
                    schema,
                    chunk_rows=self.src.source.chunk_rows,
                    what=f"snapshot COPY of {info.qualified}",
                ),
                position=lambda: Position(cursor=point, extra=self._extra(point)),
                order_by=(LSN_COL,),
                replace=True,
                kind="snapshot",
                keys=keys,
                unique=True,
            )
        )

    def _position(self, point: str, gen: str) -> Callable[[], Position]:
        return lambda: Position(cursor=point, extra=self._extra(gen))

    def _extra(self, gen: str) -> dict[str, Any]:
        return {"mode": "cdc", "slot": self.slot, "gen": gen}

    def _drop_slot(self, conn: psycopg.Connection) -> None:
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
        except psycopg.errors.ObjectInUse as exc:
            raise TransientError(f"replication slot {self.slot!r} is in use by another process: {exc}") from exc

    # -- stream --------------------------------------------------------------------------------
    def _peek(self, conn: psycopg.Connection, upto: str, batch: ChangeBatch) -> int:
        """Up to ``batch_changes`` changes (whole transactions) as one buffer, by binary COPY; returns
        the number of messages read."""
        query = sql.SQL(
            "SELECT data FROM pg_logical_slot_peek_binary_changes({}, {}::pg_lsn, {}, "
            "'proto_version', '1', 'publication_names', {})"
        ).format(*(sql.Literal(v) for v in (self.slot, upto, self.batch_changes, self.publication)))
        buf, starts, lens = copy_values(conn, query, f"peek of replication slot {self.slot!r}")
        batch.feed_buffer(buf, starts, lens)
        return len(starts)

    def _stream(self, conn: psycopg.Connection, cursors: dict[str, int], gen: str) -> None:
        # each batch is decoded in one go, loaded and freed: its pages go back when it is freed, not
        # after jemalloc's decay, which would keep them through the MERGE (opsloop.heap)
        with arrow_pool_for_one_shot_batches():
            self._stream_batches(conn, cursors, gen)

    def _stream_batches(self, conn: psycopg.Connection, cursors: dict[str, int], gen: str) -> None:
        upto = flushed_end(conn)
        if not gen:
            states = [parse_extra(self.sink.state(t.name)) for t, _, _ in self.tables.values()]
            gen = str(states[0].get("gen", "")) if states else ""
        batches = changes = 0
        while True:
            batch = ChangeBatch(
                {name: TableChanges(name, keys) for name, (_, _, keys) in self.tables.items()}, dict(cursors)
            )
            messages = self._peek(conn, upto, batch)
            if batch.end_lsn is None:
                break
            # Postgres stops decoding at the batch limit (after a whole transaction) or at ``upto``:
            # fewer messages than the limit means everything up to ``upto`` is in this batch, so it
            # commits that point — no second peek, no second (empty) commit and slot advance
            last = messages < self.batch_changes
            if batch.truncated:
                raise TerminalError(
                    f"table(s) {sorted(set(batch.truncated))} were TRUNCATEd in the source; CDC cannot express that "
                    "as row deletes. A full resync is needed: rerun ingest with full_refresh=True"
                )
            end = max(batch.end_lsn, lsn_to_int(upto)) if last else batch.end_lsn
            changes += sum(tc.changes for tc in batch.tables.values())
            data = self._arrow(batch.tables)
            del batch  # the peek's buffer: not held through the loads
            self._commit(conn, end, gen, cursors, data)
            batches += 1
            if last:
                break
        if cursors and lsn_to_int(upto) > min(cursors.values()):
            # nothing (more) published up to the run's end point: move state and slot there, so WAL of
            # unpublished tables is released instead of piling up behind an idle slot
            self._commit(conn, lsn_to_int(upto), gen, cursors, {})
        self.report.cursor_after = lsn_to_str(min(cursors.values())) if cursors else None
        self.report.details.update({"cdc_batches": batches, "cdc_changes": changes})

    def _arrow(self, changes: dict[str, TableChanges]) -> dict[str, pa.RecordBatch]:
        """Each table's changes as one batch, latest version per key (tables without changes left out)."""
        out = {}
        for name, (_, info, _) in self.tables.items():
            tc = changes.get(name)
            if tc is not None and tc.rows:
                out[name] = tc.to_arrow({c.name: c for c in info.columns}, [c.name for c in info.columns])
        return out

    def _commit(
        self, conn: psycopg.Connection, end: int, gen: str, cursors: dict[str, int], data: dict[str, pa.RecordBatch]
    ) -> None:
        """Load every table's changes up to ``end`` (MERGE + position in one warehouse transaction
        per table), then — and only then — advance the slot to ``end``. ``data`` is emptied: a
        table's batch is freed once its load has read it."""
        point = lsn_to_str(end)
        for name, (table, info, keys) in self.tables.items():
            schema = data[name].schema if name in data else self._empty_schema(info)
            self.sink.load(
                LoadRequest(
                    table,
                    schema,
                    iter([data.pop(name)]) if name in data else [],
                    position=self._position(point, gen),
                    order_by=(LSN_COL,),
                    tiebreak=SEQ_COL,
                    kind="incremental",
                    position_before=Position(cursor=lsn_to_str(cursors[name])),
                    keys=keys,
                )
            )
            cursors[name] = max(cursors[name], end)
        faults.checkpoint("after_state_before_slot_advance")
        self._advance(conn, point)

    def _advance(self, conn: psycopg.Connection, point: str) -> None:
        """Advance the slot to ``point`` (Postgres decodes the WAL up to it once more: ~0.08 s per
        100k changes) while the sink settles what it committed (DuckDB: the checkpoint, which would
        otherwise follow when the session closes). Both wait outside the GIL; the slot's move is
        confirmed, or its error raised, before this returns."""
        failed: list[BaseException] = []

        def advance() -> None:
            try:
                conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, point))
            except BaseException as exc:  # raised below, on the caller's thread
                failed.append(exc)

        mover = threading.Thread(target=advance, name="opsloop-slot-advance", daemon=True)
        mover.start()
        try:
            self.sink.settle()
        finally:
            mover.join()
        if failed:
            raise failed[0]

    def _empty_schema(self, info: PgTable) -> pa.Schema:
        return (
            info.arrow_schema()
            .append(pa.field(LSN_COL, pa.int64()))
            .append(pa.field(SEQ_COL, pa.int64()))
            .append(pa.field(DELETED_COL, pa.bool_()))
        )

    def _lag(self, conn: psycopg.Connection) -> None:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (self.slot,),
        ).fetchone()
        if row is None:
            return
        self.report.slot_lag_bytes, self.report.slot_retained_bytes = int(row[0] or 0), int(row[1] or 0)
        if self.report.slot_lag_bytes > self.lag_warn:
            self.report.warnings.append(
                f"replication slot {self.slot!r} lags {self.report.slot_lag_bytes} bytes of WAL behind the server, "
                f"above cdc.lagWarnBytes ({self.lag_warn}); the source keeps that WAL until ingest catches up"
            )
