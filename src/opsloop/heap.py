"""What a stage process sets up once: the collector off its startup objects, Arrow's allocator.

A flow-run process imports Prefect, pyarrow, DuckDB, psycopg, pydantic and the spec's models before
its first stage runs: tens to hundreds of thousands of objects that live until the process ends.
Every full collection walks them all, and so does the one the interpreter runs at exit — about
0.15 s for an ingest child (measured in session 9: 0.20 s from the end of the work to the end of the
process, 0.05 s with them frozen). :func:`freeze_startup_objects` moves them to the collector's
permanent generation once per process, as CPython's ``gc.freeze`` documents for long-lived startup
objects; objects created later are collected as before.

:func:`arrow_pool_that_returns_memory` makes Arrow allocate from its bundled jemalloc, which hands
freed pages back to the system after a short decay. The default pool on Linux wheels (mimalloc) kept
the pages of every CSV block and batch a load had parsed: an initial load of 1M rows from Postgres
peaked at 291–317 MB with it and 259–272 MB with jemalloc, at the same speed (session 12). Scoring
1M rows end to end: 650–654 MB with mimalloc, 623–636 MB with jemalloc, 6.2–6.3 s either way. The
ingest and scoring stages call it where they start.
"""

from __future__ import annotations

import contextlib
import gc

import pyarrow as pa

_frozen = False


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
