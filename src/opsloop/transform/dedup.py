"""Latest row per key within one batch (vectorised). The MERGE dedups against the target as well."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsloop.spec import DedupSpec
from opsloop.transform.pyvalues import from_numpy, to_numpy

_IDX = "__opsloop_row"
_POS = "__opsloop_pos"


def _as_table(data: pa.RecordBatch | pa.Table) -> pa.Table:
    return pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data


def _positions(n: int) -> pa.Array:
    return from_numpy(np.arange(n, dtype=np.int64))  # pa.array(range(n)) would import pandas


def has_duplicates(table: pa.Table, keys: Sequence[str]) -> bool:
    if table.num_rows < 2:
        return False
    if len(keys) == 1:
        col = table.column(keys[0])
        if pa.types.is_integer(col.type) and not col.null_count:  # a sort: 5× faster than hashing
            values = np.sort(to_numpy(col.combine_chunks().cast(pa.int64())))
            return bool((values[1:] == values[:-1]).any())
        return int(pc.count_distinct(col, mode="all").as_py()) < table.num_rows
    return table.select(list(keys)).group_by(list(keys)).aggregate([]).num_rows < table.num_rows


def latest_per_key(
    data: pa.RecordBatch | pa.Table,
    keys: Sequence[str],
    order_by: str | None = None,
    descending: bool = True,
    tiebreak: str | None = None,
) -> pa.Table:
    """One row per ``keys``: the first by ``order_by`` (DESC = latest wins, NULLs last), then ``tiebreak``
    DESC, then the later position in the batch. Survivors keep their batch order.

    A row with a NULL key is no version of another row (a NULL matches nothing, as in the MERGE): it
    is kept, so the quality gate or the NULL-merge-key check rejects it by name instead of it being
    collapsed into another NULL-key row here."""
    table = _as_table(data)
    missing = [c for c in (*keys, order_by, tiebreak) if c and c not in table.column_names]
    if missing:
        raise ValueError(f"dedup: column(s) {missing} not in the batch (columns: {table.column_names})")
    if not has_duplicates(table, keys):
        return table
    keyed = None
    for k in keys:
        valid = pc.is_valid(table.column(k))
        keyed = valid if keyed is None else pc.and_(keyed, valid)
    if keyed is not None and not pc.all(keyed).as_py():
        numbered = table.append_column(_POS, _positions(table.num_rows))
        kept = latest_per_key(numbered.filter(keyed), keys, order_by, descending, tiebreak).column(_POS)
        loose = numbered.filter(pc.invert(keyed)).column(_POS)
        rows = pa.concat_arrays([kept.combine_chunks(), loose.combine_chunks()])
        return table.take(pc.take(rows, pc.sort_indices(rows)))
    n = table.num_rows
    table = table.append_column(_IDX, _positions(n))
    direction = "descending" if descending else "ascending"
    sort = [(k, "ascending", "at_end") for k in keys]
    sort += [(order_by, direction, "at_end")] if order_by else []
    if tiebreak:
        sort.append((tiebreak, "descending", "at_end"))
    sort.append((_IDX, "descending", "at_end"))
    order = pc.sort_indices(table, sort_keys=sort)
    same = np.ones(n - 1, dtype=bool)  # sorted by key, the winner of each key comes first
    for k in keys:
        col = table.column(k).take(order)
        same &= to_numpy(pc.equal(col.slice(1), col.slice(0, n - 1)))
    rows = np.sort(to_numpy(order)[np.concatenate([[True], ~same])])  # survivors in batch order
    return table.take(from_numpy(rows.astype(np.int64))).drop_columns([_IDX])


def spec_for(specs: Sequence[DedupSpec], table: str, target: str | None = None) -> DedupSpec | None:
    """The dedup rule that applies to ``table`` (or its target name): listed tables first, then a global one."""
    names = {table, target or table}
    for d in specs:
        if d.tables and names & set(d.tables):
            return d
    return next((d for d in specs if not d.tables), None)


def apply_dedup(data: pa.RecordBatch | pa.Table, rule: DedupSpec | None) -> pa.Table:
    table = _as_table(data)
    if rule is None or not all(k in table.column_names for k in rule.keys):
        return table
    order = rule.order_column if rule.order_column in table.column_names else None
    return latest_per_key(table, rule.keys, order, rule.descending)
