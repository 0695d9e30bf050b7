"""What a stage process sets up once (the collector off its startup objects, Arrow's allocator) and
the calls that hand Arrow's and DuckDB's freed pages back.

A flow-run process imports Prefect, pyarrow, DuckDB, psycopg, pydantic and the spec's models before
its first stage runs: tens to hundreds of thousands of objects that live until the process ends.
Every full collection walks them all, and so does the one the interpreter runs at exit — about
0.15 s for an ingest child (measured in session 9: 0.20 s from the end of the work to the end of the
process, 0.05 s with them frozen). :func:`freeze_startup_objects` moves them to the collector's
permanent generation once per process, as CPython's ``gc.freeze`` documents for long-lived startup
objects; objects created later are collected as before.

:func:`arrow_pool_that_returns_memory` makes Arrow allocate from its bundled jemalloc, which reuses
the pages of freed buffers for the next ones. The default pool on Linux wheels (mimalloc) kept
the pages of every CSV block and batch a load had parsed: an initial load of 1M rows from Postgres
peaked at 291–317 MB with it and 259–272 MB with jemalloc, at the same speed (session 12). Scoring
1M rows end to end: 650–654 MB with mimalloc, 623–636 MB with jemalloc, 6.2–6.3 s either way. The
ingest and scoring stages call it where they start.

:func:`duckdb_release_unused` does for DuckDB what ``release_unused`` does for an Arrow pool. DuckDB's
Linux wheels bundle their own jemalloc, which keeps the pages a statement freed for about a second
before it hands them back, and DuckDB flushes it only after tasks that ran longer than 100 ms. A
MERGE of 100k CDC changes into 1M rows is a handful of short statements, each taking fresh pages
while the previous one's sat idle: DuckDB's allocator held 55–66 MB resident with 4–34 MB allocated
(session 13). Purging between the statements keeps resident close to allocated.

:func:`arrow_pool_for_one_shot_batches` is the exception to jemalloc for Arrow. Arrow's bundled
jemalloc keeps the pages it freed resident for seconds: ``release_unused`` does not return them in
this build, and its decay cannot be changed once it runs. That is harmless for a stream of COPY
blocks, whose pages it reuses block after block. It is not harmless for a CDC batch, decoded in one
go, handed to DuckDB and freed: its ~20 MB would stay through the MERGE. The system allocator gives
them back when they are freed. A 100k-change CDC load peaked at 220 MB with jemalloc and 200 MB with
the system pool, at the same speed. An initial load of 1M rows is the other way round: 244–255 MB
with jemalloc, 275–281 MB with the system pool (session 13).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Callable, Iterator

import pyarrow as pa

_frozen = False
_ALL_ARENAS_PURGE = b"arena.4096.purge"  # MALLCTL_ARENAS_ALL (4096 in jemalloc 5): every arena at once


def freeze_startup_objects() -> bool:
    """Freeze what is alive now (first call in the process only); returns True when it froze.

    Frozen objects are never examined by the cyclic collector again: one that later becomes part of
    an unreachable cycle is not reclaimed (objects freed by reference counting still are). So this is
    called where a stage starts, when what exists is the imported libraries and the parsed spec."""
    global _frozen
    if _frozen:
        return False
    _frozen = True
    gc.freeze()
    return True


def arrow_pool_that_returns_memory() -> str:
    """Arrow's default pool becomes jemalloc where the pyarrow build has it (the Linux wheels do);
    elsewhere the default stays. Buffers allocated before keep their pool. Returns the backend now in use."""
    if pa.default_memory_pool().backend_name != "jemalloc":
        with contextlib.suppress(NotImplementedError):  # a pyarrow built without jemalloc keeps its default
            pa.set_memory_pool(pa.jemalloc_memory_pool())
    return str(pa.default_memory_pool().backend_name)


@contextlib.contextmanager
def arrow_pool_for_one_shot_batches() -> Iterator[pa.MemoryPool]:
    """Inside the block, new Arrow buffers come from the system allocator. The pool in use before is
    restored when the block ends, and buffers keep the pool they came from."""
    before = pa.default_memory_pool()
    pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(before)


def duckdb_release_unused() -> bool:
    """Hand the free pages DuckDB's bundled jemalloc keeps back to the system now: jemalloc's
    documented ``arena.<i>.purge`` control, for every arena, through the ``duckdb_je_mallctl`` the
    extension module exports. Returns False, doing nothing, where the DuckDB build has no jemalloc of
    its own (DuckDB bundles it only in its Linux x86-64 builds; elsewhere it uses the system allocator)."""
    mallctl = _find_duckdb_mallctl()
    return mallctl is not None and mallctl(_ALL_ARENAS_PURGE, None, None, None, 0) == 0


@functools.cache
def _find_duckdb_mallctl() -> Callable[..., int] | None:
    """jemalloc's ``mallctl`` in DuckDB's extension module (looked up once); None where there is none."""
    try:
        import _duckdb  # the extension module the duckdb package loads: already in memory

        fn = ctypes.CDLL(_duckdb.__file__).duckdb_je_mallctl
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn
