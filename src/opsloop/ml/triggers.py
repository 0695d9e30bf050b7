"""Retrain triggers: a small warehouse table other stages append to (drift, concept drift,
manual) and the nightly flow reads through :func:`should_retrain`.

``{meta}._retrain_triggers``: one row per trigger; ``consumed_at``/``consumed_by_run`` are set
by the training run that acted on it. A finished training appends a ``source='trained'`` row, so
the schedule (``model.retrainEvery``) is measured from the last training.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import TableRef, TableSchema, Warehouse

TABLE = "_retrain_triggers"
TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        ("trigger_id", pa.string()),
        ("pipeline", pa.string()),
        ("model_name", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("created_at", TS),
        ("created_by_run", pa.string()),
        ("consumed_at", TS),
        ("consumed_by_run", pa.string()),
    ]
)


def trigger_table(wh: Warehouse) -> TableRef:
    return TableRef(wh.meta_dataset, TABLE)


def _ensure(wh: Warehouse) -> TableRef:
    ref = trigger_table(wh)
    wh.ensure_table(ref, TableSchema.from_arrow(SCHEMA))
    return ref


def add_trigger(
    wh: Warehouse, spec: PipelineSpec, source: str, reason: str, run_id: str, consumed: bool = False
) -> str:
    """Append a trigger (``source``: drift | concept_drift | schedule | manual | trained).

    A pending trigger with the same source and reason is not appended again (its id is returned):
    the rerun of a failed nightly scores again and must not queue the same reason twice."""
    ref = _ensure(wh)
    if not consumed:
        same = wh.query(
            f"SELECT trigger_id FROM {wh.quote(ref)} WHERE pipeline = {wh.param('p')} AND model_name = {wh.param('m')} "
            f"AND source = {wh.param('s')} AND reason = {wh.param('r')} AND consumed_at IS NULL",
            {"p": spec.name, "m": spec.model.name if spec.model else "", "s": source, "r": reason[:1000]},
        ).to_pylist()
        if same:
            return str(same[0]["trigger_id"])
    now = datetime.now(UTC)
    tid = uuid.uuid4().hex
    row = {
        "trigger_id": [tid],
        "pipeline": [spec.name],
        "model_name": [spec.model.name if spec.model else ""],
        "source": [source],
        "reason": [reason[:1000]],
        "created_at": [now],
        "created_by_run": [run_id],
        "consumed_at": [now if consumed else None],
        "consumed_by_run": [run_id if consumed else None],
    }
    wh.append(ref, pa.table(row, schema=SCHEMA))
    return tid


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reasons: list[str] = field(default_factory=list)
    pending: int = 0
    last_trained: datetime | None = None


def should_retrain(wh: Warehouse, spec: PipelineSpec, now: datetime | None = None) -> RetrainDecision:
    """True when a trigger is pending, the schedule is due, or the model was never trained."""
    if spec.model is None:
        return RetrainDecision(False, ["the spec has no model section"])
    ref = _ensure(wh)
    now = now or datetime.now(UTC)
    rows = wh.query(
        f"SELECT source, reason, created_at, consumed_at FROM {wh.quote(ref)} "
        f"WHERE pipeline = {wh.param('p')} AND model_name = {wh.param('m')}",
        {"p": spec.name, "m": spec.model.name},
    ).to_pylist()
    pending = [r for r in rows if r["consumed_at"] is None and r["source"] != "trained"]
    trained = [r["created_at"] for r in rows if r["source"] == "trained"]
    last = max(trained) if trained else None
    reasons = [f"{r['source']}: {r['reason']}" for r in pending]
    every = spec.model.retrain_every
    if last is None:
        reasons.append("no training recorded yet")
    elif every is not None and now - last >= every:
        reasons.append(f"schedule: last training {last.isoformat(timespec='minutes')} is older than {every}")
    return RetrainDecision(bool(reasons), reasons, len(pending), last)


def consume_triggers(wh: Warehouse, spec: PipelineSpec, run_id: str, started: datetime, outcome: str) -> int:
    """Mark the triggers a training run acted on, and record the training itself."""
    ref = _ensure(wh)
    name = spec.model.name if spec.model else ""
    stats = wh.execute(
        f"UPDATE {wh.quote(ref)} SET consumed_at = {wh.param('now')}, consumed_by_run = {wh.param('run')} "
        f"WHERE pipeline = {wh.param('p')} AND model_name = {wh.param('m')} AND consumed_at IS NULL "
        f"AND created_at <= {wh.param('started')}",
        {"now": datetime.now(UTC), "run": run_id, "p": spec.name, "m": name, "started": started},
        kind="dml",
    )
    add_trigger(wh, spec, "trained", outcome, run_id, consumed=True)
    return stats.rows
