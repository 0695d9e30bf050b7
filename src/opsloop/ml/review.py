"""Human-in-the-loop: high-risk predictions wait in the review queue until a person decides.

Queue rows (``scoring.reviewTable``) are keyed on (entity, run_id) with ``status`` pending →
``released`` (approved) or ``rejected``; the predictions' ``review_status`` follows. The CRM push
(when ``sync.requireReview``) sends queued entities only once released.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import TableRef, Warehouse


def _refs(spec: PipelineSpec) -> tuple[TableRef, TableRef]:
    sc = spec.scoring
    return TableRef(sc.dataset, sc.review_table), TableRef(sc.dataset, sc.table)


def pending(wh: Warehouse, spec: PipelineSpec, batch_id: str, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
    """How many rows of this batch wait for review, and the first ``limit`` of them (highest score first)."""
    queue, _ = _refs(spec)
    if wh.table_schema(queue) is None:
        return 0, []
    where = f"batch_id = {wh.param('b')} AND status = 'pending'"
    n = wh.query(f"SELECT COUNT(*) AS n FROM {wh.quote(queue)} WHERE {where}", {"b": batch_id}).column(0)[0].as_py()
    rows = wh.query(
        f"SELECT * FROM {wh.quote(queue)} WHERE {where} ORDER BY score DESC LIMIT {int(limit)}", {"b": batch_id}
    ).to_pylist()
    return int(n or 0), rows


def decide(
    wh: Warehouse,
    spec: PipelineSpec,
    batch_id: str,
    approve: bool,
    decided_by: str,
    note: str = "",
    reject_keys: Sequence[str] = (),
) -> dict[str, int]:
    """Release (approve) or reject this batch's pending rows; ``reject_keys`` are rejected either way."""
    assert spec.model is not None
    queue, pred = _refs(spec)
    key = wh.quote(spec.model.features.entity_key)
    now = datetime.now(UTC)
    out = {"released": 0, "rejected": 0}
    rejects = list(dict.fromkeys(reject_keys))
    base: dict[str, Any] = {"b": batch_id, "now": now, "by": decided_by, "note": note[:1000]}
    keyed = {f"k{i}": k for i, k in enumerate(rejects)}
    in_rejects = f"{key} IN ({', '.join(wh.param(p) for p in keyed)})"
    steps = [("rejected", in_rejects, {**base, **keyed})] if rejects else []
    steps.append(("released" if approve else "rejected", "TRUE", base))
    for status, cond, params in steps:
        before = _count(wh, queue, batch_id)
        wh.execute(
            f"UPDATE {wh.quote(queue)} SET status = '{status}', decided_at = {wh.param('now')}, "
            f"decided_by = {wh.param('by')}, note = {wh.param('note')} "
            f"WHERE batch_id = {wh.param('b')} AND status = 'pending' AND {cond}",
            params,
            kind="dml",
        )
        out[status] += before - _count(wh, queue, batch_id)
    wh.execute(
        f"UPDATE {wh.quote(pred)} AS p SET review_status = q.status FROM {wh.quote(queue)} AS q "
        f"WHERE p.{key} = q.{key} AND p.run_id = q.run_id AND q.batch_id = {wh.param('b')} "
        f"AND p.review_status = 'pending'",
        {"b": batch_id},
        kind="dml",
    )
    return out


def _count(wh: Warehouse, queue: TableRef, batch_id: str) -> int:
    t = wh.query(
        f"SELECT COUNT(*) AS n FROM {wh.quote(queue)} WHERE batch_id = {wh.param('b')} AND status = 'pending'",
        {"b": batch_id},
    )
    return int(t.column(0)[0].as_py() or 0)
