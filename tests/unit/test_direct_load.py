"""The direct (empty-target) load on DuckDB: committed pieces into a side table, then one
transaction that gates, renames it to the target and commits the position."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from opsloop.ingest import writer
from opsloop.ingest.writer import insert_direct, load_table
from opsloop.warehouse.base import MergeSpec, StateUpdate, TableRef, TableSchema
from opsloop.warehouse.duckdb import DuckDBAdapter

SCHEMA = pa.schema([("id", pa.int64()), ("v", pa.string())])
TARGET = TableRef("raw", "items")


def _batches(fail_at: int | None = None) -> Iterator[pa.RecordBatch]:
    for i in range(0, 35, 5):
        if fail_at is not None and i >= fail_at:
            raise RuntimeError("source went away")
        yield pa.record_batch(
            {"id": pa.array(range(i, i + 5), pa.int64()), "v": pa.array([f"v{j}" for j in range(i, i + 5)])},
            schema=SCHEMA,
        )


def _state() -> StateUpdate:
    return StateUpdate("p", "pg.items", "run-1", watermark="2026-11-27T00:00:00+00:00")


@pytest.fixture
def wh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DuckDBAdapter:
    monkeypatch.setattr(writer, "DIRECT_PIECE_ROWS", 10)
    adapter = DuckDBAdapter(tmp_path / "w.duckdb")
    adapter.ensure_dataset("raw")
    return adapter


def _load(wh: DuckDBAdapter, batches: Iterator[pa.RecordBatch], gate=lambda r: None):  # type: ignore[no-untyped-def]
    spec = MergeSpec(TARGET, ("id", "v"), ("id",))
    return insert_direct(wh, TARGET, TableSchema.from_arrow(SCHEMA), SCHEMA, batches, spec, _state, gate)


def test_pieces_then_one_swap_with_the_position(wh: DuckDBAdapter) -> None:
    res = _load(wh, _batches())
    assert res.inserted == res.rows_staged == 35
    assert [j.rows for j in res.jobs if j.kind == "insert"] == [10, 10, 10, 5]  # four committed pieces
    rows = wh.query("SELECT id, v FROM raw.items ORDER BY id").to_pylist()
    assert [r["id"] for r in rows] == list(range(35)) and rows[7]["v"] == "v7"
    assert wh.table_schema(load_table(TARGET)) is None
    assert (wh.get_state("p", "pg.items") or {}).get("watermark") is not None


def test_a_failure_mid_load_or_at_the_gate_leaves_no_target_and_no_position(wh: DuckDBAdapter) -> None:
    with pytest.raises(RuntimeError, match="source went away"):
        _load(wh, _batches(fail_at=25))  # after two committed pieces

    def gate(_: object) -> None:
        raise RuntimeError("quarantined share above the limit")

    with pytest.raises(RuntimeError, match="quarantined share"):
        _load(wh, _batches(), gate)
    for ref in (TARGET, load_table(TARGET)):
        assert wh.table_schema(ref) is None
    assert wh.get_state("p", "pg.items") is None
    assert _load(wh, _batches()).inserted == 35  # the rerun loads everything once
    assert wh.query("SELECT count(*) AS n, count(DISTINCT id) AS d FROM raw.items").to_pylist() == [{"n": 35, "d": 35}]


def test_an_empty_target_made_by_another_step_is_replaced_one_with_rows_is_refused(wh: DuckDBAdapter) -> None:
    wh.ensure_table(TARGET, TableSchema.from_arrow(SCHEMA))
    assert _load(wh, _batches()).inserted == 35
    with pytest.raises(Exception, match="appeared while its initial load ran"):
        _load(wh, _batches())
    assert wh.query("SELECT count(*) AS n FROM raw.items").to_pylist() == [{"n": 35}]


@pytest.mark.parametrize("limit", ["256MB", None])
def test_release_cache_evicts_the_cached_blocks_and_keeps_the_limit(tmp_path: Path, limit: str | None) -> None:
    adapter = DuckDBAdapter(tmp_path / "c.duckdb", memory_limit=limit)
    adapter.ensure_dataset("raw")
    with adapter.session():
        adapter.execute("CREATE TABLE raw.big AS SELECT range AS id, range::VARCHAR AS v FROM range(2000000)")
        adapter.query("SELECT sum(id) AS s, max(v) AS m FROM raw.big")

        def cached() -> tuple[int, str]:
            with adapter.connect() as con:
                row = con.execute(
                    "SELECT (SELECT sum(memory_usage_bytes) FROM duckdb_memory() WHERE tag = 'BASE_TABLE'), "
                    "current_setting('memory_limit')"
                ).fetchall()[0]
            return int(row[0]), str(row[1])

        before, limit_before = cached()
        assert before > 4 * 2**20  # the table's blocks stay in the pool after the statements
        adapter.release_cache()
        after, limit_after = cached()
    assert after < before / 4
    assert limit_after == limit_before  # the block's limit (or DuckDB's default) is back


def test_checkpoint_writes_the_session_wal_into_the_file_and_waits_outside_a_session(tmp_path: Path) -> None:
    adapter = DuckDBAdapter(tmp_path / "k.duckdb")
    adapter.ensure_dataset("raw")
    wal = tmp_path / "k.duckdb.wal"
    adapter.checkpoint()  # outside a session: nothing to do, no error
    with adapter.session():
        adapter.execute("CREATE TABLE raw.t AS SELECT range AS id FROM range(1000)")
        assert wal.exists() and wal.stat().st_size > 0  # committed, in the WAL only
        with adapter.transaction():
            adapter.execute("INSERT INTO raw.t VALUES (1000)")
            adapter.checkpoint()  # inside a transaction: waits for its end
            assert wal.stat().st_size > 0
        adapter.checkpoint()
        assert not wal.exists() or wal.stat().st_size == 0  # now in the database file
        assert adapter.query("SELECT count(*) AS n FROM raw.t").to_pylist() == [{"n": 1001}]
