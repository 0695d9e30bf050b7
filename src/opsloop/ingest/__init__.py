"""Ingest core: run one source into the warehouse and summarise what happened.

The Prefect task builds the source reader from its block (DSN, CRM client, salt) and calls
:func:`ingest_source`; everything here is plain Python on the warehouse protocol.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Protocol

from opsloop.heap import arrow_pool_that_returns_memory, freeze_startup_objects
from opsloop.ingest.loader import StreamLoader, resolve_target
from opsloop.ingest.runlog import StreamRun, cliff_flag, previous_counts, record_runs
from opsloop.ingest.writer import session
from opsloop.sources.base import Sink
from opsloop.spec import PipelineSpec, SourceSpec
from opsloop.warehouse.base import Warehouse

__all__ = ["SourceReader", "StreamLoader", "ingest_source", "resolve_target", "summarise"]


class SourceReader(Protocol):
    def run(self, sink: Sink, full_refresh: bool = False, since: datetime | None = None) -> Any: ...


def _report_dict(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    if hasattr(report, "as_dict"):
        return dict(report.as_dict())
    return dict(report) if isinstance(report, dict) else {"report": str(report)}


def ingest_source(
    wh: Warehouse,
    spec: PipelineSpec,
    source: SourceSpec,
    reader: SourceReader,
    run_id: str,
    salt: bytes | None = None,
    full_refresh: bool = False,
    since: datetime | None = None,
    now: datetime | None = None,
    segment_rows: int = 1_000_000,
) -> dict[str, Any]:
    """Extract → gate → PII → stage → MERGE + state for every stream of ``source``; returns a summary."""
    started = time.perf_counter()
    freeze_startup_objects()  # the libraries and the spec: out of the collector's way, at exit too
    arrow_pool_that_returns_memory()
    with session(wh):  # one warehouse connection for the source's loads and bookkeeping (DuckDB)
        loader = StreamLoader(wh, spec, source, run_id, salt, now, segment_rows=segment_rows)
        report = _report_dict(reader.run(loader, full_refresh=full_refresh, since=since))
        runs = list(loader.runs.values())
        _record(wh, spec, run_id, runs, report)
    return summarise(source, runs, report, time.perf_counter() - started)


def _record(wh: Warehouse, spec: PipelineSpec, run_id: str, runs: list[StreamRun], report: dict[str, Any]) -> None:
    q = spec.transform.quarantine
    for run in runs:
        if report.get("slot_lag_bytes") is not None:
            run.slot_lag_bytes = int(report["slot_lag_bytes"])
        try:
            flag = cliff_flag(previous_counts(wh, spec.name, run), run.rows_read, q.row_drop_warn, q.min_rows)
        except Exception as exc:  # the check is advisory; never fail a committed load over it
            flag = f"row-count history unavailable: {exc}"
        if flag:
            run.flags.append(flag)
    record_runs(wh, spec.name, run_id, runs)


def summarise(source: SourceSpec, runs: list[StreamRun], report: dict[str, Any], seconds: float) -> dict[str, Any]:
    total = {k: sum(getattr(r, k) for r in runs) for k in ("rows_read", "rows_quarantined", "inserted", "updated")}
    total["deleted"] = sum(r.deleted for r in runs)
    by_rule: dict[str, int] = {}
    for r in runs:
        for rule, k in r.quarantined_by_rule.items():
            by_rule[rule] = by_rule.get(rule, 0) + k
    warnings = list(report.pop("warnings", []))
    for r in runs:
        warnings += [
            f"{r.stream}: {f}" for f in r.flags if f.startswith(("row-count", "key scan", "run log", "watermark"))
        ]
    return {
        "source": source.id,
        "kind": source.kind,
        **report,
        **total,
        "rows_ingested": total["inserted"] + total["updated"] + total["deleted"],
        "quarantined_by_rule": by_rule,
        "seconds": round(seconds, 3),
        "warnings": warnings,
        "streams": {r.stream: r.as_dict() for r in runs},
    }
