"""opsloop.heap: the objects a stage starts with are frozen once per process; Arrow's and DuckDB's
allocators hand freed pages back where the stages need it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from opsloop.heap import arrow_pool_for_one_shot_batches


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_first_stage_freezes_what_exists_and_later_calls_do_nothing() -> None:
    # a fresh interpreter: the test process may have run a stage already
    got = _run(
        """
        import gc
        from opsloop.heap import freeze_startup_objects
        assert gc.get_freeze_count() == 0
        kept = [{"cycle": None}]
        kept[0]["cycle"] = kept
        assert freeze_startup_objects() is True
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen  # the imported modules' objects
        later = [{}]
        later[0]["self"] = later
        assert freeze_startup_objects() is False
        assert gc.get_freeze_count() == frozen  # objects made after the first call stay collectable
        del later
        assert gc.collect() >= 2  # the later cycle is reclaimed
        print("ok", frozen)
        """
    )
    assert got[0] == "ok"


def test_arrow_allocates_from_jemalloc_after_a_stage_starts() -> None:
    got = _run(
        """
        import pyarrow as pa
        try:
            jemalloc = pa.jemalloc_memory_pool()
        except NotImplementedError:
            jemalloc = None
        from opsloop.heap import arrow_pool_that_returns_memory
        before = pa.default_memory_pool().backend_name
        got = arrow_pool_that_returns_memory()
        assert got == pa.default_memory_pool().backend_name
        if jemalloc is None:
            assert got == before
        else:
            held = jemalloc.bytes_allocated()
            buf = pa.array(range(1 << 18), pa.int64()).buffers()[1]  # a new allocation, from the default pool
            assert jemalloc.bytes_allocated() - held >= buf.size, (held, jemalloc.bytes_allocated())
            assert arrow_pool_that_returns_memory() == "jemalloc"  # a second call keeps it
        print("ok", before, got)
        """
    )
    assert got[0] == "ok"
    assert got[2] == "jemalloc"  # the Linux wheels CI installs have it


def test_one_shot_batches_come_from_the_system_pool_and_the_pool_is_restored() -> None:
    before = pa.default_memory_pool()
    system = pa.system_memory_pool()
    held = system.bytes_allocated()
    with arrow_pool_for_one_shot_batches() as pool:
        assert pa.default_memory_pool().backend_name == pool.backend_name == "system"
        arr = pa.array(range(1 << 16), pa.int64())
        assert system.bytes_allocated() - held >= arr.nbytes
    assert pa.default_memory_pool().backend_name == before.backend_name
    with pytest.raises(RuntimeError, match="decode failed"), arrow_pool_for_one_shot_batches():
        raise RuntimeError("decode failed")
    assert pa.default_memory_pool().backend_name == before.backend_name
    del arr
    assert system.bytes_allocated() == held  # the buffer went back to the pool it came from


def test_duckdb_release_unused_hands_freed_pages_back() -> None:
    # a fresh interpreter: RSS figures of this test process would carry everything run before
    got = _run(
        """
        import duckdb
        from opsloop.heap import duckdb_release_unused
        def anon():
            return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) // 1024
        con = duckdb.connect()
        con.sql("CREATE TABLE t AS SELECT range AS i, range::VARCHAR AS s FROM range(3000000)")
        con.sql("DROP TABLE t")
        freed = anon()
        released = duckdb_release_unused()
        print(released, freed, anon())
        """
    )
    released, freed, after = got[0] == "True", int(got[1]), int(got[2])
    assert released, "the Linux x86-64 wheels bundle jemalloc: the purge must be found"
    assert freed - after >= 20, (freed, after)  # the dropped table's pages (≈ 50 MB) left the process


def test_a_merge_leaves_no_idle_pages_in_duckdbs_allocator(tmp_path) -> None:
    """After DuckDBAdapter.merge, what DuckDB's jemalloc keeps resident is what it has allocated: the
    MERGE's statements purge as they go (without: ~14 MB idle after 30k changes into 300k rows)."""
    got = _run(
        f"""
        import ctypes
        import numpy as np, pyarrow as pa
        from opsloop.heap import _find_duckdb_mallctl
        from opsloop.warehouse.base import TableRef
        from opsloop.warehouse.duckdb import DuckDBAdapter
        from opsloop.warehouse.merge import MergeSpec
        ctl = _find_duckdb_mallctl()
        def idle_mb():
            ctl(b"epoch", None, None, ctypes.byref(ctypes.c_uint64(1)), 8)
            out = []
            for name in (b"stats.resident", b"stats.allocated"):
                v, size = ctypes.c_size_t(0), ctypes.c_size_t(8)
                assert ctl(name, ctypes.byref(v), ctypes.byref(size), None, 0) == 0
                out.append(v.value)
            return (out[0] - out[1]) >> 20
        def rows(ids, v):
            return pa.table({{"id": pa.array(ids, pa.int64()), "name": pa.array([f"n{{i}}-{{v}}" for i in ids]),
                             "_lsn": pa.array(np.full(len(ids), v, np.int64))}})
        wh = DuckDBAdapter({str(tmp_path / "w.duckdb")!r})
        target, staged = TableRef("raw", "t"), TableRef("raw", "s")
        with wh.session():
            wh.load_staging(target, rows(np.arange(300_000), 1), rows([0], 1).schema, "t")
            changed = np.concatenate([np.arange(0, 300_000, 20), np.arange(300_000, 315_000)])
            wh.load_staging(staged, rows(changed, 2), rows([0], 2).schema, "s")
            stats = wh.merge(MergeSpec(target=target, columns=("id", "name", "_lsn"), keys=("id",),
                                       order_by=("_lsn",)), staged)
            print(stats.inserted, stats.updated, idle_mb())
        """
    )
    inserted, updated, idle = (int(x) for x in got)
    assert (inserted, updated) == (15_000, 15_000)
    assert idle <= 4, f"DuckDB's allocator kept {idle} MB of freed pages after the MERGE"
