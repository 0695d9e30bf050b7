"""Keep the cyclic garbage collector off the objects a stage process starts with.

A flow-run process imports Prefect, pyarrow, DuckDB, psycopg, pydantic and the spec's models before
its first stage runs: tens to hundreds of thousands of objects that live until the process ends.
Every full collection walks them all, and so does the one the interpreter runs at exit — about
0.15 s for an ingest child (measured in session 9: 0.20 s from the end of the work to the end of the
process, 0.05 s with them frozen). :func:`freeze_startup_objects` moves them to the collector's
permanent generation once per process, as CPython's ``gc.freeze`` documents for long-lived startup
objects; objects created later are collected as before.
"""

from __future__ import annotations

import gc

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
