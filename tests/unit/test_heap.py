"""opsloop.heap: the objects a stage starts with are frozen once per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_first_stage_freezes_what_exists_and_later_calls_do_nothing() -> None:
    # a fresh interpreter: the test process may have run a stage already
    code = textwrap.dedent(
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def test_arrow_allocates_from_jemalloc_after_a_stage_starts() -> None:
    code = textwrap.dedent(
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
    assert out.stdout.split()[2] == "jemalloc"  # the Linux wheels CI installs have it
