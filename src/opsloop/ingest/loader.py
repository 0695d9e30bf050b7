"""The loader every source feeds: dedup → quality gates → PII → stage → gate decision → MERGE + state.

One :meth:`StreamLoader.load` is one warehouse MERGE whose position (watermark / LSN) is committed
in the same transaction (``write_merge(..., state=...)``). Quarantined rows are masked before they
are written; the quarantine share is checked after staging and **before** the MERGE, so a failing
gate leaves the target and the committed position untouched.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from opsloop import faults
from opsloop.errors import ConfigError, QualityGateError, TerminalError
from opsloop.ingest.quarantine import QuarantineWriter
from opsloop.ingest.runlog import StreamRun
from opsloop.ingest.writer import (
    Segments,
    TransactionalWarehouse,
    delete_missing_keys,
    fill_from_target,
    insert_direct,
    insert_segment,
    session,
)
from opsloop.sources.base import DELETED_COL, LSN_COL, SEQ_COL, UNCHANGED_COL, LoadRequest, LoadResult, Position
from opsloop.spec import PipelineSpec, SourceSpec, TableSpec
from opsloop.suppression import Suppression
from opsloop.transform import pyvalues
from opsloop.transform.dedup import apply_dedup, spec_for
from opsloop.transform.pii import PiiTransformer
from opsloop.transform.quality import QualityGate, checks_for, plan_schema
from opsloop.warehouse.base import MergeSpec, StateUpdate, TableRef, TableSchema, Warehouse
from opsloop.warehouse.merge import STATE_TABLE
from opsloop.warehouse.write import WriteResult, staging_ref, write_merge

META_COLUMNS = frozenset({LSN_COL, SEQ_COL, DELETED_COL, UNCHANGED_COL})
FUTURE_TOLERANCE = timedelta(minutes=5)  # clock skew between source and worker
SUPERSEDED_NOTE = "row(s) superseded by a later version of the same key in one load (transform.deduplicate)"
SUPPRESSED_NOTE = "row(s) of erased data subjects skipped (_erasure_suppress; docs/runbooks.md#erasure-request)"


@dataclass(frozen=True)
class Target:
    ref: TableRef
    keys: tuple[str, ...]
    order_by: str | None
    partition_by: str | None
    cluster_by: tuple[str, ...]


def resolve_target(spec: PipelineSpec, source: SourceSpec, table: TableSpec, keys: Iterable[str] = ()) -> Target:
    """Where ``<source>.<table>`` lands: its warehouse destination, else ``raw_<source>.<table>``."""
    dest = spec.warehouse_destination(source.id, table.name)
    where = f"sources[{source.id}].{table.name}"
    if dest is not None and dest.write_mode != "merge":
        raise ConfigError(
            f"destination {dest.name}: ingest writes by MERGE; writeMode {dest.write_mode!r} is not supported"
        )
    merge_keys = tuple((dest.merge_keys if dest else None) or table.primary_key or keys)
    if not merge_keys:
        raise ConfigError(f"{where}: no merge key — set primaryKey on the table or mergeKeys on its destination")
    if dest is not None and dest.dataset and dest.table:
        return Target(
            TableRef(dest.dataset, dest.table),
            merge_keys,
            dest.order_by or source.watermark_field(table),
            dest.partition_by,
            tuple(dest.cluster_by),
        )
    return Target(TableRef(f"raw_{source.id}", table.target), merge_keys, source.watermark_field(table), None, ())


def format_position(pos: Position | None) -> str:
    if pos is None:
        return ""
    if pos.cursor:
        return pos.cursor
    return pos.watermark.isoformat() if pos.watermark else ""


class StreamLoader:
    """:class:`opsloop.sources.base.Sink` on a warehouse, for one source of one pipeline run."""

    def __init__(
        self,
        wh: Warehouse,
        spec: PipelineSpec,
        source: SourceSpec,
        run_id: str,
        salt: bytes | None = None,
        now: datetime | None = None,
        segment_rows: int = 1_000_000,
    ) -> None:
        self.wh = wh
        self.spec = spec
        self.source = source
        self.run_id = run_id
        self.now = now or datetime.now(UTC)
        self.pii = PiiTransformer(spec.transform.pii, salt)
        self.soft = spec.cdc.delete_mode == "soft"
        self.segment_rows = segment_rows
        self.suppression = Suppression.load(wh, spec.name)  # erased subjects never come back
        self.runs: dict[str, StreamRun] = {}
        self.notes: list[str] = []

    # -- Sink protocol ---------------------------------------------------------------------------
    def state_key(self, stream: str) -> str:
        return f"{self.source.id}.{stream}"

    def state(self, stream: str) -> dict[str, Any] | None:
        """The committed state row (read without pyarrow's pandas-backed timestamp conversion)."""
        ref = TableRef(self.wh.meta_dataset, STATE_TABLE)
        if self.wh.table_schema(ref) is None:
            return None
        p = self.wh.param
        found = self.wh.query(
            f"SELECT * FROM {self.wh.quote(ref)} WHERE pipeline = {p('pipeline')} AND source = {p('source')}",
            {"pipeline": self.spec.name, "source": self.state_key(stream)},
        )
        rows = pyvalues.rows(found)
        return rows[0] if rows else None

    def note(self, stream: str, text: str) -> None:
        self.run_for(stream).flags.append(text)

    def settle(self) -> None:
        checkpoint = getattr(self.wh, "checkpoint", None)
        if checkpoint is not None:
            checkpoint()

    def run_for(self, stream: str, target: str = "", kind: str = "incremental") -> StreamRun:
        run = self.runs.get(stream)
        if run is None:
            run = self.runs[stream] = StreamRun(self.source.id, stream, target, kind)
        if target and not run.target:
            run.target = target
        return run

    def load(self, req: LoadRequest) -> LoadResult:
        with session(self.wh):  # one warehouse connection for the whole load (DuckDB)
            return self._load(req)

    def _load(self, req: LoadRequest) -> LoadResult:
        started = time.perf_counter()
        target = resolve_target(self.spec, self.source, req.table, req.keys or ())
        run = self.run_for(req.stream, str(target.ref), req.kind)
        if run.loads == 0:
            run.kind = req.kind
            run.position_before = format_position(req.position_before)
        existing = None
        if req.replace:
            req = self._unless_empty(req, target.ref)
            self.wh.drop_table(target.ref)
        else:
            existing = self.wh.table_schema(target.ref)
        hash_cols = {h for c in self.pii.columns if (h := self.pii.hash_column(c))}
        plan = plan_schema(
            req.schema,
            existing,
            self.spec.transform.schema_policy,
            str(target.ref),
            managed=META_COLUMNS | hash_cols,
            untyped=self.pii.columns | hash_cols,
        )
        run.flags.extend(n for n in plan.notes if n not in run.flags)
        staged = self.pii.output_schema(plan.output_schema(req.schema))
        if self.soft and DELETED_COL not in staged.names:
            staged = staged.append(pa.field(DELETED_COL, pa.bool_()))
        self._check_keys(target, staged)
        stored = [f for f in staged if f.name not in (SEQ_COL, UNCHANGED_COL) and (self.soft or f.name != DELETED_COL)]
        table_schema = TableSchema.from_arrow(pa.schema(stored), target.partition_by, target.cluster_by)
        order: tuple[str, ...] = req.order_by or (
            (target.order_by,) if target.order_by and target.order_by in staged.names else ()
        )
        merge = MergeSpec(
            target.ref,
            tuple(table_schema.names),
            target.keys,
            tuple(order),
            tiebreak=req.tiebreak if req.tiebreak in staged.names else None,
            delete_flag=DELETED_COL if DELETED_COL in staged.names and not self.soft else None,
        )
        gate = QualityGate(
            checks_for(self.spec.transform.quality_checks, req.stream, target.ref.table),
            str(target.ref),
            self.now,
            reference_column=self.source.watermark_field(req.table),
            redact=frozenset(self.pii.columns),
        )
        quarantine = QuarantineWriter(
            self.wh.meta_dataset, self.spec.name, self.source.id, req.stream, str(target.ref), self.run_id
        )
        dedup = spec_for(self.spec.transform.deduplicate, req.stream, target.ref.table)
        counts = {"read": 0, "superseded": 0, "suppressed": 0}
        raised: list[BaseException] = []

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from extract()
            except BaseException as exc:  # the warehouse reads this stream; keep the original error type
                raised.append(exc)
                raise

        def extract() -> Iterator[pa.RecordBatch]:
            for batch in req.batches:
                if batch.num_rows == 0:
                    continue
                counts["read"] += batch.num_rows
                data = plan.apply(pa.Table.from_batches([batch]))
                if self.suppression:
                    data, gone = self.suppression.split(data, self.pii.hasher, str(target.ref))
                    counts["suppressed"] += gone
                if self.soft and DELETED_COL not in data.column_names:
                    data = data.append_column(DELETED_COL, pa.array([False] * data.num_rows, pa.bool_()))
                if dedup is not None:
                    before = data.num_rows
                    data = apply_dedup(data, dedup)
                    counts["superseded"] += before - data.num_rows
                good, bad = gate.split(data)
                if bad is not None:
                    quarantine.add(self.pii.apply(bad))
                good = self.pii.apply(good).select(staged.names).cast(staged)
                yield from good.to_batches()
            faults.checkpoint("after_extract")

        def state() -> StateUpdate | None:
            if not segments.exhausted:
                return None  # the position is committed with the last segment only
            pos = self._capped(req.position(), run)
            run.position_after = format_position(pos) or run.position_after or run.position_before
            return StateUpdate(
                self.spec.name,
                self.state_key(req.stream),
                self.run_id,
                watermark=pos.watermark,
                cursor=pos.cursor,
                extra=pos.extra_json(),
            )

        def before_merge(staged_result: WriteResult) -> None:
            q = self.spec.transform.quarantine
            if direct:  # one transaction: a failing gate rolls the load back, the quarantine follows below
                gate.enforce(q.max_share, q.min_rows)
            quarantine.flush(self.wh)
            gate.enforce(q.max_share, q.min_rows)
            if staged_result.rows_staged and not empty_target:
                fill_from_target(
                    self.wh, target.ref, target.keys, staging_ref(target.ref, self.wh), staged, table_schema, self.soft
                )

        # an empty target and keys unique by construction: INSERT instead of MERGE (see writer.py)
        empty_target = existing is None and req.unique and set(target.keys) == set(req.keys or ())
        direct = empty_target and isinstance(self.wh, TransactionalWarehouse)
        segments = Segments(batches(), 2**62 if direct else self.segment_rows)
        totals = WriteResult(str(target.ref))
        try:
            while True:
                if direct and isinstance(self.wh, TransactionalWarehouse):  # all in one transaction
                    res = insert_direct(
                        self.wh, target.ref, table_schema, staged, segments.segment(), merge, state, before_merge
                    )
                else:
                    write = insert_segment if empty_target else write_merge
                    res = write(
                        self.wh,
                        target.ref,
                        table_schema,
                        staged,
                        segments.segment(),
                        merge,
                        job_key=f"{self.run_id}_{self.source.id}_{req.stream}_{run.loads}_{segments.count}",
                        state=state,
                        before_merge=before_merge,
                    )
                totals.inserted += res.inserted
                totals.updated += res.updated
                totals.deleted += res.deleted
                faults.checkpoint("mid_merge")  # a chunk's MERGE + position committed; the run's next follow
                if segments.exhausted:
                    break
        except Exception as exc:
            if direct and isinstance(exc, QualityGateError):
                quarantine.flush(self.wh)  # the load was rolled back; the rejected rows are still recorded
            if raised and raised[0] is not exc:
                raise raised[0] from exc  # e.g. a TransientError from the source, not DuckDB's wrapper
            raise
        finally:
            quarantine.discard()
            run.rows_read += counts["read"]
            if counts["superseded"]:
                run.add_count_flag("dedup: ", counts["superseded"], SUPERSEDED_NOTE)
            if counts["suppressed"]:
                run.add_count_flag("privacy: ", counts["suppressed"], SUPPRESSED_NOTE)
            run.rows_quarantined += gate.rows_failed  # distinct rows (a row may fail two rules)
            for rule, k in gate.by_rule.items():
                run.quarantined_by_rule[rule] = run.quarantined_by_rule.get(rule, 0) + k
        run.loads += 1
        run.inserted += totals.inserted
        run.updated += totals.updated
        run.deleted += totals.deleted
        seconds = time.perf_counter() - started
        run.seconds += seconds
        return LoadResult(
            req.stream,
            counts["read"],
            gate.rows_failed,
            totals.inserted,
            totals.updated,
            totals.deleted,
            seconds,
            dict(gate.by_rule),
            list(plan.notes),
        )

    def _unless_empty(self, req: LoadRequest, ref: TableRef) -> LoadRequest:
        """A replace (full refresh, CDC snapshot) drops the target, but only once the extract has shown
        a row: an empty extract never empties a table that has rows (it fails loudly instead)."""
        batches = iter(req.batches)
        first = next((b for b in batches if b.num_rows), None)
        if first is not None:
            return replace(req, batches=itertools.chain([first], batches))
        if self.wh.table_schema(ref) is not None:
            rows = self.wh.query(f"SELECT count(*) AS n FROM {self.wh.quote(ref)}").column(0)[0].as_py()
            if rows:
                what = "snapshot" if req.kind == "snapshot" else "full refresh"
                raise TerminalError(
                    f"{ref}: the {what} of {self.source.id}.{req.stream} read 0 rows, so the table's {rows} "
                    "row(s) were kept and its position not moved (an empty extract never empties a table). If "
                    "the source really is empty now, drop the table yourself, then rerun"
                )
        return replace(req, batches=[])

    def _capped(self, pos: Position, run: StreamRun) -> Position:
        """A watermark beyond the extract time (a far-future ``updated_at``) would make every later
        read start after it and skip all changes until then: commit the extract time instead (the
        future row is re-read each run, which the MERGE makes harmless) and say so."""
        if pos.watermark is None or pos.watermark <= self.now + FUTURE_TOLERANCE:
            return pos
        flag = (
            f"watermark: newest value {pos.watermark.isoformat()} is in the future (extract time "
            f"{self.now.isoformat()}); committed the extract time instead so later changes are still read"
        )
        if flag not in run.flags:
            run.flags.append(flag)
        return replace(pos, watermark=self.now)

    def _check_keys(self, target: Target, staged: pa.Schema) -> None:
        missing = [k for k in target.keys if k not in staged.names]
        if missing:
            raise ConfigError(f"{target.ref}: merge key(s) {missing} are not columns of the source data")
        masked = [k for k in target.keys if k in self.pii.mask]
        if masked:
            raise ConfigError(f"{target.ref}: merge key(s) {masked} are masked as PII (not unique); hash them instead")

    def delete_missing(
        self,
        table: TableSpec,
        key_schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        keys: tuple[str, ...] | None = None,
    ) -> int:
        """Hard-delete (or flag ``_deleted``) target rows whose key the source no longer has."""
        with session(self.wh):
            return self._delete_missing(table, key_schema, batches, keys)

    def _delete_missing(
        self, table: TableSpec, key_schema: pa.Schema, batches: Iterable[pa.RecordBatch], keys: tuple[str, ...] | None
    ) -> int:
        target = resolve_target(self.spec, self.source, table, keys or ())
        run = self.run_for(table.name, str(target.ref))
        if self.wh.table_schema(target.ref) is None:
            return 0
        stg = TableRef(target.ref.dataset, f"_keys_{target.ref.table}")
        hashed = self.pii.output_schema(key_schema)
        load = self.wh.load_staging(
            stg,
            (self.pii.apply(b).cast(hashed).to_batches()[0] for b in batches if b.num_rows),
            hashed,
            job_key=f"{self.run_id}_{table.name}_keys",
        )
        try:
            if load.rows == 0:
                run.flags.append(
                    "key scan returned no keys: deletes skipped (an empty source never empties the target)"
                )
                return 0
            deleted = delete_missing_keys(self.wh, target.ref, target.keys, stg, self.soft)
        finally:
            self.wh.drop_table(stg)
        run.deleted += deleted
        return deleted
