"""The pipeline lease (``opsloop.lease``) on a real DuckDB warehouse: re-entry by the same root run,
a busy pipeline that makes another run wait and then fail naming the holder, stale takeovers (ttl
expired, holder process gone) and racing takers of which exactly one wins."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from opsloop.lease import LEASE_TABLE, RUNBOOK, PipelineBusyError, PipelineLease, holder_gone, process_identity
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.support.fixtures.core import REPO

PIPE = "customer_ops_ai"


def lease(wh: DuckDBAdapter, holder: str, **kw: object) -> PipelineLease:
    logs: list[str] = []
    kw.setdefault("wait", 0.0)
    kw.setdefault("poll", 0.05)
    lease = PipelineLease(wh, PIPE, holder, log=logs.append, **kw)  # type: ignore[arg-type]
    lease.logs = logs  # type: ignore[attr-defined]
    return lease


def rows(wh: DuckDBAdapter) -> list[dict[str, object]]:
    ref = TableRef(wh.meta_dataset, LEASE_TABLE)
    return wh.query(
        f"SELECT holder, holder_flow, holder_run, token FROM {wh.quote(ref)} ORDER BY acquired_at"
    ).to_pylist()


def test_take_reenter_by_the_same_root_and_release(duckdb_wh: DuckDBAdapter) -> None:
    root = lease(duckdb_wh, "root-run", flow="nightly")
    assert root.acquire() is True and root.owned
    # a stage subflow of the same root run re-enters: no second row, nothing to release
    sub = lease(duckdb_wh, "root-run", flow="ingest", run_id="ingest-run")
    before = root.current()
    assert sub.acquire() is False and not sub.owned and sub.token == root.token
    after = root.current()
    assert before is not None and after is not None and after.expires_at >= before.expires_at  # re-entry renews
    sub.release()
    assert [r["token"] for r in rows(duckdb_wh)] == [root.token], "a subflow's release dropped its root's lease"
    assert rows(duckdb_wh)[0]["holder_flow"] == "nightly"
    root.release()
    assert rows(duckdb_wh) == []
    # free again: any other run takes it at once
    other = lease(duckdb_wh, "manual-run", flow="ingest")
    assert other.acquire() is True
    other.release()


def test_second_holder_waits_then_fails_naming_the_holder(duckdb_wh: DuckDBAdapter) -> None:
    with lease(duckdb_wh, "nightly-run-1", flow="nightly", ttl=60) as held:
        manual = lease(duckdb_wh, "manual-run-2", flow="ingest", wait=1.0, poll=0.1, link=lambda r: f"http://ui/{r}")
        t0 = time.monotonic()
        with pytest.raises(PipelineBusyError) as err:
            manual.acquire()
        waited = time.monotonic() - t0
        assert held.owned and [r["holder"] for r in rows(duckdb_wh)] == ["nightly-run-1"], "the holder lost its lease"
    msg = str(err.value)
    assert 1.0 <= waited < 10, waited
    assert f"pipeline {PIPE} is being processed by flow run nightly-run-1 (nightly)" in msg, msg
    assert "<http://ui/nightly-run-1>" in msg and "warehouse.leaseWait 1 s" in msg and RUNBOOK in msg, msg
    assert "this ingest run changed nothing" in msg, msg
    assert any("waiting up to 1 s" in line and "nightly-run-1" in line for line in manual.logs), manual.logs  # type: ignore[attr-defined]
    assert manual.token is None and not manual.owned
    assert rows(duckdb_wh) == [], "the holder's lease was not released by its with block"


def test_waiter_gets_the_lease_once_the_holder_releases(duckdb_wh: DuckDBAdapter) -> None:
    held = lease(duckdb_wh, "run-a", ttl=60)
    assert held.acquire()
    timer = threading.Timer(0.5, held.release)
    timer.start()
    waiter = lease(duckdb_wh, "run-b", wait=20.0, poll=0.1)
    t0 = time.monotonic()
    assert waiter.acquire() is True
    assert time.monotonic() - t0 >= 0.4
    assert [r["holder"] for r in rows(duckdb_wh)] == ["run-b"]
    timer.join()
    waiter.release()


def test_stale_lease_is_taken_over_after_ttl(duckdb_wh: DuckDBAdapter) -> None:
    old = lease(duckdb_wh, "hung-run", flow="nightly", ttl=4.0)
    assert old.acquire()  # no heartbeat started: as if the holder hung
    quick = lease(duckdb_wh, "next-run", ttl=60)
    with pytest.raises(PipelineBusyError):
        quick.acquire()  # not stale yet: our own (live) process holds it
    expires = old.current().expires_at  # type: ignore[union-attr]
    time.sleep(max((expires - datetime.now(UTC)).total_seconds(), 0) + 0.3)
    nxt = lease(duckdb_wh, "next-run", flow="ingest", ttl=60)
    assert nxt.acquire() is True
    assert [r["holder"] for r in rows(duckdb_wh)] == ["next-run"]
    assert any("taking over the lease of flow run hung-run" in m and "not renewed since" in m for m in nxt.logs)  # type: ignore[attr-defined]
    # the old holder finds out at its next heartbeat and never deletes the new holder's row
    assert old.renew() is False and old.lost
    assert any("lease lost (now held by flow run next-run" in m for m in old.logs)  # type: ignore[attr-defined]
    old.release()
    assert [r["holder"] for r in rows(duckdb_wh)] == ["next-run"]
    nxt.release()


def test_heartbeat_keeps_a_short_lease_alive(duckdb_wh: DuckDBAdapter) -> None:
    with lease(duckdb_wh, "long-run", ttl=1.0) as held:
        time.sleep(2.0)  # twice the ttl: only the heartbeat (every ttl/4) keeps it fresh
        other = lease(duckdb_wh, "other-run")
        with pytest.raises(PipelineBusyError):
            other.acquire()
        assert not held.lost
    assert rows(duckdb_wh) == []


_TAKE_AND_DIE = """
import os, sys
from opsloop.lease import PipelineLease
from opsloop.warehouse.duckdb import DuckDBAdapter
lease = PipelineLease(DuckDBAdapter(sys.argv[1]), sys.argv[2], "killed-run", flow="nightly", ttl=3600, wait=0)
assert lease.acquire()
print(lease.token, flush=True)
os._exit(137)  # killed: no release, no heartbeat
"""


def test_holder_whose_process_is_gone_is_stale_at_once(duckdb_wh: DuckDBAdapter) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    proc = subprocess.run(
        [sys.executable, "-c", _TAKE_AND_DIE, duckdb_wh.path, PIPE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 137, proc.stderr
    dead_token = proc.stdout.strip()
    assert [r["token"] for r in rows(duckdb_wh)] == [dead_token]  # the dead run's lease is still there (ttl 1 h)
    nxt = lease(duckdb_wh, "rerun", ttl=60, wait=0.0)
    t0 = time.monotonic()
    assert nxt.acquire() is True  # no waiting for the hour-long ttl
    assert time.monotonic() - t0 < 5
    assert any("killed-run" in m and "its process on this machine is gone" in m for m in nxt.logs)  # type: ignore[attr-defined]
    assert [r["holder"] for r in rows(duckdb_wh)] == ["rerun"]
    nxt.release()


def test_holder_gone_only_when_provably_dead() -> None:
    me = process_identity()
    host, boot, ns, pid, start = me.split("|")
    assert pid == str(os.getpid()) and start
    assert holder_gone(me) is False  # alive
    assert holder_gone(f"{host}|{boot}|{ns}|{pid}|{int(start) + 1}") is True  # PID reused by another process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert holder_gone(f"{host}|{boot}|{ns}|{dead.pid}|{start}") is True  # PID gone (reaped)
    assert holder_gone(f"other-host|{boot}|{ns}|{dead.pid}|{start}") is False  # another machine: cannot tell
    assert holder_gone(f"{host}|other-boot|{ns}|{dead.pid}|{start}") is False  # before a reboot: cannot tell
    assert holder_gone("garbage") is False


class _RacingLease(PipelineLease):
    """Both takers find the pipeline free and both insert before either reads back (the window a
    real race hits by chance); ``stamp`` shifts this taker's acquired_at (a clock behind / ahead)."""

    barrier: threading.Barrier
    stamp: timedelta = timedelta(0)
    inserts = 0

    def _insert(self, now: datetime) -> str:
        self.inserts += 1
        first = self.inserts == 1
        if first:
            self.barrier.wait(timeout=60)  # both found the pipeline free
        token = super()._insert(now + self.stamp)
        if first:
            self.barrier.wait(timeout=60)  # both inserted before either reads back
        return token


def _racer(path: Path, holder: str, barrier: threading.Barrier, stamp: timedelta = timedelta(0)) -> _RacingLease:
    r = _RacingLease(DuckDBAdapter(path), PIPE, holder, ttl=60, wait=0.0, poll=0.05)
    r.barrier, r.stamp = barrier, stamp
    return r


@pytest.mark.parametrize("stamp", [0, -5, 5], ids=["same-clock", "a-clock-behind", "a-clock-ahead"])
def test_two_racing_takers_exactly_one_wins(tmp_path: Path, stamp: int) -> None:
    for round_ in range(3):
        path = tmp_path / f"race{round_}.duckdb"
        DuckDBAdapter(path).execute("SELECT 1")
        barrier = threading.Barrier(2)
        takers = {
            "taker-a": _racer(path, "taker-a", barrier, timedelta(seconds=stamp)),
            "taker-b": _racer(path, "taker-b", barrier),
        }
        results: dict[str, object] = {}

        def take(holder: str, takers: dict[str, _RacingLease] = takers, results: dict[str, object] = results) -> None:
            try:
                results[holder] = takers[holder].acquire()
            except PipelineBusyError as exc:
                results[holder] = exc

        threads = [threading.Thread(target=take, args=(h,)) for h in takers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(t.inserts >= 1 for t in takers.values()), "the race window was not hit"
        winners = [h for h, v in results.items() if v is True]
        losers = {h: v for h, v in results.items() if isinstance(v, PipelineBusyError)}
        assert len(winners) == 1 and len(losers) == 1, results
        (loser_msg,) = [str(v) for v in losers.values()]
        assert f"flow run {winners[0]}" in loser_msg
        assert [r["holder"] for r in rows(DuckDBAdapter(path))] == winners, "the loser left its row behind"
        assert takers[winners[0]].renew() is True


class _LateLease(PipelineLease):
    """Reads the lease table (free), then stalls until another run has taken the lease, then
    inserts a row stamped *earlier* than the winner's (a slower clock, or a long pause)."""

    before_insert: threading.Event
    go: threading.Event

    def _insert(self, now: datetime) -> str:
        self.before_insert.set()
        assert self.go.wait(30)
        return super()._insert(now - timedelta(seconds=30))


def test_late_insert_with_an_earlier_stamp_never_steals_the_lease(duckdb_wh: DuckDBAdapter) -> None:
    late = _LateLease(duckdb_wh, PIPE, "late-run", ttl=60, wait=0.0, poll=0.05)
    late.before_insert, late.go = threading.Event(), threading.Event()
    got: list[object] = []

    def run_late() -> None:
        try:
            got.append(late.acquire())
        except PipelineBusyError as exc:
            got.append(exc)

    t = threading.Thread(target=run_late)
    t.start()
    assert late.before_insert.wait(60)  # the late run saw a free pipeline
    first = lease(duckdb_wh, "first-run", ttl=60)
    assert first.acquire() is True  # meanwhile another run took it
    late.go.set()
    t.join(60)
    assert len(got) == 1 and isinstance(got[0], PipelineBusyError), f"two runs hold the lease: {got}"
    assert "flow run first-run" in str(got[0])
    assert first.renew() is True and not first.lost
    assert [r["holder"] for r in rows(duckdb_wh)] == ["first-run"]
    first.release()


def _race_child(path: str, holder: str, start: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    wh = DuckDBAdapter(path)
    while time.time() < start:
        time.sleep(0.001)
    try:
        out.put((holder, PipelineLease(wh, PIPE, holder, ttl=60, wait=0.0, poll=0.05).acquire()))
        time.sleep(3)  # keep the process (and so the lease) alive while the others look
    except PipelineBusyError as exc:
        out.put((holder, str(exc)))


@pytest.mark.slow  # spawns three interpreters
def test_racing_processes_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "race.duckdb"
    DuckDBAdapter(path).execute("SELECT 1")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 6  # spawned children import first, then all go at once
    procs = [ctx.Process(target=_race_child, args=(str(path), f"proc-{i}", start, out)) for i in range(3)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    winners = sorted(h for h, v in got.items() if v is True)
    assert len(winners) == 1, got
    for h, v in got.items():
        if h != winners[0]:
            assert isinstance(v, str) and f"flow run {winners[0]}" in v, (h, v)
    # the winner's process has exited without releasing: its lease is stale at once
    assert [r["holder"] for r in rows(DuckDBAdapter(path))] == winners
    later = lease(DuckDBAdapter(path), "after-race")
    assert later.acquire() is True
    assert datetime.now(UTC) - timedelta(minutes=5) < later.current().acquired_at  # type: ignore[union-attr]


@pytest.mark.slow  # 30 rounds on fresh files
def test_heartbeat_and_the_flows_own_writes_open_the_file_side_by_side(tmp_path: Path) -> None:
    """The heartbeat thread queries the warehouse while the flow's thread streams Arrow data into it:
    DuckDB failed such a write with "Table Function with name python_arrow_scan does not exist" when
    both threads created the file's database instance at once (in about half of the rounds here);
    ``DuckDBAdapter`` now opens one connection at a time per process."""
    errors: list[str] = []
    ref = TableRef("ops_ai", "events")
    data = pa.table({"n": pa.array([1, 2, 3], pa.int64())})
    for round_ in range(30):
        path = tmp_path / f"side{round_}.duckdb"
        DuckDBAdapter(path).append(ref, data)
        barrier = threading.Barrier(2)

        def beat(path: Path = path, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(30)
            try:
                DuckDBAdapter(path).query("SELECT COUNT(*) AS n FROM ops_ai.events")
            except Exception as exc:
                errors.append(f"heartbeat: {exc}")

        def write(path: Path = path, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(30)
            try:
                DuckDBAdapter(path).insert_batches(ref, data.to_batches(), data.schema)
            except Exception as exc:
                errors.append(f"write: {exc}")

        threads = [threading.Thread(target=beat), threading.Thread(target=write)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
