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
