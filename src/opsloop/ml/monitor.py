"""After scoring: partition bookkeeping, feature/score drift with its policy, concept drift.

* ``{meta}._score_parts`` — one row per (batch, partition): rows, model, drift bin counts. The
  parent of a fan-out reads it to check completeness and to sum the drift counts.
* ``{meta}._drift`` — PSI per feature (+ ``__score__``) per scoring run; the KPI stage reads it.
* the ``drift`` gate (:mod:`opsloop.crm.gates`) — ``block`` under policy block_push when a PSI
  alerts; a retrain trigger (:mod:`opsloop.ml.triggers`) under policy retrain.
* ``{meta}.model_quality`` — realised ROC AUC of past predictions per scoring date once labels
  arrive (rank-sum in SQL); below ``minRealisedAuc`` → a ``concept_drift`` retrain trigger.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa

from opsloop.crm.gates import record_gate
from opsloop.errors import TerminalError
from opsloop.ml import triggers
from opsloop.ml.drift import DriftCounter, FeatureDrift, evaluate_drift
from opsloop.ml.sql import merge_from_query
from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import MergeSpec, TableRef, TableSchema, Warehouse
from opsloop.warehouse.write import write_merge

TS = pa.timestamp("us", tz="UTC")
PARTS = pa.schema(
    [
        ("batch_id", pa.string()),
        ("partition", pa.int64()),
        ("partitions", pa.int64()),
        ("run_id", pa.string()),
        ("rows", pa.int64()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("is_fallback", pa.bool_()),
        ("served", pa.string()),
        ("review_pending", pa.int64()),
        ("baseline", pa.string()),
        ("drift_counts", pa.string()),
        ("finished_at", TS),
    ]
)
DRIFT = pa.schema(
    [
        ("run_id", pa.string()),
        ("pipeline", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("feature", pa.string()),
        ("psi", pa.float64()),
        ("status", pa.string()),
        ("rows", pa.int64()),
        ("note", pa.string()),
        ("policy", pa.string()),
        ("action", pa.string()),
        ("at", TS),
    ]
)


def record_partition(
    wh: Warehouse, batch_id: str, partition: int, partitions: int, run_id: str, summary: dict[str, Any]
) -> None:
    """MERGE this partition's completion row (a rerun replaces it)."""
    ref = TableRef(wh.meta_dataset, "_score_parts")
    row = {
        "batch_id": batch_id,
        "partition": partition,
        "partitions": partitions,
        "run_id": run_id,
        "rows": summary["rows"],
        "model_name": summary["model_name"],
        "model_version": summary["model_version"],
        "is_fallback": summary["is_fallback"],
        "served": json.dumps(summary["served"]),
        "review_pending": summary["review_pending"],
        "baseline": json.dumps(summary.get("baseline")) if summary.get("baseline") else None,
        "drift_counts": json.dumps(summary["drift"]) if summary.get("drift") else None,
        "finished_at": datetime.now(UTC),
    }
    table = pa.Table.from_pylist([row], schema=PARTS)
    write_merge(
        wh,
        ref,
        TableSchema.from_arrow(PARTS),
        PARTS,
        table.to_batches(),
        MergeSpec(ref, tuple(PARTS.names), ("batch_id", "partition")),
        job_key=f"{batch_id}_part{partition}",
        staging=TableRef(wh.meta_dataset, f"_stg__score_parts_p{partition}"),
    )


def read_parts(wh: Warehouse, batch_id: str) -> list[dict[str, Any]]:
    ref = TableRef(wh.meta_dataset, "_score_parts")
    if wh.table_schema(ref) is None:
        return []
    return wh.query(
        f"SELECT * FROM {wh.quote(ref)} WHERE batch_id = {wh.param('b')} ORDER BY partition", {"b": batch_id}
    ).to_pylist()


def check_complete(parts: list[dict[str, Any]], partitions: int, batch_id: str) -> None:
    done = {int(p["partition"]) for p in parts}
    missing = sorted(set(range(partitions)) - done)
    if missing:
        raise TerminalError(
            f"scoring batch {batch_id}: partition(s) {missing} of {partitions} have not finished — rerun them "
            f"(score flow with batch={batch_id!r}, partitions={partitions}, partition=<n>)"
        )


def apply_drift(
    wh: Warehouse, spec: PipelineSpec, parts: list[dict[str, Any]], run_id: str
) -> tuple[list[FeatureDrift], str, str]:
    """PSI over all partitions' counts → ``_drift`` rows, the drift gate and the policy action.
    Returns (results, overall status, action taken)."""
    ds = spec.scoring.drift
    baseline = next((json.loads(p["baseline"]) for p in parts if p.get("baseline")), None)
    model = parts[0] if parts else {}
    if baseline is None:
        why = "rules fallback" if model.get("is_fallback") else "no training baseline logged with the model"
        results = [FeatureDrift("__all__", None, "skipped", sum(int(p["rows"]) for p in parts), why)]
    else:
        counter = DriftCounter(baseline)
        for p in parts:
            if p.get("drift_counts"):
                counter.merge(json.loads(p["drift_counts"]))
        results = evaluate_drift(counter, ds)
    alerts = [r for r in results if r.status == "alert"]
    warns = [r for r in results if r.status == "warn"]
    status = "alert" if alerts else "warn" if warns else "ok"
    action, gate = "none", "pass"
    detail = "; ".join(f"{r.feature} PSI {r.psi:.3f}" for r in alerts or warns if r.psi is not None)
    if alerts:
        if ds.policy == "block_push":
            action, gate = "block_push", "block"
        elif ds.policy == "retrain":
            action, gate = "retrain", "warn"
            triggers.add_trigger(wh, spec, "drift", f"PSI ≥ alertPsi {ds.alert_psi}: {detail}", run_id)
        else:
            action, gate = "warn", "warn"
    elif warns:
        action, gate = "warn", "warn"
    reason = f"drift {status} (policy {ds.policy}): {detail or 'no feature above warnPsi'}"
    record_gate(wh, spec.name, run_id, "drift", gate, reason)
    now = datetime.now(UTC)
    rows = [
        {
            "run_id": run_id,
            "pipeline": spec.name,
            "model_name": model.get("model_name"),
            "model_version": model.get("model_version"),
            "feature": r.feature,
            "psi": r.psi,
            "status": r.status,
            "rows": r.rows,
            "note": r.note,
            "policy": ds.policy,
            "action": action,
            "at": now,
        }
        for r in results
    ]
    wh.append(TableRef(wh.meta_dataset, "_drift"), pa.Table.from_pylist(rows, schema=DRIFT))
    return results, status, action


def realised_auc_sql(wh: Warehouse, spec: PipelineSpec, score_expr: str = "h.{score}") -> str:
    """Rank-sum ROC AUC per (score date, model version) of labelled past predictions, in the warehouse."""
    assert spec.model is not None
    lb = spec.scoring.drift.labels
    if lb is None:
        raise TerminalError("scoring.drift.labels: not configured")
    q, sc = wh.quote, spec.scoring
    key = spec.model.features.entity_key
    expr = score_expr.format(score=q(sc.score_column))
    evt = f"l.{q(lb.event_time)}" if lb.event_time else "NULL"
    day = "TIMESTAMP(h.{d})" if wh.dialect == "bigquery" else "CAST(h.{d} AS TIMESTAMPTZ)"
    since_day = day.format(d=q("score_date"))
    return f"""
WITH j AS (
  SELECT h.{q("score_date")} AS score_date, h.{q("model_name")} AS model_name, h.{q("model_version")} AS model_version,
         {expr} AS s,
         CASE WHEN l.{q(lb.column)} IS NULL THEN NULL
              WHEN l.{q(lb.column)} AND ({evt} IS NULL OR {evt} >= {since_day}) THEN 1
              WHEN l.{q(lb.column)} THEN NULL
              ELSE 0 END AS y
  FROM {q(TableRef(sc.dataset, sc.history_table))} AS h
  JOIN {q(TableRef(lb.dataset, lb.table))} AS l ON CAST(l.{q(lb.key)} AS STRING) = h.{q(key)}
  WHERE h.{q("score_date")} >= {wh.param("since")} AND NOT h.{q("is_fallback")}
),
k AS (SELECT * FROM j WHERE y IS NOT NULL AND s IS NOT NULL),
r AS (
  SELECT score_date, model_name, model_version, y,
         RANK() OVER (PARTITION BY score_date, model_name, model_version ORDER BY s)
           + (COUNT(*) OVER (PARTITION BY score_date, model_name, model_version, s) - 1) / 2.0 AS rk
  FROM k
)
SELECT score_date, model_name, model_version, COUNT(*) AS n_labelled, SUM(y) AS positives,
       (SUM(CASE WHEN y = 1 THEN rk ELSE 0 END) - SUM(y) * (SUM(y) + 1) / 2.0)
         / NULLIF(SUM(y) * (COUNT(*) - SUM(y)), 0) AS realised_auc
FROM r GROUP BY score_date, model_name, model_version"""


def concept_drift(wh: Warehouse, spec: PipelineSpec, run_id: str, today: date | None = None) -> dict[str, Any]:
    """Realised AUC per scoring date → ``{meta}.model_quality``; a low one → retrain trigger."""
    ds = spec.scoring.drift
    if ds.labels is None:
        return {"status": "skipped", "reason": "scoring.drift.labels not configured"}
    hist = TableRef(spec.scoring.dataset, spec.scoring.history_table)
    if wh.table_schema(hist) is None:
        return {"status": "skipped", "reason": f"{hist} does not exist yet"}
    since = (today or datetime.now(UTC).date()) - timedelta(days=ds.label_lookback_days)
    q = wh.quote
    select = (
        f"SELECT {wh.param('pipeline')} AS pipeline, a.*, "
        f"a.n_labelled >= {int(ds.min_labels)} AND a.realised_auc IS NOT NULL AS judged, "
        f"{wh.param('run_id')} AS run_id, {wh.param('now')} AS computed_at "
        f"FROM ({realised_auc_sql(wh, spec)}) AS a"
    )
    select = select.replace("AS STRING)", "AS VARCHAR)") if wh.dialect != "bigquery" else select
    params = {"since": since, "pipeline": spec.name, "run_id": run_id, "now": datetime.now(UTC)}
    target = TableRef(wh.meta_dataset, "model_quality")
    merge_from_query(wh, target, select, params, ("pipeline", "model_name", "model_version", "score_date"))
    rows = wh.query(
        f"SELECT * FROM {q(target)} WHERE pipeline = {wh.param('p')} AND score_date >= {wh.param('since')} "
        f"ORDER BY score_date",
        {"p": spec.name, "since": since},
    ).to_pylist()
    low = [r for r in rows if r["judged"] and r["realised_auc"] < ds.min_realised_auc]
    if low:
        worst = min(low, key=lambda r: r["realised_auc"])
        reason = (
            f"realised AUC {worst['realised_auc']:.3f} < minRealisedAuc {ds.min_realised_auc} for predictions of "
            f"{worst['score_date']} (v{worst['model_version']}, {worst['n_labelled']} labelled)"
        )
        triggers.add_trigger(wh, spec, "concept_drift", reason, run_id)
        return {"status": "alert", "reason": reason, "dates": len(rows)}
    return {"status": "ok", "dates": len(rows), "judged": sum(1 for r in rows if r["judged"])}
