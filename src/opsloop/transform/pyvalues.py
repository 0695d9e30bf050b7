"""Arrow → Python values without pandas: pyarrow imports pandas (~2 s on a cold worker) to convert
zone-aware timestamps in ``to_pylist``; casting to zone-less UTC first and re-attaching UTC avoids it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa


def _plain(col: pa.Array | pa.ChunkedArray) -> tuple[pa.Array | pa.ChunkedArray, bool]:
    if pa.types.is_timestamp(col.type) and col.type.tz is not None:
        return col.cast(pa.timestamp(col.type.unit)), True  # same instants, UTC wall time
    return col, False


def values(col: pa.Array | pa.ChunkedArray) -> list[Any]:
    plain, aware = _plain(col)
    out = plain.to_pylist()
    return [v.replace(tzinfo=UTC) if aware and isinstance(v, datetime) else v for v in out] if aware else out


def rows(table: pa.Table) -> list[dict[str, Any]]:
    cols = {name: values(table.column(name)) for name in table.column_names}
    return [{name: cols[name][i] for name in table.column_names} for i in range(table.num_rows)]


def max_time(col: pa.Array | pa.ChunkedArray) -> datetime | None:
    """The latest timestamp of a column as an aware UTC datetime (None when empty or all NULL)."""
    import pyarrow.compute as pc

    plain, aware = _plain(col)
    top = pc.max(plain).as_py()
    return top.replace(tzinfo=UTC) if isinstance(top, datetime) and (aware or top.tzinfo is None) else top


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Python rows → an Arrow table of ``schema``, through Arrow's JSON reader: ``pa.array`` / ``pa.table``
    on Python values make pyarrow import pandas (~1 s on a cold worker) for its array-like checks."""
    import json

    import pyarrow.json as pj

    if not rows:
        return schema.empty_table()
    lines = "\n".join(json.dumps(r, default=_json_value) for r in rows).encode()
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
    return pj.read_json(pa.BufferReader(lines), read_options=pj.ReadOptions(use_threads=False), parse_options=opts)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def from_numpy(values: Any) -> pa.Array:
    """A 1-D numpy array (int64/int32/float64/bool) as Arrow without ``pa.array`` (see :func:`table`)."""
    import numpy as np

    arr = np.ascontiguousarray(values)
    if arr.dtype == np.bool_:
        bits = pa.py_buffer(np.packbits(arr, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(arr), [None, bits])
    types = {np.dtype(np.int64): pa.int64(), np.dtype(np.int32): pa.int32(), np.dtype(np.float64): pa.float64()}
    if arr.dtype not in types:
        raise TypeError(f"from_numpy: unsupported dtype {arr.dtype}")
    return pa.Array.from_buffers(types[arr.dtype], len(arr), [None, pa.py_buffer(arr)])


def to_numpy(values: pa.Array | pa.ChunkedArray) -> Any:
    """A NULL-free bool / int / float Arrow array as numpy (``to_numpy`` would import pandas)."""
    import numpy as np

    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if arr.null_count:
        raise ValueError("to_numpy: the array has NULLs")
    buf = arr.buffers()[1]
    if pa.types.is_boolean(arr.type):
        if buf is None:
            return np.zeros(0, dtype=bool)
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
        return bits[arr.offset : arr.offset + len(arr)].astype(bool)
    if str(arr.type) not in _NUMPY:
        raise TypeError(f"to_numpy: unsupported type {arr.type}")
    return np.frombuffer(buf, dtype=_NUMPY[str(arr.type)])[arr.offset : arr.offset + len(arr)]


_NUMPY = {"int64": "int64", "int32": "int32", "uint64": "uint64", "double": "float64"}
