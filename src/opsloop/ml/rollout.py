"""Finishing a shadow / canary rollout: compare the challenger's scores with the champion's on the
same entities (distribution PSI) and, where labels arrived, their realised ROC AUC; then promote
the challenger (champion → previous), reject it (alias removed) or wait for more labels."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from opsloop.errors import TerminalError
from opsloop.ml.drift import psi
from opsloop.ml.monitor import realised_auc_sql
from opsloop.ml.promotion import CHALLENGER, CHAMPION, PREVIOUS
from opsloop.ml.registry import MLflowAdapter
from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import TableRef, Warehouse

EDGES = np.linspace(0, 1, 11)


def _realised(wh: Warehouse, spec: PipelineSpec, version: str, column: str) -> tuple[float | None, int]:
    if spec.scoring.drift.labels is None:
        return None, 0
    sql = realised_auc_sql(wh, spec, score_expr=f"h.{wh.quote(column)}")
    sql = sql.replace("NOT h.", f"h.{wh.quote('challenger_version')} = {wh.param('v')} AND NOT h.")
    rows = wh.query(
        f"SELECT SUM(n_labelled) AS n, SUM(realised_auc * n_labelled) / NULLIF(SUM(n_labelled), 0) AS auc "
        f"FROM ({sql}) AS a WHERE realised_auc IS NOT NULL",
        {"since": datetime(1970, 1, 1, tzinfo=UTC).date(), "v": version},
    ).to_pylist()
    n = int(rows[0]["n"] or 0) if rows else 0
    return (rows[0]["auc"] if n else None), n


def evaluate_rollout(wh: Warehouse, reg: MLflowAdapter, spec: PipelineSpec) -> dict[str, Any]:
    assert spec.model is not None
    name, ps = spec.model.name, spec.model.promotion
    chall, champ = reg.version(name, CHALLENGER), reg.version(name, CHAMPION)
    if chall is None or champ is None:
        raise TerminalError(f"model {name!r}: needs both @champion and @challenger to finish a rollout")
    hist = TableRef(spec.scoring.dataset, spec.scoring.history_table)
    q = wh.quote
    scores = wh.query(
        f"SELECT champion_score, challenger_score FROM {q(hist)} "
        f"WHERE challenger_version = {wh.param('v')} AND challenger_score IS NOT NULL",
        {"v": chall.version},
    )
    if scores.num_rows < spec.scoring.drift.min_sample:
        return {"decision": "wait", "reason": f"only {scores.num_rows} shadow/canary scores so far"}
    a = np.asarray(scores.column(0).to_numpy(zero_copy_only=False), dtype=float)
    b = np.asarray(scores.column(1).to_numpy(zero_copy_only=False), dtype=float)
    dist = psi(np.histogram(a, EDGES)[0], np.histogram(b, EDGES)[0])
    auc_champ, n = _realised(wh, spec, chall.version, "champion_score")
    auc_chall, _ = _realised(wh, spec, chall.version, "challenger_score")
    facts = f"score PSI {dist:.3f} (max {ps.max_score_psi}); {n} labelled"
    if n >= ps.min_rollout_labels and auc_champ is not None and auc_chall is not None:
        facts += f"; realised AUC challenger {auc_chall:.4f} vs champion {auc_champ:.4f}"
    if dist > ps.max_score_psi:
        decision, reason = "rejected", f"challenger scores drift from the champion's: {facts}"
    elif n < ps.min_rollout_labels or auc_champ is None or auc_chall is None:
        return {"decision": "wait", "reason": f"need ≥ {ps.min_rollout_labels} labelled predictions: {facts}"}
    elif auc_chall - auc_champ >= ps.min_margin:
        decision, reason = "promoted", f"rollout passed: {facts}"
    else:
        decision, reason = "rejected", f"challenger not better by minMargin {ps.min_margin}: {facts}"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    reg.tag_version(
        name, chall.version, {"opsloop.decision": decision, "opsloop.reason": reason, "opsloop.decided_at": now}
    )
    reg.delete_alias(name, CHALLENGER)
    if decision == "promoted":
        reg.set_alias(name, PREVIOUS, champ.version)
        reg.tag_version(name, chall.version, {"opsloop.previous_version": champ.version})
        reg.set_alias(name, CHAMPION, chall.version)
    return {"decision": decision, "reason": reason, "challenger": chall.version, "champion": champ.version}
