"""Thin tasks of nightly scoring: one partition, the post-scoring checks, review decisions."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from prefect import task

from blocks import load_warehouse
from blocks.mlflow import load_registry
from opsloop.ml import monitor, review
from opsloop.ml.models import resolve_models
from opsloop.ml.score import check_scoring_spec, score_partition
from opsloop.spec import load_spec
from tasks.common import TRANSIENT_RETRIES, flow_run_id, run_labels


@task(name="score_partition", **TRANSIENT_RETRIES)
def score_one_partition(
    spec_path: str,
    warehouse: str,
    mlflow: str,
    alias: str,
    as_of: date | None,
    batch_id: str,
    partition: int,
    partitions: int,
) -> dict[str, Any]:
    """Resolve the model (champion → previous → rules), score one hash partition, MERGE, record it."""
    spec = load_spec(spec_path)
    check_scoring_spec(spec, spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, f"score_p{partition}"))
    models = resolve_models(load_registry(mlflow), spec, alias)
    run_id = flow_run_id()
    res = score_partition(
        wh,
        spec,
        models,
        as_of=as_of,
        run_id=run_id,
        batch_id=batch_id,
        scored_at=datetime.now(UTC),
        partition=(partition, partitions) if partitions > 1 else None,
    )
    champ = models.champion
    summary = {
        "partition": partition,
        "rows": res.rows,
        "inserted": res.inserted,
        "updated": res.updated,
        "model_name": champ.name,
        "model_version": champ.version,
        "model_alias": champ.alias,
        "is_fallback": champ.is_fallback,
        "challenger_version": models.challenger.version if models.challenger else None,
        "served": res.served,
        "review_pending": res.review_pending,
        "notes": models.notes,
        "baseline": champ.baseline,
        "drift": res.drift,
    }
    monitor.record_partition(wh, batch_id, partition, partitions, run_id, summary)
    return {k: v for k, v in summary.items() if k not in ("baseline", "drift")}


@task(name="check_drift", **TRANSIENT_RETRIES)
def check_drift(spec_path: str, warehouse: str, batch_id: str, partitions: int) -> dict[str, Any]:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "drift"))
    parts = monitor.read_parts(wh, batch_id)
    monitor.check_complete(parts, partitions, batch_id)
    results, status, action = monitor.apply_drift(wh, spec, parts, batch_id)
    concept = monitor.concept_drift(wh, spec, batch_id)
    return {
        "rows": sum(int(p["rows"]) for p in parts),
        "status": status,
        "action": action,
        "features": [r.__dict__ for r in results],
        "skipped": [r.feature for r in results if r.status == "skipped"],
        "concept_drift": concept,
    }


@task(name="pending_review")
def pending_review(spec_path: str, warehouse: str, batch_id: str) -> dict[str, Any]:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "review"))
    n, rows = review.pending(wh, spec, batch_id)
    return {"pending": n, "rows": rows}


@task(name="apply_review", **TRANSIENT_RETRIES)
def apply_review(
    spec_path: str, warehouse: str, batch_id: str, approve: bool, decided_by: str, note: str, reject_ids: list[str]
) -> dict[str, int]:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "review"))
    return review.decide(wh, spec, batch_id, approve, decided_by, note, reject_ids)
