"""The background flusher of a CRM push (crm/flusher.py) on a real DuckDB file."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from opsloop.crm.flusher import BackgroundFlusher
from opsloop.crm.synclog import SyncTables
from opsloop.warehouse.base import TableRef, TableSchema
from opsloop.warehouse.duckdb import DuckDBAdapter

REF = TableRef("opsloop_meta", "flush_probe")
SCHEMA = pa.schema([("k", pa.int64())])


def _wh(tmp_path: Path) -> DuckDBAdapter:
    wh = DuckDBAdapter(tmp_path / "wh.duckdb")
    wh.ensure_table(REF, TableSchema.from_arrow(SCHEMA))
    return wh


def _opens_elsewhere(path: str) -> bool:
    """Can another process open the file now (DuckDB: one process at a time)?"""
    code = f"import duckdb\ntry:\n    duckdb.connect({path!r}).close()\nexcept duckdb.Error:\n    raise SystemExit(3)"
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_flushes_run_in_order_one_at_a_time_on_one_thread(tmp_path: Path) -> None:
    wh = _wh(tmp_path)
    seen: list[tuple[int, str]] = []
    running = threading.Semaphore(1)

    def job(k: int) -> None:
        assert running.acquire(blocking=False), "two flushes at once"
        try:
            time.sleep(0.01)
            wh.append(REF, pa.table({"k": [k]}, schema=SCHEMA))
            seen.append((k, threading.current_thread().name))
        finally:
            running.release()

    flusher = BackgroundFlusher(SyncTables(wh, "p", "d"))
    for k in range(20):
        flusher.submit(job, k)
    assert flusher.finish() is None
    assert [k for k, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"sync-flush"}
    assert sorted(r["k"] for r in wh.query(f"SELECT k FROM {wh.quote(REF.dataset)}.flush_probe").to_pylist()) == list(
        range(20)
    )


def test_a_failed_flush_stops_the_next_hand_off_and_is_returned(tmp_path: Path) -> None:
    wh = _wh(tmp_path)
    done: list[int] = []

    def job(k: int) -> None:
        if k == 1:
            raise RuntimeError("flush 1 failed")
        done.append(k)

    flusher = BackgroundFlusher(SyncTables(wh, "p", "d"))
    flusher.submit(job, 0)
    flusher.submit(job, 1)
    with pytest.raises(RuntimeError, match="flush 1 failed"):
        flusher.submit(job, 2)
    err = flusher.finish()
    assert isinstance(err, RuntimeError) and done == [0]


@pytest.mark.slow
def test_the_file_is_held_between_flushes_and_let_go_when_idle(tmp_path: Path) -> None:
    wh = _wh(tmp_path)
    flusher = BackgroundFlusher(SyncTables(wh, "p", "d"), idle_seconds=6.0)
    try:
        flusher.submit(lambda: wh.append(REF, pa.table({"k": [1]}, schema=SCHEMA)))
        flusher.submit(lambda: None)  # returns once the first flush is done
        assert not _opens_elsewhere(wh.path)  # held for the next flush
        time.sleep(7.0)
        assert _opens_elsewhere(wh.path)  # nothing came for idle_seconds: closed
    finally:
        assert flusher.finish() is None
    assert wh.query(f"SELECT count(*) AS n FROM {wh.quote(REF.dataset)}.flush_probe").to_pylist() == [{"n": 1}]


def test_single_threaded_holds_only_inside_a_session_and_is_undone(tmp_path: Path) -> None:
    wh = DuckDBAdapter(tmp_path / "wh.duckdb", threads=2)

    def threads() -> int:
        with wh.connect() as con:
            return int(con.execute("SELECT current_setting('threads')").fetchone()[0])

    with wh.single_threaded():  # no session: each operation opens the file with its own settings
        assert threads() == 2
    with wh.session():
        with wh.single_threaded():
            assert threads() == 1
        assert threads() == 2


def test_a_checked_append_skips_the_catalog_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wh = _wh(tmp_path)
    reads: list[TableRef] = []
    schema_of = DuckDBAdapter.table_schema

    def counted(self: DuckDBAdapter, ref: TableRef) -> TableSchema | None:
        reads.append(ref)
        return schema_of(self, ref)

    monkeypatch.setattr(DuckDBAdapter, "table_schema", counted)
    wh.append(REF, pa.table({"k": [1]}, schema=SCHEMA), checked=True)
    assert reads == []
    wh.append(REF, pa.table({"k": [2]}, schema=SCHEMA))
    assert reads and set(reads) == {REF}
    assert wh.query(f"SELECT sum(k) AS s FROM {wh.quote(REF)}").column("s")[0].as_py() == 3
