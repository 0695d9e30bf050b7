"""The changes of one table in one CDC batch: raw pgoutput tuples in the batch's buffer, decoded
column-wise into Arrow (:mod:`pgtuples`), latest version per key.

:class:`opsloop.sources.pgoutput.ChangeBatch` hands each table the offsets of its tuples in the
shared message buffer plus, per row, the commit LSN, the position in the stream, the delete flag and
the relation version — numpy arrays filled in one pass, no Python object per change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsloop.errors import TerminalError
from opsloop.sources import pgtuples
from opsloop.sources.base import DELETED_COL, LSN_COL, SEQ_COL, UNCHANGED_COL
from opsloop.sources.pgcopy import PgColumn, text_to_arrow
from opsloop.transform.dedup import latest_per_key
from opsloop.transform.pyvalues import from_numpy, to_numpy

if TYPE_CHECKING:
    from opsloop.sources.pgoutput import Relation

_EMPTY = np.zeros(0, dtype=np.int64)


class TableChanges:
    """Rows of one table: tuple offsets into ``buf`` and per-row ``_lsn``, ``_seq``, ``_deleted`` and
    the index of the row's :class:`Relation` in ``relations`` (a batch may span a schema change)."""

    def __init__(self, table: str, keys: tuple[str, ...]) -> None:
        self.table = table
        self.keys = keys
        self.buf: bytes | bytearray = b""
        self.starts = self.lsns = self.seqs = _EMPTY
        self.deleted = np.zeros(0, dtype=bool)
        self.versions = np.zeros(0, dtype=np.int32)
        self.relations: list[Relation] = []

    def set(
        self,
        buf: bytes | bytearray,
        starts: np.ndarray,
        lsns: np.ndarray,
        seqs: np.ndarray,
        deleted: np.ndarray,
        versions: np.ndarray,
        relations: list[Relation],
    ) -> None:
        self.buf, self.starts, self.lsns, self.seqs = buf, starts, lsns, seqs
        self.deleted, self.versions, self.relations = deleted, versions.astype(np.int32), relations

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def changes(self) -> int:
        return len(self.starts)

    @property
    def relation(self) -> Relation | None:
        return self.relations[-1] if self.relations else None

    def _decoded(self, names: list[str], catalog: dict[str, PgColumn]) -> tuple[list[pa.Array], list[np.ndarray]]:
        """Typed columns ``names`` in row order and their unchanged-TOAST masks."""
        n = len(self.starts)
        cols: list[list[pa.Array]] = [[] for _ in names]
        masks: list[list[np.ndarray]] = [[] for _ in names]
        order: list[np.ndarray] = []
        for v, rel in enumerate(self.relations):
            idx = np.flatnonzero(self.versions == v) if len(self.relations) > 1 else np.arange(n)
            if not len(idx):
                continue
            order.append(idx)
            dec = pgtuples.decode(self.buf, self.starts[idx], len(rel.columns))
            pos = {name: i for i, name in enumerate(rel.names)}
            types = {c[0]: c[1] for c in rel.columns}
            for j, name in enumerate(names):
                col = catalog.get(name) or PgColumn(name, types.get(name, 25), -1, "")
                i = pos.get(name)
                text = dec.text[i] if i is not None else pa.nulls(len(idx), pa.string())
                cols[j].append(text_to_arrow(text, col))
                masks[j].append(dec.unchanged[i] if i is not None else np.zeros(len(idx), dtype=bool))
        perm = from_numpy(np.argsort(np.concatenate(order))) if len(order) > 1 else None
        out, out_masks = [], []
        for parts, mparts in zip(cols, masks, strict=True):
            arr = pa.concat_arrays(parts) if len(parts) > 1 else parts[0] if parts else pa.nulls(n)
            mask = np.concatenate(mparts) if mparts else np.zeros(n, dtype=bool)
            out.append(arr.take(perm) if perm is not None else arr)
            out_masks.append(mask[to_numpy(perm)] if perm is not None else mask)
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
            [*arrays, from_numpy(self.lsns), from_numpy(self.seqs), from_numpy(self.deleted)],
            names=[*names, LSN_COL, SEQ_COL, DELETED_COL],
        )
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
        table = table.set_column(j, name, table.column(j).take(from_numpy(take.astype(np.int64))))
        for i in np.flatnonzero(u & ~found):
            marks[i] = (marks[i] or ",") + name + ","
    if any(m is not None for m in marks):
        table = table.append_column(UNCHANGED_COL, pa.array(marks, pa.string()))
    return table
