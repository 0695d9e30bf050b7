"""Train → register → gate → aliases, and rollback. Every decision is a model-version tag
(``opsloop.decision`` + ``opsloop.reason``) so the registry tells why a version is where it is."""

from __future__ import annotations

import tempfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from opsloop.errors import TerminalError
from opsloop.ml.features import to_frame
from opsloop.ml.promotion import CHALLENGER, CHAMPION, PREVIOUS, Decision, decide
from opsloop.ml.registry import MLflowAdapter, ModelVersionInfo
from opsloop.ml.report import calibration_table
from opsloop.ml.train import TrainResult, evaluate, load_training_data, pipeline_feature_spec, train
from opsloop.spec.ml import ModelSpec
from opsloop.warehouse.base import Warehouse


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def champion_on_holdout(
    reg: MLflowAdapter, ms: ModelSpec, result: TrainResult
) -> tuple[ModelVersionInfo | None, dict[str, float] | None, str | None]:
    """Score the challenger's holdout with the current champion: (version, metrics, why-incomparable)."""
    champ = reg.version(ms.name, CHAMPION)
    if champ is None:
        return None, None, None
    model = reg.load_model(ms.name, champ.version)
    try:
        cfs = pipeline_feature_spec(model, ms.features)
    except (KeyError, AttributeError, ValueError) as exc:
        return champ, None, f"champion v{champ.version} is not an opsloop pipeline: {exc}"
    table = result.holdout_table
    have = set(table.column_names) if table is not None else set(result.x_test.columns)
    missing = [c for c in cfs.columns if c not in have]
    if missing:
        return champ, None, f"champion v{champ.version} needs columns {missing} the holdout lacks"
    x = to_frame(table, cfs) if table is not None else result.x_test[cfs.columns]
    try:
        scores = np.asarray(model.predict_proba(x)[:, 1], dtype=float)
    except Exception as exc:  # a champion that cannot score the holdout is reported, not fatal
        return champ, None, f"champion v{champ.version} cannot score the holdout: {exc}"
    return champ, evaluate(result.y_test, scores), None


def train_and_register(
    wh: Warehouse,
    reg: MLflowAdapter,
    ms: ModelSpec,
    as_of: date | None,
    reason: str,
    pipeline: str,
    flow_run_id: str = "local",
) -> dict[str, Any]:
    """Read the snapshot, train, compare with the champion, register, move aliases. Returns a summary."""
    reg.ping()
    data = load_training_data(wh, ms, as_of)
    with tempfile.TemporaryDirectory(prefix="opsloop-train-") as tmp:
        result = train(data, ms, Path(tmp))
        champ, champ_metrics, incomparable = champion_on_holdout(reg, ms, result)
        gap = result.fairness["gap"] if result.fairness else None
        if champ is not None and champ_metrics is None:
            decision = Decision(False, None, f"not promoted: {incomparable}")
        else:
            decision = decide(result.metrics, ms.promotion, champ_metrics, champ.version if champ else None, gap)
        tags = {
            "opsloop.pipeline": pipeline,
            "opsloop.as_of": str(as_of or ""),
            "opsloop.trigger": reason,
            "opsloop.flow_run_id": flow_run_id,
            "opsloop.decision": decision.label,
            "opsloop.reason": decision.reason,
            "opsloop.decided_at": _now(),
        }
        if champ is not None:
            tags["opsloop.compared_with"] = champ.version
        extra = {
            "calibration.json": calibration_table(result.y_test, result.scores_test),
            "decision.json": {
                "decision": decision.label,
                "reason": decision.reason,
                "challenger": result.metrics,
                "champion": champ_metrics,
                "champion_version": champ.version if champ else None,
            },
        }
        cand = reg.log_candidate(ms, result, tags, extra_artifacts=extra)
    if decision.alias == CHAMPION:
        if champ is not None:
            reg.set_alias(ms.name, PREVIOUS, champ.version)
            reg.tag_version(ms.name, cand.version, {"opsloop.previous_version": champ.version})
            reg.tag_version(
                ms.name, champ.version, {"opsloop.replaced_by": cand.version, "opsloop.replaced_at": _now()}
            )
        reg.set_alias(ms.name, CHAMPION, cand.version)
    elif decision.alias == CHALLENGER:
        reg.set_alias(ms.name, CHALLENGER, cand.version)
    return {
        "model": ms.name,
        "version": cand.version,
        "run_id": cand.run_id,
        "decision": decision.label,
        "reason": decision.reason,
        "metrics": result.metrics,
        "champion_version": champ.version if champ else None,
        "champion_metrics": champ_metrics,
        "fairness": result.fairness,
        "importance": result.importance[:10],
        "calibration": calibration_table(result.y_test, result.scores_test),
        "rows": result.rows,
        "baseline_features": len(result.baseline.get("features", {})),
    }


def rollback(reg: MLflowAdapter, name: str, reason: str) -> dict[str, Any]:
    """Move ``champion`` back to the ``previous`` version in one step; tag both with the reason."""
    reg.ping()
    champ = reg.version(name, CHAMPION)
    prev = reg.version(name, PREVIOUS)
    if prev is None:
        raise TerminalError(
            f"model {name!r}: no 'previous' alias to roll back to (champion is v{champ and champ.version})"
        )
    reg.set_alias(name, CHAMPION, prev.version)
    before = prev.tags.get("opsloop.previous_version")
    if before and before != (champ.version if champ else None):
        reg.set_alias(name, PREVIOUS, before)
    else:
        reg.delete_alias(name, PREVIOUS)
    if champ is not None:
        reg.tag_version(
            name,
            champ.version,
            {"opsloop.decision": "rolled_back", "opsloop.reason": reason, "opsloop.decided_at": _now()},
        )
    reg.tag_version(
        name,
        prev.version,
        {"opsloop.decision": "restored", "opsloop.reason": f"rollback: {reason}", "opsloop.decided_at": _now()},
    )
    return {
        "model": name,
        "champion": prev.version,
        "rolled_back": champ.version if champ else None,
        "previous": before if before and before != (champ.version if champ else None) else None,
        "reason": reason,
    }
