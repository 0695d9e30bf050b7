"""Helpers of the DuckDB adapter: type names, error translation, the per-thread session holder."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import duckdb
import pyarrow as pa

from opsloop.errors import TerminalError, TransientError
from opsloop.warehouse.base import arrow_to_logical

_DUCK_TO_LOGICAL = {
    "VARCHAR": "STRING",
    "BIGINT": "INT64",
    "INTEGER": "INT64",
    "SMALLINT": "INT64",
    "TINYINT": "INT64",
    "HUGEINT": "INT64",
    "UBIGINT": "INT64",
    "UINTEGER": "INT64",
    "DOUBLE": "FLOAT64",
    "FLOAT": "FLOAT64",
    "BOOLEAN": "BOOL",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMP",
    "TIMESTAMP": "TIMESTAMP",
    "DATE": "DATE",
    "BLOB": "BYTES",
    "JSON": "JSON",
}


def logical(duck_type: str) -> str:
    if duck_type.startswith("DECIMAL"):
        return "NUMERIC"
    return _DUCK_TO_LOGICAL.get(duck_type, "STRING")


def translate(exc: Exception, where: str) -> Exception:
    msg = str(exc)
    low = msg.lower()
    if "could not set lock" in low or "conflicting lock" in low:
        return TransientError(f"DuckDB file {where} is locked by another process: {msg}")
    if "no space left" in low or "disk full" in low or "file too large" in low or "quota exceeded" in low:
        # before the TransactionException check: a failed commit for want of space is no conflict
        return TerminalError(f"DuckDB {where}: disk full — free space and rerun: {msg}")
    if "read-only" in low or "read only" in low or "permission denied" in low:
        return TerminalError(f"DuckDB {where}: cannot write (read-only or permission denied): {msg}")
    if isinstance(exc, duckdb.TransactionException):
        return TransientError(f"DuckDB {where}: transaction conflict: {msg}")
    return TerminalError(f"DuckDB {where}: {msg}")


class Session(threading.local):
    """The open session connection of this thread (shared by an adapter and its labelled clones)."""

    con: duckdb.DuckDBPyConnection | None = None
    in_tx: bool = False


def pulled(batches: Iterable[pa.RecordBatch], raised: list[BaseException]) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except BaseException as exc:  # DuckDB wraps it (message + traceback text): keep the original
        raised.append(exc)
        raise


def arrow_schema_logical(schema: pa.Schema) -> dict[str, str]:
    """Column → logical type, e.g. for schema-drift checks against a target table."""
    return {f.name: arrow_to_logical(f.type) for f in schema}
