"""Write helpers of the loader: bounded segments, the empty-target insert path, fill-ins, deletes.

* :class:`Segments` cuts one load into segments of at most ``max_rows`` rows, so neither the staging
  table nor the MERGE grows with the extract; only the last segment commits the position (a crash
  in between replays the load, which the MERGE makes idempotent).
* :func:`insert_segment` is the path for a target that is empty (first load, replace) and rows whose
  keys are unique by construction (a Postgres primary key): stage → gate → ``INSERT … SELECT`` → then
  the position. There is nothing to merge against, so a MERGE would only pay for the dedup window and
  the join; committing the position after the data is safe because a load into an empty target is
  redone from scratch when the position is missing.
* :func:`insert_direct` is that path on an adapter with transactions (DuckDB): the rows stream
  into a side table in committed pieces (bounded memory), which becomes the target by a rename in
  the transaction that also commits the quarantine rows and the position — no staging copy, no
  second INSERT; a crash or a failing gate leaves the target as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from opsloop import faults
from opsloop.errors import TerminalError
from opsloop.sources.base import DELETED_COL, LSN_COL, SEQ_COL, UNCHANGED_COL
from opsloop.warehouse.base import JobStats, MergeSpec, StateUpdate, TableRef, TableSchema, Warehouse
from opsloop.warehouse.write import WriteResult, _checked, staging_ref

META = (DELETED_COL, UNCHANGED_COL)


@runtime_checkable
class TransactionalWarehouse(Warehouse, Protocol):
    """An adapter that can hold one connection and one transaction over several operations."""

    def session(self) -> contextlib.AbstractContextManager[Any]: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def release_cache(self) -> None: ...
    def insert_batches(
        self,
        ref: TableRef,
        batches: Iterable[pa.RecordBatch],
        schema: pa.Schema,
        columns: Sequence[str] | None = None,
        skip_flag: str | None = None,
    ) -> JobStats: ...


def session(wh: Warehouse) -> contextlib.AbstractContextManager[Any]:
    """One connection for the operations in the block where the adapter supports it (DuckDB)."""
    return wh.session() if isinstance(wh, TransactionalWarehouse) else contextlib.nullcontext()


class Segments:
    """Hands out consecutive segments of a batch stream; ``exhausted`` is known once a segment ends."""

    def __init__(self, batches: Iterable[pa.RecordBatch], max_rows: int) -> None:
        self._it = iter(batches)
        self._next: pa.RecordBatch | None = None
        self.max_rows = max_rows
        self.exhausted = False
        self.count = 0

    def segment(self) -> Iterator[pa.RecordBatch]:
        self.count += 1
        rows = 0
        while rows < self.max_rows:
            batch = self._take()
            if batch is None:
                return
            rows += batch.num_rows
            yield batch
        self._peek()

    def _take(self) -> pa.RecordBatch | None:
        if self._next is not None:
            batch, self._next = self._next, None
            return batch
        batch = next(self._it, None)
        if batch is None:
            self.exhausted = True
        return batch

    def _peek(self) -> None:
        if self._next is None and not self.exhausted:
            self._next = next(self._it, None)
            self.exhausted = self._next is None


def insert_segment(
    wh: Warehouse,
    target: TableRef,
    table_schema: TableSchema,
    arrow_schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    spec: MergeSpec,
    job_key: str,
    state: Callable[[], StateUpdate | None],
    before_merge: Callable[[WriteResult], None],
) -> WriteResult:
    """``write_merge`` for an empty target with unique keys: stage, gate, INSERT, then the position."""
    result = WriteResult(str(target))
    wh.ensure_table(target, table_schema)
    stg = staging_ref(target, wh)
    load = wh.load_staging(stg, _checked(batches, spec.keys, target), arrow_schema, job_key=f"{job_key}_load")
    result.jobs.append(load)
    result.rows_staged = load.rows
    faults.checkpoint("after_stage_load")
    update = state()
    before_merge(result)
    if load.rows:
        q = wh.quote
        cols = ", ".join(q(c) for c in spec.columns)
        where = f" WHERE NOT COALESCE({q(spec.delete_flag)}, FALSE)" if spec.delete_flag else ""
        job = wh.execute(f"INSERT INTO {q(target)} ({cols}) SELECT {cols} FROM {q(stg)}{where}", kind="insert")
        result.jobs.append(job)
        result.inserted = job.rows
    faults.checkpoint("after_merge_before_state")
    if update is not None:
        result.jobs.append(wh.commit_state(update))
    wh.drop_table(stg)
    return result


# rows per committed piece of a direct load (eight DuckDB row groups): one transaction appending a
# whole snapshot grew with it (5M rows: 321 MB against 240 at 1M); committed pieces, each followed by
# ``release_cache``, keep the load at a piece's memory (253–257 MB at 5M)
DIRECT_PIECE_ROWS = 983_040


def load_table(target: TableRef) -> TableRef:
    """The side table a direct load fills before it becomes ``target``."""
    return TableRef(target.dataset, f"_load_{target.table}")


def insert_direct(
    wh: TransactionalWarehouse,
    target: TableRef,
    table_schema: TableSchema,
    arrow_schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    spec: MergeSpec,
    state: Callable[[], StateUpdate | None],
    before_commit: Callable[[WriteResult], None],
) -> WriteResult:
    """:func:`insert_segment` without staging, for an adapter with transactions (DuckDB): the rows
    stream into a new side table (:func:`load_table`), committed every ``DIRECT_PIECE_ROWS`` rows so
    memory does not grow with the snapshot; then one transaction runs ``before_commit`` (gate +
    quarantine), renames the side table to the target and commits the position. The target appears
    whole, with its position, or not at all: a crash or a failing gate leaves only the side table,
    which the next run replaces. Rows flagged deleted are skipped (nothing to delete in a new table)."""
    result = WriteResult(str(target))
    side = load_table(target)
    wh.drop_table(side)  # what a crashed run left
    wh.ensure_table(side, table_schema)
    pieces = Segments(_checked(batches, spec.keys, target), DIRECT_PIECE_ROWS)
    try:
        while True:
            with wh.transaction():
                job = wh.insert_batches(side, pieces.segment(), arrow_schema, spec.columns, skip_flag=spec.delete_flag)
            result.jobs.append(job)
            result.rows_staged += job.rows
            if pieces.exhausted:
                break
            wh.release_cache()  # the piece is on disk; its cached blocks would pile up piece after piece
        result.inserted = result.rows_staged
        faults.checkpoint("after_stage_load")
        with wh.transaction():
            update = state()
            before_commit(result)
            _replace_empty(wh, target)
            wh.execute(f"ALTER TABLE {wh.quote(side)} RENAME TO {wh.quote(target.table)}", kind="ddl")
            faults.checkpoint("after_merge_before_state")
            if update is not None:
                result.jobs.append(wh.commit_state(update))
    except BaseException:
        with contextlib.suppress(Exception):
            wh.drop_table(side)
        raise
    return result


def _replace_empty(wh: Warehouse, target: TableRef) -> None:
    """Make room for the side table: an empty ``target`` (created by another step) is dropped; one
    with rows means another writer got there first — refuse rather than replace its rows."""
    if wh.table_schema(target) is None:
        return
    rows = wh.query(f"SELECT count(*) AS n FROM {wh.quote(target)}").column(0)[0].as_py()
    if rows:
        raise TerminalError(f"{target}: {rows} row(s) appeared while its initial load ran; rerun the load")
    wh.drop_table(target)


def fill_from_target(
    wh: Warehouse,
    target: TableRef,
    keys: tuple[str, ...],
    stg: TableRef,
    staged: pa.Schema,
    schema: TableSchema,
    soft: bool,
) -> None:
    """Rows that carry only some columns take the rest from the target row they update: soft
    deletes (the old tuple has only the keys) and unchanged TOASTed values of a CDC update."""
    q = wh.quote
    on = " AND ".join(f"s.{q(k)} = t.{q(k)}" for k in keys)
    values = [c for c in schema.names if c not in keys and c not in (LSN_COL, SEQ_COL, *META)]
    if not values:
        return
    if soft and DELETED_COL in staged.names:
        # a delete of a row the target never had (born and gone within a batch) is no tombstone
        wh.execute(
            f"DELETE FROM {q(stg)} AS s WHERE COALESCE(s.{q(DELETED_COL)}, FALSE) "
            f"AND NOT EXISTS (SELECT 1 FROM {q(target)} AS t WHERE {on})",
            kind="fill",
        )
        sets = ", ".join(f"{q(c)} = t.{q(c)}" for c in values)
        wh.execute(
            f"UPDATE {q(stg)} AS s SET {sets} FROM {q(target)} AS t WHERE COALESCE(s.{q(DELETED_COL)}, FALSE) AND {on}",
            kind="fill",
        )
    if UNCHANGED_COL in staged.names:
        u = f"s.{q(UNCHANGED_COL)}"
        sets = ", ".join(f"{q(c)} = CASE WHEN STRPOS({u}, ',{c},') > 0 THEN t.{q(c)} ELSE s.{q(c)} END" for c in values)
        wh.execute(f"UPDATE {q(stg)} AS s SET {sets} FROM {q(target)} AS t WHERE {u} IS NOT NULL AND {on}", kind="fill")


def delete_missing_keys(
    wh: Warehouse, target: TableRef, keys: tuple[str, ...], keys_table: TableRef, soft: bool
) -> int:
    """Delete (or flag ``_deleted``) target rows whose key is not in ``keys_table``; returns the count."""
    q = wh.quote
    on = " AND ".join(f"k.{q(c)} = t.{q(c)}" for c in keys)
    missing = f"NOT EXISTS (SELECT 1 FROM {q(keys_table)} AS k WHERE {on})"
    if soft:
        flag = q(DELETED_COL)
        sql = f"UPDATE {q(target)} AS t SET {flag} = TRUE WHERE NOT COALESCE(t.{flag}, FALSE) AND {missing}"
    else:
        sql = f"DELETE FROM {q(target)} AS t WHERE {missing}"
    return wh.execute(sql, kind="delete").rows
