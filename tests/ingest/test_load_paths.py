"""The fast load paths: the threaded COPY reader, pgoutput tuple decoding, the DuckDB MERGE's vacuum
policy and the one-thread streaming insert."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from opsloop.errors import TerminalError, TransientError
from opsloop.sources import pgtuples
from opsloop.sources.pgcopy import FIRST_BLOCK_BYTES, copy_to_arrow
from opsloop.sources.postgres import connect
from opsloop.transform.dedup import has_duplicates, latest_per_key
from opsloop.transform.pyvalues import from_numpy
from opsloop.warehouse.base import Column, MergeSpec, TableRef, TableSchema
from opsloop.warehouse.duckdb import VACUUM_DEAD_SHARE, DuckDBAdapter


def _readers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "opsloop-copy-reader"]


def test_copy_blocks_hold_whole_rows(pg_dsn: str) -> None:
    """Tiny blocks (3 rows / 64 bytes): values with newlines, quotes and commas never split across
    blocks, NULL stays NULL and '' stays ''; the batches keep the source order."""
    values = ["a,b", 'say "hi"', "two\nlines", "", None, "x" * 200, "é ü ß", "last\r\nrow"]
    with connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE t (id int, v text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO t VALUES (%s, %s)", list(enumerate(values)))
        schema = pa.schema([("id", pa.int64()), ("v", pa.string())])
        query = sql.SQL("SELECT id, v FROM t ORDER BY id")
        batches = list(copy_to_arrow(conn, query, schema, chunk_rows=3, chunk_bytes=64))
        # one block holds every row here: the batches are cut to chunk_rows all the same
        one_block = list(copy_to_arrow(conn, query, schema, chunk_rows=3, chunk_bytes=4 << 20))
    assert len(batches) >= 3 and all(b.num_rows <= 3 for b in batches)
    assert [b.num_rows for b in one_block] == [3, 3, 2]
    assert pa.Table.from_batches(one_block).equals(pa.Table.from_batches(batches))
    table = pa.Table.from_batches(batches)
    assert table.column("id").to_pylist() == list(range(len(values)))
    assert table.column("v").to_pylist() == values
    assert not _readers_alive()


def test_first_block_is_small_then_blocks_double(pg_dsn: str) -> None:
    """The consumer starts on a small first block instead of waiting for a full one; the blocks
    then double up to ``chunk_bytes``, and every row arrives once, in order."""
    with connect(pg_dsn) as conn:
        query = sql.SQL("SELECT g, repeat('x', 90) FROM generate_series(1, 200000) g")
        schema = pa.schema([("g", pa.int64()), ("x", pa.string())])
        batches = list(copy_to_arrow(conn, query, schema, chunk_rows=10**9, chunk_bytes=4 << 20))
    # the CSV bytes of each block: "<g>,<90 x>\n" per row
    sizes = [sum(len(str(g)) + 92 for g in b.column("g").to_pylist()) for b in batches]
    assert FIRST_BLOCK_BYTES <= sizes[0] < FIRST_BLOCK_BYTES + 100, sizes[:3]
    assert sizes[1] >= 2 * FIRST_BLOCK_BYTES and max(sizes) < (4 << 20) + 100, sizes
    assert pa.Table.from_batches(batches).column("g").to_pylist() == list(range(1, 200_001))


def test_consumer_stopping_early_leaves_the_connection_usable(pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        query = sql.SQL("SELECT g, repeat('x', 50) FROM generate_series(1, 300000) g")
        schema = pa.schema([("g", pa.int64()), ("x", pa.string())])
        gen = cast(Generator[pa.RecordBatch, None, None], copy_to_arrow(conn, query, schema, chunk_rows=1000))
        first = next(gen)
        assert first.num_rows == 1000 and first.column("g")[0].as_py() == 1
        gen.close()  # what a failing load does to its source
        assert not _readers_alive()
        assert conn.execute("SELECT 42").fetchone() == (42,)
        again = pa.Table.from_batches(list(copy_to_arrow(conn, query, schema, chunk_rows=100_000)))
        assert again.num_rows == 300_000 and again.column("g")[-1].as_py() == 300_000


def test_error_in_the_middle_of_a_copy_is_terminal(pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        query = sql.SQL("SELECT 1 / (g - 150000) FROM generate_series(1, 200000) g")  # fails at row 150000
        seen = 0
        with pytest.raises(TerminalError, match="division by zero"):
            for batch in copy_to_arrow(conn, query, pa.schema([("q", pa.int64())]), chunk_rows=10_000):
                seen += batch.num_rows
        assert 0 < seen < 150_000  # rows before the error arrived as the COPY went on
        assert not _readers_alive()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_lost_connection_during_a_copy_is_transient(pg_dsn: str) -> None:
    with connect(pg_dsn) as conn, psycopg.connect(pg_dsn, autocommit=True) as admin:
        pid = conn.info.backend_pid
        query = sql.SQL("SELECT g, pg_sleep(0.0002) FROM generate_series(1, 100000) g")  # ~20 s of rows
        schema = pa.schema([("g", pa.int64()), ("s", pa.string())])
        with pytest.raises(TransientError, match="connection lost"):
            for i, _ in enumerate(copy_to_arrow(conn, query, schema, chunk_rows=100)):
                if i == 0:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert not _readers_alive()


def test_tuple_decoding_at_the_end_of_the_buffer() -> None:
    """pgoutput TupleData: the one-gather path (kind + length) and the path for a tuple that ends the
    buffer (a NULL as its last byte) decode alike."""

    def tuple_bytes(values: list[bytes | None]) -> bytes:
        out = len(values).to_bytes(2, "big")
        for v in values:
            out += b"n" if v is None else b"t" + len(v).to_bytes(4, "big") + v
        return out

    rows: list[list[bytes | None]] = [[b"1", b"alpha", None], [b"22", b"", b"x" * 40], [b"333", None, None]]
    data = b"".join(tuple_bytes(r) for r in rows)
    starts = np.cumsum(np.array([0] + [len(tuple_bytes(r)) for r in rows[:-1]], dtype=np.int64))
    padded = pgtuples.decode(data + b"\x00" * 8, starts, 3)
    at_end = pgtuples.decode(data, starts, 3)
    expected = [[v.decode() if (v := r[j]) is not None else None for r in rows] for j in range(3)]
    for dec in (padded, at_end):
        assert [col.to_pylist() for col in dec.text] == expected
        assert not any(m.any() for m in dec.unchanged)


def test_integer_key_duplicates_by_sort() -> None:
    ints = pa.table({"k": from_numpy(np.array([5, 3, 9, 1], dtype=np.int64)), "v": pa.array(list("abcd"))})
    dup = pa.Table.from_batches([ints.to_batches()[0], ints.slice(1, 1).to_batches()[0]])  # 3 twice, two chunks
    assert not has_duplicates(ints, ["k"])
    assert has_duplicates(dup, ["k"])
    assert latest_per_key(dup, ["k"]).column("k").to_pylist() == [5, 9, 1, 3]  # the later 3 wins, batch order
    with_null = pa.table({"k": pa.array([1, None, None], pa.int64())})  # NULL keys: the hashing path
    assert has_duplicates(with_null, ["k"])


def _merge(wh: DuckDBAdapter, spec: MergeSpec, ids: np.ndarray, lsn: int, deleted: bool = False) -> None:
    n = len(ids)
    data = pa.table(
        {
            "id": from_numpy(ids.astype(np.int64)),
            "v": pa.array([f"v{lsn}"] * n, pa.string()),
            "_lsn": from_numpy(np.full(n, lsn, dtype=np.int64)),
            "_deleted": from_numpy(np.full(n, deleted)),
        }
    )
    stg = TableRef("raw", "_stg_t")
    wh.load_staging(stg, data, data.schema, job_key=f"t{lsn}")
    wh.merge(spec, stg)
    wh.drop_table(stg)


def test_merge_vacuums_only_past_the_dead_row_share(tmp_path: Path) -> None:
    """A MERGE that leaves few deleted rows turns DuckDB's checkpoint vacuum off (it would rewrite
    most row groups to reclaim a few percent); one that leaves more than VACUUM_DEAD_SHARE of the
    table deleted turns it on and checkpoints."""
    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    ref = TableRef("raw", "t")
    wh.ensure_table(ref, TableSchema((Column("id", "INT64"), Column("v", "STRING"), Column("_lsn", "INT64"))))
    spec = MergeSpec(ref, ("id", "v", "_lsn"), ("id",), ("_lsn",), delete_flag="_deleted")
    n = 300_000
    with wh.session():
        con = wh._session.con
        assert con is not None
        default = con.execute("SELECT current_setting('max_vacuum_tasks')").fetchone()
        _merge(wh, spec, np.arange(n), 1)
        _merge(wh, spec, np.arange(0, n, 20), 2)  # 5 % updated: an old version each, deleted
        assert con.execute("SELECT current_setting('max_vacuum_tasks')").fetchone() == (0,)
        _merge(wh, spec, np.arange(1, n, 2), 3, deleted=True)  # the odd half deleted (the updated ids are even)
        assert con.execute("SELECT current_setting('max_vacuum_tasks')").fetchone() == default
        assert con.execute("SELECT count(*), count(*) FILTER (WHERE v = 'v2') FROM raw.t").fetchone() == (
            n // 2,
            n // 20,
        )
    assert 0 < VACUUM_DEAD_SHARE < 1


def test_streaming_load_runs_on_one_thread_then_restores_the_setting(tmp_path: Path) -> None:
    wh = DuckDBAdapter(tmp_path / "w.duckdb", threads=2)
    seen: list[tuple[int, int]] = []

    def batches() -> Iterator[pa.RecordBatch]:
        con = wh._session.con
        assert con is not None
        cursor = con.cursor()  # another connection to the same database sees the global settings
        seen.append(
            cursor.execute(
                "SELECT current_setting('threads'), current_setting('write_buffer_row_group_count')"
            ).fetchone()
            or (0, 0)
        )
        yield pa.record_batch({"a": from_numpy(np.arange(10, dtype=np.int64))})

    with wh.session():
        job = wh.load_staging(TableRef("raw", "s"), batches(), pa.schema([("a", pa.int64())]), job_key="s")
        con = wh._session.con
        assert con is not None
        after = con.execute("SELECT current_setting('threads')").fetchone()
    assert job.rows == 10
    assert seen == [(1, 1)]
    assert after == (2,)
