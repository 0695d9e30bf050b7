"""Push one reverse-ETL destination: gate → diff → schema → budget → push → log/state → summary.

:func:`push_destination` is the whole stage for one destination and returns a small report dict
(counts, API calls used and left, failures by error code). Guards:

* **gate** — :func:`opsloop.crm.gates.push_allowed` for ``sync.blockOn``; blocked → nothing sent;
* **dry run** — the diff, the schema check (nothing created) and one probe call for the budget:
  would-create / would-update counts, sample payloads, calls it would spend vs. calls left;
* **API budget** — at most ``sync.apiBudgetShare`` × the daily limit per day (minus what opsloop
  already spent today, from ``_sync_runs``); the sink stops *before* a call that would exceed it
  and the rest waits for the next run (``deferred``). A CRM-side "daily limit reached" stops the
  same way.
* results are recorded every ``flush_rows`` records, fewer toward the end (:func:`flush_at`), on a
  background thread while the push goes on, and on any exit (error included), so confirmed records
  are never re-sent after a failure, except those a kill caught unrecorded: the flush in progress,
  the buffer and the requests in flight.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsloop import faults
from opsloop.crm.base import BatchResult, BudgetCapReached, CrmSink, FieldSpec, PushRecord
from opsloop.crm.diff import DiffOptions, DiffResult, ReviewSource, build_candidates
from opsloop.crm.flusher import BackgroundFlusher
from opsloop.crm.gates import push_allowed
from opsloop.crm.retry import CrmBudgetExhausted, RetryPolicy
from opsloop.crm.synclog import SyncTables, held_open
from opsloop.errors import TerminalError
from opsloop.spec import PipelineSpec
from opsloop.spec.destinations import DestinationSpec
from opsloop.warehouse.base import TableRef, TableSchema, Warehouse


@dataclass(frozen=True)
class RunOptions:
    run_id: str
    dry_run: bool = False
    limit: int | None = None
    retry_failed_only: bool = False
    flush_rows: int = 50_000


TAIL_FLUSH_ROWS = 5_000
# the first background flush with at most this many records still to push after it also checkpoints
# (DuckDB): the push's earlier flushes are written into the file while the last requests run, and the
# checkpoint when the warehouse session closes, after the last answer, writes only what came since
SETTLE_ROWS = 2 * TAIL_FLUSH_ROWS


def flush_at(flush_rows: int, remaining: int) -> int:
    """Records to buffer before the next flush is handed to the background: ``flush_rows``, fewer
    toward the end of the push — as many as are still to come, down to :data:`TAIL_FLUSH_ROWS` —
    so the last flush, the one the push waits for, is small (100k records in batches of 100: hand-offs
    at 50k, 75k, 87.5k, 93.8k and 98.8k; the push waits for the last 1.2k, not 50k). Each flush has a
    fixed cost (two commits, a state join, catalog reads): the floor is thousands of records, not a batch."""
    return min(flush_rows, max(TAIL_FLUSH_ROWS, remaining))


def field_specs(dest: DestinationSpec, predictions: TableSchema, spec: PipelineSpec) -> list[FieldSpec]:
    """What kind of CRM field each mapped prediction column needs (number / enumeration / …)."""
    known = {
        "next_best_action": tuple(a.action for a in spec.scoring.next_best_action),
        "risk_bucket": tuple(spec.scoring.risk_buckets),
    }
    out: list[FieldSpec] = []
    for col, crm in dest.field_map.items():
        c = predictions.column(col)
        if c is None:
            raise TerminalError(
                f"{dest.name}: fieldMap column {col!r} is not in the predictions table (columns: {predictions.names})"
            )
        if c.type in ("FLOAT64", "INT64", "NUMERIC"):
            out.append(FieldSpec(col, crm, "number"))
        elif c.type in ("TIMESTAMP", "DATE"):
            out.append(FieldSpec(col, crm, "datetime"))
        elif c.type == "BOOL":
            out.append(FieldSpec(col, crm, "bool"))
        elif col in known:
            out.append(FieldSpec(col, crm, "enumeration", known[col]))
        else:
            out.append(FieldSpec(col, crm, "string"))
    return out


def diff_options(wh: Warehouse, spec: PipelineSpec, dest: DestinationSpec, run: RunOptions) -> DiffOptions:
    pred = TableRef(spec.scoring.dataset, spec.scoring.table)
    schema = wh.table_schema(pred)
    if schema is None:
        raise TerminalError(f"{dest.name}: predictions table {pred} does not exist — run scoring first")
    key = dest.entity_key or "customer_id"
    fields = field_specs(dest, schema, spec)
    review = None
    if spec.sync.require_review:
        ref = TableRef(spec.scoring.dataset, spec.scoring.review_table)
        rs = wh.table_schema(ref)
        if rs is None:
            raise TerminalError(f"{dest.name}: sync.requireReview is on but the review table {ref} does not exist")
        review = ReviewSource(ref, key, by_run=rs.column("run_id") is not None and schema.column("run_id") is not None)
    sig = spec.sync.significance
    return DiffOptions(
        pipeline=spec.name,
        destination=dest.name,
        predictions=pred,
        entity_key=key,
        fields=fields,
        bucket_column="risk_bucket" if schema.column("risk_bucket") is not None else None,
        score_columns=tuple(f.column for f in fields if schema.column(f.column).type == "FLOAT64"),  # type: ignore[union-attr]
        min_delta=sig.min_delta,
        on_bucket_change=sig.on_bucket_change,
        retry_cap=spec.sync.retry_cap,
        retry_failed_only=run.retry_failed_only,
        limit=run.limit,
        review=review,
    )


def make_sink(
    dest: DestinationSpec, client: Any, block: str, spec: PipelineSpec, policy: RetryPolicy | None = None
) -> CrmSink:
    if dest.crm == "salesforce":
        from opsloop.crm.salesforce import SalesforceSink

        return SalesforceSink(
            client,
            block,
            str(dest.object),
            str(dest.external_id_field),
            bulk_threshold=spec.sync.bulk_threshold,
            policy=policy,
        )
    from opsloop.crm.hubspot import HubSpotSink

    return HubSpotSink(client, block, str(dest.object), str(dest.external_id_field), policy=policy)


def push_destination(
    wh: Warehouse, sink: CrmSink, dest: DestinationSpec, spec: PipelineSpec, run: RunOptions
) -> dict[str, Any]:
    started = datetime.now(UTC)
    clock = time.perf_counter()
    tables = SyncTables(wh, spec.name, dest.name)
    report: dict[str, Any] = {
        "destination": dest.name,
        "vendor": sink.vendor,
        "object": sink.object,
        "run_id": run.run_id,
        "dry_run": run.dry_run,
        "status": "completed",
        "note": "",
        "candidates": 0,
        "created": 0,
        "updated": 0,
        "failed": 0,
        "rejected": 0,
        "held": 0,
        "deferred": 0,
        "failed_by_code": {},
        "api_calls": 0,
    }
    # warehouse work before the first CRM call (the destination's columns, tables, gate, diff) shares one
    # session, and so do the last flush and the run row after the last call (DuckDB: one connection
    # each, not one per statement; the file is not held while the push waits on the CRM)
    head = contextlib.ExitStack()
    with contextlib.ExitStack() as failed:
        failed.callback(head.close)
        head.enter_context(held_open(wh))
        opts = diff_options(wh, spec, dest, run)
        tables.ensure()
        verdict = push_allowed(wh, opts.pipeline, spec.sync.block_on)
        spent_today = tables.calls_today()
        failed.pop_all()
    if not verdict.allowed:
        head.close()
        report.update(status="blocked", note=verdict.reason)
        return _finish(tables, sink, report, started, clock)
    with contextlib.ExitStack() as tail:
        try:
            with tempfile.TemporaryDirectory(prefix="opsloop-sync-") as tmp:
                with head:
                    diff = build_candidates(wh, opts, tables, Path(tmp))
                last = lambda: tail.enter_context(held_open(wh))  # noqa: E731
                _diff_and_push(sink, opts, spec, run, tables, report, spent_today, diff, last)
        except CrmBudgetExhausted as exc:  # the daily limit was already spent when we probed
            report.update(status="budget_exhausted", note=str(exc))
        except BaseException as exc:
            if report["status"] != "failed":
                report.update(status="failed", note=str(exc)[:500])
            with contextlib.suppress(Exception):
                _finish(tables, sink, report, started, clock)
            raise
        finally:
            head.close()  # idempotent; for a failure before the diff's block
        return _finish(tables, sink, report, started, clock)


def _diff_and_push(
    sink: CrmSink,
    opts: DiffOptions,
    spec: PipelineSpec,
    run: RunOptions,
    tables: SyncTables,
    report: dict[str, Any],
    spent_today: int,
    diff: DiffResult,
    last_flush: Callable[[], Any],
) -> None:
    stats = diff.stats
    report.update(
        candidates=stats["candidates"], staged=diff.staged, diff=stats, held=stats["held"], samples=diff.samples
    )
    check = sink.ensure_schema(opts.fields, diff.values, create=not run.dry_run)
    report["schema"] = {
        "missing": check.missing,
        "created": check.created,
        "updated": check.updated,
        "instructions": check.instructions,
    }
    planned = sink.plan_calls(diff.staged)
    allowance = _allowance(sink, spent_today, spec.sync.api_budget_share)
    report.update(planned_calls=planned, allowance=allowance)
    if run.dry_run:
        report.update(
            status="dry_run",
            would_create=stats["new"],
            would_update=stats["changed"],
            would_hold=stats["held"],
            fits_budget=allowance is None or planned <= allowance,
            note="new = never confirmed by this CRM destination (it may still exist there)",
        )
        return
    _log_review(tables, run.run_id, diff.held, "held")
    _log_review(tables, run.run_id, diff.rejected_by_review, "review_rejected")
    sink.call_budget = None if allowance is None else sink.stats.calls + allowance
    _push(sink, tables, diff.tables(), diff.staged, spec, run, report, last_flush)


def _allowance(sink: CrmSink, spent_today: int, share: float) -> int | None:
    """Calls this run may still make: share × daily limit − opsloop's calls today, ≤ calls left."""
    limit, left = sink.budget.limit, sink.budget.left
    if limit is None:
        return None
    allowed = math.floor(share * limit) - spent_today - sink.stats.calls
    if left is not None:
        allowed = min(allowed, left)
    return max(0, allowed)


def _push(
    sink: CrmSink,
    tables: SyncTables,
    staged: Any,
    total: int,
    spec: PipelineSpec,
    run: RunOptions,
    report: dict[str, Any],
    last_flush: Callable[[], Any] = lambda: None,
) -> None:
    """Push the staged candidates, recording results every ``flush_rows`` records (fewer toward the
    end: :func:`flush_at`); ``last_flush`` is called before the final flush (it opens the session
    the run row is written in).

    A full buffer is recorded on a background thread while the push goes on (one flush at a time,
    in order; the next waits for it, and a failed flush stops the push at the next hand-off), so the
    CRM is not left idle while the warehouse writes (:class:`~opsloop.crm.flusher.BackgroundFlusher`:
    one warehouse session over back-to-back flushes). Records pushed but not yet recorded when the
    process dies: the flush in progress and the buffer (each < ``flush_rows`` + one batch) plus the
    requests in flight — all re-sent with the same values by the next run (idempotent upserts)."""
    buffer: list[BatchResult] = []
    buffered = 0
    attempted = 0
    flushes = 0
    settled = False
    writer = BackgroundFlusher(tables)

    def flush(batch: list[BatchResult], key: str, settle: bool = False) -> None:
        counts = tables.flush(batch, run.run_id, spec.sync.retry_cap, key)
        by_code = report["failed_by_code"]
        for code, k in counts.pop("failed_by_code", {}).items():
            by_code[code] = by_code.get(code, 0) + k
        for name, v in counts.items():
            report[name] = report.get(name, 0) + v
        if settle:
            tables.checkpoint()

    def hand_off() -> None:
        nonlocal buffer, buffered, flushes, settled
        flushes += 1
        settle = not settled and total - attempted <= SETTLE_ROWS
        settled = settled or settle
        writer.submit(flush, buffer, f"{run.run_id}_{flushes}", settle)  # waits for the previous one
        buffer, buffered = [], 0

    try:
        for result in sink.push(staged, total):
            buffer.append(result)
            buffered += len(result)
            attempted += len(result)
            faults.checkpoint("mid_crm_push")
            if attempted < total and buffered >= flush_at(run.flush_rows, total - attempted):
                hand_off()  # the last results are recorded below, on this thread, with all of DuckDB's
    except BudgetCapReached as exc:
        report.update(status="budget_stopped", note=str(exc))
    except CrmBudgetExhausted as exc:
        report.update(status="budget_exhausted", note=str(exc))
    except BaseException as exc:
        report.update(status="failed", note=str(exc)[:500])
        raise
    finally:
        try:
            # opened while the background flush still holds the file: DuckDB shares the open database
            # (no reopening it, one closing checkpoint instead of two)
            last_flush()
        finally:
            failed = writer.finish()
        if buffered:
            flushes += 1
            flush(buffer, f"{run.run_id}_{flushes}")
        report["deferred"] = total - attempted
        report["pushed"] = report.get("created", 0) + report.get("updated", 0)
        if failed is not None and report.get("status") != "failed":
            report.update(status="failed", note=str(failed)[:500])
            raise failed


def _log_review(tables: SyncTables, run_id: str, recs: list[PushRecord], status: str) -> None:
    now = datetime.now(UTC)
    tables.log_rows(
        [
            {
                "run_id": run_id,
                "pipeline": tables.pipeline,
                "destination": tables.destination,
                "entity": r.entity,
                "external_id": r.external_id,
                "payload_hash": r.payload_hash,
                "status": status,
                "error_code": None,
                "error_message": None,
                "attempt": r.attempt,
                "api": "review",
                "crm_id": None,
                "at": now,
            }
            for r in recs
        ]
    )


def _finish(
    tables: SyncTables, sink: CrmSink, report: dict[str, Any], started: datetime, clock: float
) -> dict[str, Any]:
    report.setdefault("pushed", report.get("created", 0) + report.get("updated", 0))
    report.update(
        api_calls=sink.stats.calls,
        api_retries=sink.stats.retries,
        api_paced_s=round(sink.pacer.paced, 3),
        api_used=sink.budget.used,
        api_limit=sink.budget.limit,
        api_left=sink.budget.left,
        seconds=round(time.perf_counter() - clock, 3),
    )
    tables.record_run(
        {
            **report,
            "pipeline": tables.pipeline,
            "started_at": started,
            "finished_at": datetime.now(UTC),
            "note": report.get("note", "")[:1000],
        }
    )
    return report
