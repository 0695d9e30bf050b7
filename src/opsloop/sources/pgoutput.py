"""A decoder for the ``pgoutput`` logical-replication protocol (version 1, text tuples).

Messages (first byte): ``B`` Begin, ``C`` Commit, ``R`` Relation, ``Y`` Type, ``O`` Origin,
``I`` Insert, ``U`` Update, ``D`` Delete, ``T`` Truncate, ``M`` logical message. A tuple is
``int16 ncols`` then per column ``n`` (NULL), ``u`` (unchanged TOASTed value) or ``t`` + ``int32 len``
+ text. Updates and deletes carry the old key (``K``) or the whole old row (``O``, REPLICA IDENTITY
FULL) when the replica identity changed or is needed.

:class:`ChangeBatch` collects one peek's changes per table as raw tuples (skipping transactions at
or below each table's committed LSN, so a replay after a crash is a no-op); ``to_arrow`` decodes
them column-wise and keeps the latest version per key (commit LSN, then position in the stream).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsloop.errors import TerminalError
from opsloop.sources import pgtuples
from opsloop.sources.base import DELETED_COL, LSN_COL, SEQ_COL, UNCHANGED_COL
from opsloop.sources.pgcopy import PgColumn, text_to_arrow
from opsloop.transform.dedup import latest_per_key

_I16, _I32, _I64 = struct.Struct("!h"), struct.Struct("!i"), struct.Struct("!q")
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class _Unchanged:
    """Marker for an unchanged TOASTed column in an UPDATE's new tuple."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
Value = bytes | None | _Unchanged  # raw UTF-8 text; decoded column-wise into Arrow


def lsn_to_int(lsn: str) -> int:
    hi, _, lo = lsn.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_to_str(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: list[tuple[str, int, bool]]  # name, type oid, part of the replica identity key

    @property
    def names(self) -> list[str]:
        return [c[0] for c in self.columns]


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode("utf-8"), end + 1


def parse_tuple(buf: bytes, pos: int) -> tuple[list[Value], int]:
    """One TupleData at ``pos`` → (values, end). Text values stay bytes (decoded per column later)."""
    (n,) = _I16.unpack_from(buf, pos)
    pos += 2
    out: list[Value] = []
    append = out.append
    unpack = _I32.unpack_from
    for _ in range(n):
        kind = buf[pos]
        if kind == 116:  # 't'
            start = pos + 5
            pos = start + unpack(buf, pos + 1)[0]
            append(buf[start:pos])
        elif kind == 110:  # 'n'
            append(None)
            pos += 1
        elif kind == 117:  # 'u'
            append(UNCHANGED)
            pos += 1
        else:
            raise TerminalError(f"pgoutput: unsupported tuple value kind {chr(kind)!r} (binary mode is not used)")
    return out, pos


def parse_relation(buf: bytes) -> Relation:
    (oid,) = _I32.unpack_from(buf, 1)
    nsp, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    ident = chr(buf[pos])
    (ncols,) = _I16.unpack_from(buf, pos + 1)
    pos += 3
    cols = []
    for _ in range(ncols):
        flags = buf[pos]
        col, pos = _cstring(buf, pos + 1)
        (typ,) = _I32.unpack_from(buf, pos)
        cols.append((col, typ, bool(flags & 1)))
        pos += 8  # type oid + typmod
    return Relation(oid, nsp or "pg_catalog", name, ident, cols)


class TableChanges:
    """The changes of one table in one batch, kept as raw tuples in one byte buffer (plus offsets,
    LSNs and flags in compact arrays) and decoded column-wise by :mod:`pgtuples` at the end."""

    def __init__(self, table: str, keys: tuple[str, ...]) -> None:
        self.table = table
        self.keys = keys
        self.data = bytearray()
        self.starts = array("q")
        self.lsns = array("q")
        self.seqs = array("q")
        self.deleted = bytearray()
        self.versions = array("i")
        self.relations: list[Relation] = []
        self.changes = 0

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def relation(self) -> Relation | None:
        return self.relations[-1] if self.relations else None

    def add(self, rel: Relation, buf: bytes, pos: int, end: int, seq: int, deleted: bool) -> None:
        if not self.relations or self.relations[-1] is not rel:
            self.relations.append(rel)
        self.starts.append(len(self.data))
        self.data += memoryview(buf)[pos:end]
        self.lsns.append(0)
        self.seqs.append(seq)
        self.deleted.append(1 if deleted else 0)
        self.versions.append(len(self.relations) - 1)
        self.changes += 1

    def mark(self, first: int, lsn: int) -> None:
        """Set the commit LSN of the rows added since ``first`` (at their transaction's commit)."""
        for i in range(first, len(self.lsns)):
            self.lsns[i] = lsn

    def truncate(self, rows: int) -> None:
        """Forget the rows from ``rows`` on (a skipped, already committed transaction)."""
        if rows < len(self.starts):
            del self.data[self.starts[rows] :]
            for arr in (self.starts, self.lsns, self.seqs, self.versions):
                del arr[rows:]
            del self.deleted[rows:]
            self.changes = len(self.starts)

    def _decoded(self, names: list[str], catalog: dict[str, PgColumn]) -> tuple[list[pa.Array], list[np.ndarray]]:
        """Typed columns ``names`` in row order and their unchanged-TOAST masks."""
        n = len(self.starts)
        starts = np.frombuffer(self.starts, dtype=np.int64)
        versions = np.frombuffer(self.versions, dtype=np.int32)
        cols: list[list[pa.Array]] = [[] for _ in names]
        masks: list[list[np.ndarray]] = [[] for _ in names]
        order: list[np.ndarray] = []
        for v, rel in enumerate(self.relations):
            idx = np.flatnonzero(versions == v)
            if not len(idx):
                continue
            order.append(idx)
            dec = pgtuples.decode(self.data, starts[idx], len(rel.columns))
            pos = {name: i for i, name in enumerate(rel.names)}
            types = {c[0]: c[1] for c in rel.columns}
            for j, name in enumerate(names):
                col = catalog.get(name) or PgColumn(name, types.get(name, 25), -1, "")
                i = pos.get(name)
                text = dec.text[i] if i is not None else pa.nulls(len(idx), pa.string())
                cols[j].append(text_to_arrow(text, col))
                masks[j].append(dec.unchanged[i] if i is not None else np.zeros(len(idx), dtype=bool))
        perm = np.argsort(np.concatenate(order)) if len(order) > 1 else None
        out, out_masks = [], []
        for parts, mparts in zip(cols, masks, strict=True):
            arr = pa.concat_arrays(parts) if parts else pa.nulls(n)
            mask = np.concatenate(mparts) if mparts else np.zeros(n, dtype=bool)
            out.append(arr.take(pa.array(perm)) if perm is not None else arr)
            out_masks.append(mask[perm] if perm is not None else mask)
        return out, out_masks

    def to_arrow(self, catalog: dict[str, PgColumn], columns: Sequence[str] | None = None) -> pa.RecordBatch:
        """One batch, latest version per key: the columns (catalog types), ``_lsn``, ``_seq``,
        ``_deleted`` and — only if some update left TOASTed values out that no earlier version in the
        batch supplies — ``_unchanged`` (``,col1,col2,``, filled from the target by the loader)."""
        rel = self.relation
        assert rel is not None
        names = list(columns) if columns else rel.names
        arrays, masks = self._decoded(names, catalog)
        table = pa.table(
            [*arrays, pa.array(np.frombuffer(self.lsns, dtype=np.int64)),
             pa.array(np.frombuffer(self.seqs, dtype=np.int64)),
             pa.array(np.frombuffer(self.deleted, dtype=np.uint8).astype(bool))],
            names=[*names, LSN_COL, SEQ_COL, DELETED_COL],
        )  # fmt: skip
        for k in self.keys:
            j = names.index(k) if k in names else -1
            if j < 0 or table.column(k).null_count or masks[j].any():
                raise TerminalError(
                    f"table {self.table}: a change without its key {list(self.keys)} — its REPLICA IDENTITY must "
                    "cover the merge keys (the primary key, or ALTER TABLE … REPLICA IDENTITY FULL)"
                )
        if any(m.any() for m in masks):
            table = _carry_forward(table, names, masks, self.keys)
        return latest_per_key(table, self.keys, LSN_COL, tiebreak=SEQ_COL).combine_chunks().to_batches()[0]


def _carry_forward(table: pa.Table, names: list[str], masks: list[np.ndarray], keys: tuple[str, ...]) -> pa.Table:
    """An unchanged TOASTed value takes the value of the latest earlier version of the same key in the
    batch; what remains unknown is listed in ``_unchanged`` for the loader to fill from the target."""
    order = pc.sort_indices(table, sort_keys=[*((k, "ascending") for k in keys), (SEQ_COL, "ascending")])
    table = table.take(order)
    perm = order.to_numpy()
    n = table.num_rows
    idx = np.arange(n)
    new_group = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in keys:
            col = table.column(k)
            same &= pc.fill_null(pc.equal(col.slice(1), col.slice(0, n - 1)), False).to_numpy(zero_copy_only=False)
        new_group[1:] = ~same
    group = np.cumsum(new_group)
    marks: list[str | None] = [None] * n
    for j, name in enumerate(names):
        u = masks[j][perm]
        if not u.any():
            continue
        src = np.maximum.accumulate(np.where(u, -1, idx))
        found = (src >= 0) & (group[np.maximum(src, 0)] == group)
        take = np.where(u & found, src, idx)
        table = table.set_column(j, name, table.column(j).take(pa.array(take)))
        for i in np.flatnonzero(u & ~found):
            marks[i] = (marks[i] or ",") + name + ","
    if any(m is not None for m in marks):
        table = table.append_column(UNCHANGED_COL, pa.array(marks, pa.string()))
    return table


@dataclass
class ChangeBatch:
    """Decodes the rows of one ``pg_logical_slot_peek_binary_changes`` call."""

    tables: dict[str, TableChanges]  # by relation name
    cursors: dict[str, int]  # committed LSN per table: transactions at or below are skipped
    relations: dict[int, Relation] = field(default_factory=dict)
    end_lsn: int | None = None
    transactions: int = 0
    skipped_transactions: int = 0
    last_commit_time: datetime | None = None
    truncated: list[str] = field(default_factory=list)
    _begin: dict[str, int] = field(default_factory=dict)
    _seq: int = 0

    def feed(self, messages: Iterable[bytes]) -> None:
        for msg in messages:
            self._one(msg if isinstance(msg, bytes) else bytes(msg))

    def _one(self, buf: bytes) -> None:
        tag = buf[0]
        if tag == 66:  # B
            self._begin = {name: t.rows for name, t in self.tables.items()}
        elif tag == 67:  # C
            (end,) = _I64.unpack_from(buf, 10)
            (ts,) = _I64.unpack_from(buf, 18)
            self._commit(end, _PG_EPOCH + timedelta(microseconds=ts))
        elif tag == 82:  # R
            rel = parse_relation(buf)
            self.relations[rel.oid] = rel
        elif tag in (73, 85, 68):  # I U D
            self._change(tag, buf)
        elif tag == 84:  # T
            (n,) = _I32.unpack_from(buf, 1)
            oids = [_I32.unpack_from(buf, 6 + 4 * i)[0] for i in range(n)]
            self.truncated += [self.relations[o].name for o in oids if o in self.relations]
        # Y (type), O (origin), M (message): nothing to do

    def _change(self, tag: int, buf: bytes) -> None:
        (oid,) = _I32.unpack_from(buf, 1)
        rel = self.relations.get(oid)
        if rel is None:
            raise TerminalError(f"pgoutput: change for unknown relation oid {oid} (no Relation message seen)")
        table = self.tables.get(rel.name)
        if table is None:
            return
        self._seq += 1
        end = len(buf)
        if tag == 85 and buf[5] in (75, 79):  # update with the old key / row: 'K'|'O' tuple, then 'N' tuple
            old_end = 6 + pgtuples.tuple_length(buf, 6)
            # delete the old key, then write the new row: when the key did not change, the later
            # version wins the per-key dedup and the delete disappears
            table.add(rel, buf, 6, old_end, self._seq, True)
            self._seq += 1
            table.add(rel, buf, old_end + 1, end, self._seq, False)
            return
        table.add(rel, buf, 6, end, self._seq, tag == 68)  # insert / update 'N', delete 'K'|'O' at 6

    def _commit(self, end: int, when: datetime) -> None:
        self.end_lsn = end
        self.transactions += 1
        self.last_commit_time = when
        skipped = False
        for name, table in self.tables.items():
            first = self._begin.get(name, 0)
            if table.rows == first:
                continue
            if end <= self.cursors.get(name, -1):
                table.truncate(first)
                skipped = True
            else:
                table.mark(first, end)
        self.skipped_transactions += int(skipped)
        self._begin = {}
