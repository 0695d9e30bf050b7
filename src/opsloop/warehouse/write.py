"""Load a stream of Arrow batches into a target table: stage → MERGE (+ state) → drop staging."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from opsloop import faults
from opsloop.errors import TerminalError
from opsloop.warehouse.base import JobStats, MergeSpec, StateUpdate, TableRef, TableSchema, Warehouse


@dataclass
class WriteResult:
    target: str
    rows_staged: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    jobs: list[JobStats] = field(default_factory=list)


def staging_ref(target: TableRef, wh: object | None = None) -> TableRef:
    """One staging table per target, replaced on every load (a crashed run's leftovers are overwritten).

    On a warehouse that runs the whole load on one connection (DuckDB inside a session:
    ``wh.stages_in_memory()``) it is a temporary table of that connection: written to no WAL and no
    checkpoint, gone with the connection — a 100k-row CDC batch's MERGE took 0.35–0.39 s with the
    staging table in the file and 0.18–0.24 s with it in memory (session 9)."""
    temp = bool(getattr(wh, "stages_in_memory", lambda: False)())
    return TableRef(target.dataset, f"_stg_{target.table}", temp=temp)


def _checked(batches: Iterable[pa.RecordBatch], keys: tuple[str, ...], target: TableRef) -> Iterator[pa.RecordBatch]:
    """Refuse rows with a NULL merge key: they would never match and duplicate on every replay."""
    offset = 0
    for batch in batches:
        for key in keys:
            nulls = batch.column(key).null_count
            if nulls:
                idx = pc.index(pc.is_null(batch.column(key)), True).as_py()
                raise TerminalError(
                    f"{target}: {nulls} row(s) with NULL merge key {key!r} (first at row {offset + idx}); "
                    "add a not_null quality check on it so they are quarantined"
                )
        offset += batch.num_rows
        yield batch


def write_merge(
    wh: Warehouse,
    target: TableRef,
    table_schema: TableSchema,
    arrow_schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    spec: MergeSpec,
    job_key: str,
    state: StateUpdate | Callable[[], StateUpdate | None] | None = None,
    before_merge: Callable[[WriteResult], None] | None = None,
    staging: TableRef | None = None,
) -> WriteResult:
    """Stage the batches, MERGE them into ``target`` and commit ``state`` with the data.

    An empty input still commits the state but never touches the target (no truncate, no delete).
    ``state`` may be a callable, evaluated once the batches are consumed (a watermark known only after
    the read; None = no position to commit with this part of a load). ``before_merge`` runs after
    staging and before the MERGE (quality gate; raising stops the load with the target untouched).
    ``staging`` overrides the staging table (default ``_stg_<target>``), e.g. one per scoring
    partition when K partitions MERGE into one table.
    """
    result = WriteResult(str(target))
    wh.ensure_table(target, table_schema)
    stg = staging or staging_ref(target, wh)  # writers running concurrently into one target stage apart
    load = wh.load_staging(stg, _checked(batches, spec.keys, target), arrow_schema, job_key=f"{job_key}_load")
    result.jobs.append(load)
    result.rows_staged = load.rows
    faults.checkpoint("after_stage_load")
    if callable(state):
        state = state()
    if before_merge is not None:
        before_merge(result)
    if load.rows == 0:
        if state is not None:
            result.jobs.append(wh.commit_state(state))
        wh.drop_table(stg)
        return result
    merged = wh.merge(spec, stg, state=state, job_key=f"{job_key}_merge")
    result.jobs.append(merged)
    result.inserted, result.updated, result.deleted = merged.inserted, merged.updated, merged.deleted
    wh.drop_table(stg)
    return result
