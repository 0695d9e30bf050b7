"""Per-run, per-stream counts (``<meta>._ingest_runs``) and the row-count cliff check.

One row per stream per ingest run: rows read / quarantined / inserted / updated / deleted, the
position before and after, seconds, slot lag. A run that reads far fewer rows than the median of
the last runs of the same kind (snapshot, incremental, full) is flagged — a source that silently
lost data or a broken watermark shows up here before anyone trains on it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from opsloop.errors import OpsloopError
from opsloop.transform import pyvalues
from opsloop.warehouse.base import TableRef, Warehouse

RUNS_TABLE = "_ingest_runs"
RUNS_SCHEMA = pa.schema(
    [
        ("pipeline", pa.string()),
        ("source", pa.string()),
        ("stream", pa.string()),
        ("run_id", pa.string()),
        ("kind", pa.string()),
        ("rows_read", pa.int64()),
        ("rows_quarantined", pa.int64()),
        ("inserted", pa.int64()),
        ("updated", pa.int64()),
        ("deleted", pa.int64()),
        ("position_before", pa.string()),
        ("position_after", pa.string()),
        ("seconds", pa.float64()),
        ("slot_lag_bytes", pa.int64()),
        ("flags", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
HISTORY = 5


@dataclass
class StreamRun:
    """What one ingest run did to one stream (summed over its loads)."""

    source: str
    stream: str
    target: str = ""
    kind: str = "incremental"
    rows_read: int = 0
    rows_quarantined: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    loads: int = 0
    seconds: float = 0.0
    position_before: str = ""
    position_after: str = ""
    slot_lag_bytes: int | None = None
    quarantined_by_rule: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def add_count_flag(self, prefix: str, n: int, text: str) -> None:
        """Keep one ``<prefix><total> <text>`` flag per stream, summed over its loads."""
        old = next((f for f in self.flags if f.startswith(prefix)), None)
        total = n + (int(old[len(prefix) :].split(" ", 1)[0]) if old else 0)
        if old:
            self.flags.remove(old)
        self.flags.append(f"{prefix}{total} {text}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "target": self.target,
            "kind": self.kind,
            "rows_read": self.rows_read,
            "rows_quarantined": self.rows_quarantined,
            "inserted": self.inserted,
            "updated": self.updated,
            "deleted": self.deleted,
            "loads": self.loads,
            "seconds": round(self.seconds, 3),
            "position_before": self.position_before,
            "position_after": self.position_after,
            "quarantined_by_rule": dict(self.quarantined_by_rule),
            "flags": list(self.flags),
        }


def _runs_ref(wh: Warehouse) -> TableRef:
    return TableRef(wh.meta_dataset, RUNS_TABLE)


def previous_counts(wh: Warehouse, pipeline: str, run: StreamRun, limit: int = HISTORY) -> list[int]:
    ref = _runs_ref(wh)
    if wh.table_schema(ref) is None:
        return []
    p = wh.param
    sql = (
        f"SELECT rows_read FROM {wh.quote(ref)} WHERE pipeline = {p('pipeline')} AND source = {p('source')} "
        f"AND stream = {p('stream')} AND kind = {p('kind')} ORDER BY finished_at DESC LIMIT {int(limit)}"
    )
    rows = wh.query(sql, {"pipeline": pipeline, "source": run.source, "stream": run.stream, "kind": run.kind})
    return [int(v) for v in rows.column(0).to_pylist() if v is not None]


def cliff_flag(history: list[int], rows_read: int, drop_warn: float, min_rows: int) -> str | None:
    """A flag text when ``rows_read`` fell below ``drop_warn`` × the median of ``history``."""
    if not history or drop_warn <= 0:
        return None
    median = statistics.median(history)
    if median < max(min_rows, 1) or rows_read >= drop_warn * median:
        return None
    return (
        f"row-count cliff: {rows_read} rows read vs a median of {median:g} over the last {len(history)} "
        f"runs (warn below {drop_warn:.0%})"
    )


def record_runs(wh: Warehouse, pipeline: str, run_id: str, runs: list[StreamRun]) -> None:
    """Append the run's counts; a failure here never fails the ingest (the data is committed)."""
    if not runs:
        return
    now = datetime.now(UTC)
    rows = [
        {
            "pipeline": pipeline,
            "source": r.source,
            "stream": r.stream,
            "run_id": run_id,
            "kind": r.kind,
            "rows_read": r.rows_read,
            "rows_quarantined": r.rows_quarantined,
            "inserted": r.inserted,
            "updated": r.updated,
            "deleted": r.deleted,
            "position_before": r.position_before,
            "position_after": r.position_after,
            "seconds": r.seconds,
            "slot_lag_bytes": r.slot_lag_bytes,
            "flags": "; ".join(r.flags) or None,
            "finished_at": now,
        }
        for r in runs
    ]
    try:
        wh.append(_runs_ref(wh), pyvalues.table(rows, RUNS_SCHEMA))
    except OpsloopError as exc:  # pragma: no cover - reporting only
        for r in runs:
            r.flags.append(f"run log not written: {exc}")
