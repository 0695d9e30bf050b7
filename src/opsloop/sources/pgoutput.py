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
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from opsloop.errors import TerminalError
from opsloop.sources import pgtuples
from opsloop.sources.pgchanges import TableChanges

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


def _be(data: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """Big-endian unsigned integers of ``width`` bytes at the offsets ``at`` (vectorised)."""
    if not len(at):
        return np.zeros(0, dtype=np.int64)
    raw = np.ascontiguousarray(data[at[:, None] + np.arange(width)])
    return raw.view(f">u{width}").ravel().astype(np.int64)


def _distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values (``np.unique`` imports ``numpy.ma`` on first use: ~50 ms)."""
    if len(values) < 2:
        return values.copy()
    s = np.sort(values)
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


@dataclass
class ChangeBatch:
    """Decodes the messages of one ``pg_logical_slot_peek_binary_changes`` call in one vectorised pass.

    Per change message (``I``/``U``/``D``) it finds, with numpy over all of them at once, the relation
    version (the latest ``R`` of its oid before it), the commit that ends its transaction (its ``_lsn``)
    and the offset of its tuple; an update that carries the old key/row (``K``/``O``) becomes a delete
    of the old key followed by the new row. Transactions at or below a table's committed LSN are
    skipped for that table (a replay after a crash); changes after the last commit wait for the next
    batch. Only ``R`` and ``T`` messages (rare) are parsed one by one.
    """

    tables: dict[str, TableChanges]  # by relation name
    cursors: dict[str, int]  # committed LSN per table: transactions at or below are skipped
    relations: dict[int, Relation] = field(default_factory=dict)
    end_lsn: int | None = None
    transactions: int = 0
    skipped_transactions: int = 0
    last_commit_time: datetime | None = None
    truncated: list[str] = field(default_factory=list)

    def feed(self, messages: Iterable[bytes]) -> None:
        """Decode a sequence of messages (one buffer is built; the CDC reader hands one directly)."""
        buf = bytearray()
        starts, lens = array("q"), array("q")
        for msg in messages:
            starts.append(len(buf))
            lens.append(len(msg))
            buf += msg
        self.feed_buffer(buf, np.frombuffer(starts, dtype=np.int64), np.frombuffer(lens, dtype=np.int64))

    def feed_buffer(self, buf: bytes | bytearray, starts: np.ndarray, lens: np.ndarray) -> None:
        """Decode the messages at ``starts`` (lengths ``lens``) of ``buf``; the tables keep ``buf``."""
        data = np.frombuffer(buf, dtype=np.uint8)
        tags = data[starts] if len(starts) else np.zeros(0, dtype=np.uint8)
        commits = np.flatnonzero(tags == 67)  # C
        if not len(commits):
            return
        commit_end = _be(data, starts[commits] + 10, 8)
        self.end_lsn, self.transactions = int(commit_end[-1]), len(commits)
        self.last_commit_time = _PG_EPOCH + timedelta(microseconds=int(_be(data, starts[commits[-1:]] + 18, 8)[0]))
        rel_at = np.flatnonzero(tags == 82)  # R
        rels = [parse_relation(bytes(buf[a : a + n])) for a, n in zip(starts[rel_at], lens[rel_at], strict=True)]
        for rel in rels:
            self.relations[rel.oid] = rel
        for i in np.flatnonzero(tags == 84):  # T: the relations as of that message
            known = {r.oid: r for r, at in zip(rels, rel_at, strict=True) if at < i}
            msg = bytes(buf[starts[i] : starts[i] + lens[i]])
            (n,) = _I32.unpack_from(msg, 1)
            oids = [_I32.unpack_from(msg, 6 + 4 * k)[0] for k in range(n)]
            self.truncated += [known[o].name for o in oids if o in known]
        change = np.flatnonzero((tags == 73) | (tags == 85) | (tags == 68))  # I U D
        change = change[change < commits[-1]]
        if len(change):
            self._changes(buf, data, starts[change], tags[change], change, rels, rel_at, commits, commit_end)

    def _changes(
        self,
        buf: bytes | bytearray,
        data: np.ndarray,
        at: np.ndarray,
        tag: np.ndarray,
        index: np.ndarray,
        rels: list[Relation],
        rel_at: np.ndarray,
        commits: np.ndarray,
        commit_end: np.ndarray,
    ) -> None:
        oids = _be(data, at + 1, 4)
        rel_oids = np.array([r.oid for r in rels], dtype=np.int64)
        version = np.full(len(at), -1, dtype=np.int64)
        for oid in _distinct(oids):
            mine = np.flatnonzero(rel_oids == oid)
            sel = oids == oid
            if len(mine):
                k = np.searchsorted(rel_at[mine], index[sel]) - 1
                version[sel] = np.where(k >= 0, mine[np.maximum(k, 0)], -1)
        if (version < 0).any():
            oid = int(oids[version < 0][0])
            raise TerminalError(f"pgoutput: change for unknown relation oid {oid} (no Relation message seen)")
        txn = np.searchsorted(commits, index)  # the commit ending each change's transaction
        pos, seq, deleted = at + 6, 2 * index, tag == 68  # insert / update 'N' / delete 'K'|'O' tuple at 6
        old = np.flatnonzero((tag == 85) & np.isin(data[at + 5], (75, 79)))  # update with the old key/row
        if len(old):
            # delete the old key, then write the new row: when the key did not change, the later
            # version wins the per-key dedup and the delete disappears
            new = np.array([a + 7 + pgtuples.tuple_length(buf, int(a) + 6) for a in at[old]], dtype=np.int64)
            deleted = deleted.copy()
            deleted[old] = True
            pos, seq = np.concatenate([pos, new]), np.concatenate([seq, seq[old] + 1])
            deleted = np.concatenate([deleted, np.zeros(len(old), dtype=bool)])
            version, txn = np.concatenate([version, version[old]]), np.concatenate([txn, txn[old]])
        lsn = commit_end[txn]
        # a Relation message repeated unchanged (each transaction may resend it) is the same version:
        # one decode pass for its rows instead of one per message
        first: dict[tuple[object, ...], int] = {}
        same = [first.setdefault((r.oid, r.namespace, r.name, tuple(r.columns)), i) for i, r in enumerate(rels)]
        version = np.asarray(same, dtype=np.int64)[version]
        skipped = np.zeros(len(pos), dtype=bool)
        for name, table in self.tables.items():
            ids = [i for i, r in enumerate(rels) if r.name == name]
            of_table = np.isin(version, ids)
            if not of_table.any():
                continue
            late = of_table & (lsn <= self.cursors.get(name, -1))
            skipped |= late
            rows = np.flatnonzero(of_table & ~late)
            rows = rows[np.argsort(seq[rows], kind="stable")]
            used = sorted(set(version[rows].tolist()))
            local = np.searchsorted(np.array(used, dtype=np.int64), version[rows])
            table.set(buf, pos[rows], lsn[rows], seq[rows], deleted[rows], local, [rels[i] for i in used])
        self.skipped_transactions = len(_distinct(txn[skipped]))
