"""Vectorised decoding of pgoutput TupleData (numpy over all tuples of a table at once).

The tuples of one table and batch are concatenated in a byte buffer with their start offsets. A
tuple is ``int16 ncols`` and per column a kind byte — ``t`` (text: ``int32 len`` + bytes), ``n``
(NULL) or ``u`` (unchanged TOASTed value). Walking column ``j`` of *every* tuple at once is a handful
of numpy gathers; the text bytes of a column are gathered into one buffer and become an Arrow
string array without a Python object per value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from opsloop.errors import TerminalError

KIND_TEXT, KIND_NULL, KIND_UNCHANGED = 116, 110, 117
_CELL = np.dtype([("kind", "u1"), ("len", ">i4")])  # a column's kind byte and (for text) its length


@dataclass
class TupleColumns:
    """Column ``j`` of every tuple: Arrow text (NULL for ``n`` and ``u``) and the ``u`` mask."""

    text: list[pa.Array]
    unchanged: list[np.ndarray]


def _window(buf: np.ndarray, width: int) -> np.ndarray:
    """``buf`` as overlapping ``width``-byte rows, row ``i`` starting at byte ``i`` (a view, no copy):
    indexing it with offsets gathers ``width`` bytes per offset in one numpy call."""
    return np.lib.stride_tricks.as_strided(buf, shape=(len(buf) - width + 1, width), strides=(1, 1), writeable=False)


def _be32(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    if not len(at):
        return np.zeros(0, dtype=np.int64)
    return _window(buf, 4)[at].view(">i4").ravel().astype(np.int64)


def _strings(buf: np.ndarray, start: np.ndarray, lens: np.ndarray, valid: np.ndarray) -> pa.Array:
    n = len(lens)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    total = int(offsets[-1])
    widest = int(lens.max()) if n else 0
    if not total:
        data = np.zeros(0, dtype=np.uint8)
    elif widest <= 32 and int(start.max()) + widest <= len(buf):
        # short values: ``widest`` bytes at every start, each row's first ``len`` kept (two numpy calls)
        data = _window(buf, widest)[start][np.arange(widest) < lens[:, None]]
    else:
        itype = np.int32 if len(buf) < 2**31 else np.int64
        gather = np.repeat((start - offsets[:-1]).astype(itype), lens)
        gather += np.arange(total, dtype=itype)
        data = buf[gather]
        del gather
    null_count = int(n - valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if null_count else None
    arr = pa.Array.from_buffers(
        pa.binary(), n, [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)], null_count=null_count
    )
    try:
        return arr.cast(pa.string())  # validates UTF-8
    except pa.ArrowInvalid as exc:
        raise TerminalError(f"pgoutput: a text value is not valid UTF-8: {exc}") from None


def decode(data: bytes | bytearray, starts: np.ndarray, ncols: int, chunk: int = 100_000) -> TupleColumns:
    """Decode ``ncols`` columns of the tuples starting at ``starts`` in ``data`` (``chunk`` tuples at a
    time, so the transient index arrays stay small)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    parts = [_decode(buf, starts[i : i + chunk], ncols) for i in range(0, len(starts), chunk)] or [
        _decode(buf, starts, ncols)
    ]
    if len(parts) == 1:
        return parts[0]
    return TupleColumns(
        [pa.concat_arrays([p.text[j] for p in parts]) for j in range(ncols)],
        [np.concatenate([p.unchanged[j] for p in parts]) for j in range(ncols)],
    )


def _decode(buf: np.ndarray, starts: np.ndarray, ncols: int) -> TupleColumns:
    n = len(starts)
    pos = starts.astype(np.int64) + 2
    if n:
        counts = (buf[starts].astype(np.int64) << 8) | buf[starts + 1]
        if int(counts.min()) != ncols or int(counts.max()) != ncols:
            raise TerminalError(f"pgoutput: tuples with {sorted(set(counts.tolist()))} columns, expected {ncols}")
    out = TupleColumns([], [])
    for _ in range(ncols):
        if n and int(pos.max()) + 5 <= len(buf):  # kind byte and length word in one gather
            cells = _window(buf, 5)[pos].view(_CELL).ravel()
            kinds, lens = cells["kind"], cells["len"].astype(np.int64)
        else:
            kinds, lens = (buf[pos] if n else np.zeros(0, dtype=np.uint8)), None
        is_text = kinds == KIND_TEXT
        bad = ~(is_text | (kinds == KIND_NULL) | (kinds == KIND_UNCHANGED))
        if bad.any():
            raise TerminalError(f"pgoutput: unsupported tuple value kind {chr(int(kinds[bad][0]))!r}")
        if lens is None:
            lens = np.zeros(n, dtype=np.int64)
            if is_text.any():
                lens[is_text] = _be32(buf, pos[is_text] + 1)
        else:
            lens = np.where(is_text, lens, 0)
        out.text.append(_strings(buf, pos + 5, lens, is_text))
        out.unchanged.append(kinds == KIND_UNCHANGED)
        pos = np.where(is_text, pos + 5 + lens, pos + 1)
    return out


def tuple_length(buf: bytes | bytearray, pos: int) -> int:
    """Length in bytes of the TupleData at ``pos`` (to find the new tuple after an old one)."""
    n = int.from_bytes(buf[pos : pos + 2], "big")
    p = pos + 2
    for _ in range(n):
        if buf[p] == KIND_TEXT:
            p += 5 + int.from_bytes(buf[p + 1 : p + 5], "big")
        else:
            p += 1
    return p - pos
