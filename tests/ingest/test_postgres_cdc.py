"""Postgres CDC (pgoutput slot + publication) against a real PostgreSQL, into DuckDB."""

from __future__ import annotations

import dataclasses
import time
import uuid

import psycopg
import pyarrow as pa
import pytest

from opsloop import faults
from opsloop.devstack.postgres import PgCluster
from opsloop.errors import ConfigError, InjectedFault, TerminalError
from opsloop.ingest.loader import LoadResult, StreamLoader
from opsloop.sources.base import LoadRequest
from opsloop.sources.pgcdc import PostgresCdc, flushed_end
from opsloop.sources.pgoutput import lsn_to_int
from opsloop.sources.postgres import PostgresSource
from tests.ingest.conftest import (
    SALT,
    exec_sql,
    make_spec,
    run_ingest,
    seed_items,
    slot_info,
    source_rows,
    target_rows,
)

CHANGES = (
    "INSERT INTO items (id, name, amount, qty, active) VALUES (1001, 'new', 9.99, 1, true)",
    "UPDATE items SET name = 'renamed', amount = amount + 1, updated_at = now() WHERE id IN (1, 2, 3)",
    "DELETE FROM items WHERE id IN (4, 5)",
    "UPDATE items SET id = 2000, updated_at = now() WHERE id = 6",  # key change = delete + insert
    "BEGIN; INSERT INTO items (id, name) VALUES (1002, 'tmp'); UPDATE items SET name = 'tmp2' WHERE id = 1002; "
    "DELETE FROM items WHERE id = 1002; COMMIT",  # born and gone inside one transaction
    "BEGIN; UPDATE items SET qty = 100 WHERE id = 7; UPDATE items SET qty = 101 WHERE id = 7; COMMIT",
)


@pytest.mark.parametrize("delete_mode", ["hard", "soft"])
def test_cdc_replicates_inserts_updates_deletes(pg_dsn, wh, slots, delete_mode) -> None:
    seed_items(pg_dsn)
    spec = make_spec("cdc", delete_mode=delete_mode)
    slots.append(spec.cdc.slot_name)
    first = run_ingest(wh, spec, pg_dsn, "r1")
    assert first["streams"]["items"]["kind"] == "snapshot"
    assert first["inserted"] == 50 and target_rows(wh) == source_rows(pg_dsn)
    exec_sql(pg_dsn, *CHANGES)
    second = run_ingest(wh, spec, pg_dsn, "r2")
    assert second["streams"]["items"]["kind"] == "incremental"
    assert (second["inserted"], second["deleted"]) == ((2, 3) if delete_mode == "hard" else (2, 0))
    if delete_mode == "hard":
        assert target_rows(wh) == source_rows(pg_dsn)
    else:
        live = target_rows(wh, where="WHERE NOT _deleted")
        assert live == source_rows(pg_dsn)
        gone = wh.query("SELECT id, name FROM ops.items WHERE _deleted ORDER BY id").to_pylist()
        # soft-deleted rows keep the values they had (filled from the target, not NULLed)
        assert gone == [{"id": 4, "name": "name 4"}, {"id": 5, "name": "name 5"}, {"id": 6, "name": "name 6"}]
    assert wh.query("SELECT qty FROM ops.items WHERE id = 7").to_pylist() == [{"qty": 101}]
    state = wh.get_state("t", "pg.items")
    assert state and lsn_to_int(state["cursor"]) > lsn_to_int(first["cursor_after"])
    info = slot_info(pg_dsn, spec.cdc.slot_name)
    assert info and lsn_to_int(info["confirmed"]) == lsn_to_int(state["cursor"])
    third = run_ingest(wh, spec, pg_dsn, "r3")  # nothing new: changes nothing
    assert (third["inserted"], third["updated"], third["deleted"]) == (0, 0, 0)


def test_change_between_snapshot_and_stream_is_applied_exactly_once(pg_dsn, wh, slots) -> None:
    seed_items(pg_dsn, 20)
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    src = spec.source("pg")

    def concurrent_writes() -> None:  # commits after the exported snapshot, before the stream
        exec_sql(
            pg_dsn,
            "UPDATE items SET qty = qty + 1000, updated_at = now() WHERE id = 1",
            "INSERT INTO items (id, name) VALUES (500, 'during snapshot')",
            "DELETE FROM items WHERE id = 2",
        )

    loader = StreamLoader(wh, spec, src, "r1", SALT)
    PostgresCdc(PostgresSource(pg_dsn, spec, src), loader, after_snapshot_export=concurrent_writes).run()
    run = loader.runs["items"]
    assert run.rows_read == 20 + 3  # the snapshot did not see the writes; the stream did, once
    assert (run.inserted, run.updated, run.deleted) == (20 + 1, 1, 1)
    assert target_rows(wh) == source_rows(pg_dsn)
    assert wh.query("SELECT qty, _lsn > 0 AS streamed FROM ops.items WHERE id = 1").to_pylist() == [
        {"qty": 1001, "streamed": True}
    ]


def _fault(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    faults.reset()
    monkeypatch.setenv("OPSLOOP_FAULT", f"{point}:raise")


def test_crash_after_merge_before_slot_advance_then_rerun_equals_clean_run(pg_dsn, tmp_path, slots, monkeypatch):
    from opsloop.warehouse.duckdb import DuckDBAdapter

    seed_items(pg_dsn)
    crash_spec, clean_spec = make_spec("cdc"), make_spec("cdc")
    slots += [crash_spec.cdc.slot_name, clean_spec.cdc.slot_name]
    crashed, clean = DuckDBAdapter(tmp_path / "crash.duckdb"), DuckDBAdapter(tmp_path / "clean.duckdb")
    run_ingest(crashed, crash_spec, pg_dsn, "c1")
    run_ingest(clean, clean_spec, pg_dsn, "k1")
    exec_sql(pg_dsn, *CHANGES)
    before = slot_info(pg_dsn, crash_spec.cdc.slot_name)
    _fault(monkeypatch, "after_state_before_slot_advance")
    with pytest.raises(InjectedFault):
        run_ingest(crashed, crash_spec, pg_dsn, "c2")
    monkeypatch.delenv("OPSLOOP_FAULT")
    # the warehouse committed data + LSN; the slot did not move
    assert (
        slot_info(pg_dsn, crash_spec.cdc.slot_name)["confirmed"] == before["confirmed"]
    )  # restart_lsn is the server's
    committed = crashed.get_state("t", "pg.items")
    assert committed and lsn_to_int(committed["cursor"]) > lsn_to_int(before["confirmed"])
    rerun = run_ingest(crashed, crash_spec, pg_dsn, "c3")
    assert (rerun["inserted"], rerun["updated"], rerun["deleted"]) == (0, 0, 0)  # replay skipped
    run_ingest(clean, clean_spec, pg_dsn, "k2")
    cols = "id, name, email, email, amount, qty, active, updated_at, _lsn"
    assert target_rows(crashed, cols=cols) == target_rows(clean, cols=cols) != []
    assert target_rows(crashed) == source_rows(pg_dsn)
    after = slot_info(pg_dsn, crash_spec.cdc.slot_name)
    assert after and lsn_to_int(after["confirmed"]) >= lsn_to_int(committed["cursor"])


def test_slot_advance_follows_the_commit_and_finishes_when_the_settle_fails(pg_dsn, wh, slots) -> None:
    """The slot advance runs beside the sink's settle (DuckDB's checkpoint): it starts only after the
    warehouse committed the batch, and it is waited for even when the settle fails."""
    seed_items(pg_dsn)
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    run_ingest(wh, spec, pg_dsn, "r1")
    exec_sql(pg_dsn, *CHANGES)
    before = lsn_to_int(wh.get_state("t", "pg.items")["cursor"])
    seen: list[int] = []

    class FailingSettle(StreamLoader):
        def settle(self) -> None:
            seen.append(lsn_to_int(self.state("items")["cursor"]))  # the batch is committed already
            raise OSError("disk full during checkpoint")

    src = spec.source("pg")
    loader = FailingSettle(wh, spec, src, "r2", SALT)
    with pytest.raises(OSError, match="disk full"):
        PostgresCdc(PostgresSource(pg_dsn, spec, src), loader).run()
    committed = lsn_to_int(wh.get_state("t", "pg.items")["cursor"])
    assert seen == [committed] and committed > before
    assert lsn_to_int(slot_info(pg_dsn, spec.cdc.slot_name)["confirmed"]) == committed  # the advance finished
    assert target_rows(wh) == source_rows(pg_dsn)
    rerun = run_ingest(wh, spec, pg_dsn, "r3")
    assert (rerun["inserted"], rerun["updated"], rerun["deleted"]) == (0, 0, 0)


def test_change_batches_are_decoded_with_the_system_pool(pg_dsn, wh, slots) -> None:
    """A CDC batch is decoded in one go, loaded and freed: its Arrow buffers come from the system
    allocator, which returns them when they are freed (opsloop.heap); the snapshot's stream of COPY
    blocks keeps the stage's pool, and the pool in use before the run is restored after it."""
    seed_items(pg_dsn)
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    seen: list[tuple[str, str, str]] = []

    class PoolSpy(StreamLoader):
        def load(self, req: LoadRequest) -> LoadResult:
            batches = list(req.batches)
            seen.extend((req.kind, pa.default_memory_pool().backend_name, pool_of(b)) for b in batches)
            return super().load(dataclasses.replace(req, batches=iter(batches)))

    system = pa.system_memory_pool()
    base = system.bytes_allocated()

    def pool_of(batch: pa.RecordBatch) -> str:  # the batch is alive: the system pool holds its bytes
        return "system" if system.bytes_allocated() - base >= batch.nbytes > 0 else "other"

    src = spec.source("pg")
    before = pa.default_memory_pool().backend_name
    PostgresCdc(PostgresSource(pg_dsn, spec, src), PoolSpy(wh, spec, src, "r1", SALT)).run()
    exec_sql(pg_dsn, *CHANGES)
    PostgresCdc(PostgresSource(pg_dsn, spec, src), PoolSpy(wh, spec, src, "r2", SALT)).run()
    assert pa.default_memory_pool().backend_name == before
    kinds = {kind for kind, _, _ in seen}
    assert kinds == {"snapshot", "incremental"}
    assert all(pool != "system" for kind, pool, _ in seen if kind == "snapshot")
    assert all((pool, held) == ("system", "system") for kind, pool, held in seen if kind == "incremental")
    assert target_rows(wh) == source_rows(pg_dsn)


@pytest.mark.parametrize("point", ["after_extract", "after_stage_load", "after_merge_before_state"])
def test_slot_never_advances_past_an_uncommitted_load(pg_dsn, wh, slots, monkeypatch, point) -> None:
    seed_items(pg_dsn)
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    run_ingest(wh, spec, pg_dsn, "r1")
    exec_sql(pg_dsn, *CHANGES)
    before_slot, before_state = slot_info(pg_dsn, spec.cdc.slot_name), wh.get_state("t", "pg.items")
    before_rows = target_rows(wh)
    _fault(monkeypatch, point)
    with pytest.raises(InjectedFault):
        run_ingest(wh, spec, pg_dsn, "r2")
    monkeypatch.delenv("OPSLOOP_FAULT")
    assert slot_info(pg_dsn, spec.cdc.slot_name)["confirmed"] == before_slot["confirmed"]
    assert wh.get_state("t", "pg.items")["cursor"] == before_state["cursor"]
    assert target_rows(wh) == before_rows
    run_ingest(wh, spec, pg_dsn, "r3")
    assert target_rows(wh) == source_rows(pg_dsn)


def test_dropped_slot_needs_full_resync(pg_dsn, wh, slots) -> None:
    seed_items(pg_dsn, 10)
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    run_ingest(wh, spec, pg_dsn, "r1")
    exec_sql(pg_dsn, f"SELECT pg_drop_replication_slot('{spec.cdc.slot_name}')", "DELETE FROM items WHERE id = 1")
    with pytest.raises(TerminalError, match=r"no longer exists.*full resync.*full_refresh=True"):
        run_ingest(wh, spec, pg_dsn, "r2")
    out = run_ingest(wh, spec, pg_dsn, "r3", full_refresh=True)
    assert out["streams"]["items"]["kind"] == "snapshot" and "full_refresh" in out["snapshot_reason"]
    assert target_rows(wh) == source_rows(pg_dsn) and len(target_rows(wh)) == 9


def test_truncate_asks_for_a_resync(pg_dsn, wh, slots) -> None:
    seed_items(pg_dsn, 5)
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    run_ingest(wh, spec, pg_dsn, "r1")
    exec_sql(pg_dsn, "TRUNCATE items")
    with pytest.raises(TerminalError, match=r"TRUNCATE.*full_refresh=True"):
        run_ingest(wh, spec, pg_dsn, "r2")
    assert len(target_rows(wh)) == 5  # nothing deleted behind the operator's back


def test_slot_lag_is_reported_and_warned(pg_dsn, wh, slots) -> None:
    seed_items(pg_dsn, 5)
    exec_sql(pg_dsn, "CREATE TABLE noise (id int)")
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    spec = spec.model_copy(update={"cdc": spec.cdc.model_copy(update={"lag_warn_bytes": 0})})
    out = run_ingest(wh, spec, pg_dsn, "r1")
    assert out["slot_lag_bytes"] >= 0 and "slot_retained_bytes" in out
    exec_sql(pg_dsn, "INSERT INTO noise SELECT generate_series(1, 1000)")
    src = spec.source("pg")
    loader = StreamLoader(wh, spec, src, "r2", SALT)
    cdc = PostgresCdc(PostgresSource(pg_dsn, spec, src), loader)
    cdc.run()
    # the idle slot was moved past the unpublished table's WAL (state first, then the slot)
    assert lsn_to_int(slot_info(pg_dsn, spec.cdc.slot_name)["confirmed"]) == lsn_to_int(
        wh.get_state("t", "pg.items")["cursor"]
    )
    exec_sql(pg_dsn, "INSERT INTO noise SELECT generate_series(1, 1000)")  # WAL after the run's end point
    cdc2 = PostgresCdc(PostgresSource(pg_dsn, spec, src), StreamLoader(wh, spec, src, "r3", SALT))
    cdc2._lag(psycopg.connect(pg_dsn, autocommit=True))
    assert cdc2.report.slot_lag_bytes and cdc2.report.slot_lag_bytes > 0
    assert "lagWarnBytes" in cdc2.report.warnings[0]


def _role(cluster: PgCluster, dsn: str, *grants: str) -> str:
    role = f"r_{uuid.uuid4().hex[:8]}"
    exec_sql(cluster.dsn(), f"CREATE ROLE {role} LOGIN", *[g.format(role=role) for g in grants])
    return dsn.replace("postgres@", f"{role}@")


@pytest.mark.parametrize(
    ("grants", "message"),
    [
        ((), "lacks the REPLICATION privilege"),
        (("ALTER ROLE {role} REPLICATION",), r"needs CREATE on database"),
        (("ALTER ROLE {role} REPLICATION", "GRANT CREATE ON DATABASE {db} TO {role}"), "table ownership"),
    ],
)
def test_missing_privilege_is_named(pg_cluster, pg_dsn, wh, slots, grants, message) -> None:
    seed_items(pg_dsn, 3)
    db = pg_dsn.rsplit("/", 1)[1]
    dsn = _role(pg_cluster, pg_dsn, *[g.replace("{db}", db) for g in grants])
    exec_sql(pg_dsn, "GRANT SELECT ON items TO PUBLIC")
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    with pytest.raises(TerminalError, match=message):
        run_ingest(wh, spec, dsn, "r1")


def test_wal_level_and_replica_identity_are_checked(pg_dsn, wh, slots) -> None:
    exec_sql(pg_dsn, "CREATE TABLE nokey (id int, v text)")
    spec = make_spec("cdc", tables=["nokey"])
    slots.append(spec.cdc.slot_name)
    with pytest.raises(ConfigError, match="no replica identity"):
        run_ingest(wh, spec, pg_dsn, "r1")
    with psycopg.connect(pg_dsn) as c:
        assert c.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)


def test_unchanged_toasted_values_are_kept(pg_dsn, wh, slots) -> None:
    big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400))"  # ~13 kB, stored out of line
    exec_sql(
        pg_dsn,
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, updated_at timestamptz DEFAULT now())",
        "ALTER TABLE items ALTER COLUMN name SET STORAGE EXTERNAL",
        f"INSERT INTO items (id, name, qty) VALUES (1, {big}, 1)",
    )
    spec = make_spec("cdc")
    slots.append(spec.cdc.slot_name)
    run_ingest(wh, spec, pg_dsn, "r1")
    exec_sql(
        pg_dsn,
        "UPDATE items SET qty = 2 WHERE id = 1",  # name unchanged: pgoutput sends 'u' for it
        f"INSERT INTO items (id, name, qty) VALUES (2, {big}, 1)",
        "UPDATE items SET qty = 3 WHERE id = 2",  # same batch: the insert supplies the value
    )
    out = run_ingest(wh, spec, pg_dsn, "r2")
    assert (out["inserted"], out["updated"]) == (1, 1)
    cols = "id, name, qty"
    assert target_rows(wh, cols=cols) == source_rows(pg_dsn, cols=cols)
    assert all(len(r[1]) == 12800 for r in target_rows(wh, cols=cols))


def test_stream_end_is_flushed_without_waiting_for_the_wal_writer(pg_cluster: PgCluster, pg_dsn: str) -> None:
    """WAL no commit flushed (here an asynchronous commit — the test cluster runs with
    synchronous_commit=off — with the WAL writer waking every 10 s; in production the background
    writer's snapshot records or hint-bit page images after a big read) is flushed by a commit of the
    run's own instead of waited for: the run used to sit out FLUSH_WAIT_SECONDS."""
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            time.sleep(0.5)  # the WAL writer takes the new delay at its next wake-up
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE probe (x int)")
                for attempt in range(5):  # another client's synchronous commit could flush it first
                    conn.execute("INSERT INTO probe VALUES (%s)", (attempt,))
                    insert, flushed = conn.execute(
                        "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
                    ).fetchone()
                    if lsn_to_int(flushed) < lsn_to_int(insert):
                        break
                else:
                    pytest.fail("could not leave WAL unflushed to test with")
                started = time.monotonic()
                end = flushed_end(conn)
                took = time.monotonic() - started
                (after,) = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
        finally:
            admin.execute("ALTER SYSTEM RESET wal_writer_delay")
            admin.execute("SELECT pg_reload_conf()")
    assert lsn_to_int(end) >= lsn_to_int(insert) and lsn_to_int(after) >= lsn_to_int(end)
    assert took < 1.0, f"waited {took:.1f} s for the WAL writer"
