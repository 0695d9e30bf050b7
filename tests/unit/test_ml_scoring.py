"""Scoring core on DuckDB + a sqlite MLflow store: predictions table, canary/shadow, drift
policies, concept drift, review queue, rules fallback, MLflow down."""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from opsloop.crm.gates import push_allowed
from opsloop.devstack.postgres import free_port
from opsloop.ml import monitor, review, triggers
from opsloop.ml.features import build_features, stable_bucket
from opsloop.ml.lifecycle import train_and_register
from opsloop.ml.models import ResolvedModels, ScoringModel, resolve_models
from opsloop.ml.registry import MLflowAdapter, MLflowUnavailableError
from opsloop.ml.score import next_actions, risk_buckets, score_partition
from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.support.ml_data import SCORE_AS_OF, TRAIN_AS_OF, load_demo_warehouse
from tests.support.ml_spec import spec_dict, write_spec

SMALL = {"params": {"n_estimators": 40, "max_depth": 6, "random_state": 1, "class_weight": "balanced_subsample"}}
PRED = TableRef("ops_ai", "predictions")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One warehouse with features as of both dates and a sqlite registry with v1 champion, v2 challenger."""
    d = tmp_path_factory.mktemp("scoring")
    wh = DuckDBAdapter(d / "template.duckdb")
    load_demo_warehouse(wh)
    base = spec_dict(model=SMALL)
    _, spec = write_spec(d, base)
    build_features(wh, spec.model.features, TRAIN_AS_OF)
    build_features(wh, spec.model.features, SCORE_AS_OF)
    reg = MLflowAdapter(f"sqlite:///{d / 'mlflow.db'}", experiment="scoring", artifact_location=str(d / "art"))
    v1 = train_and_register(wh, reg, spec.model, TRAIN_AS_OF, "manual", spec.name)
    weak = spec_dict(model={**SMALL, "name": spec.model.name, "kind": "logistic_regression", "params": {}})
    weak["model"]["features"].update({"numeric": ["mrr"], "categorical": ["country"]})
    _, weak_spec = write_spec(d, weak)
    v2 = train_and_register(wh, reg, weak_spec.model, TRAIN_AS_OF, "manual", spec.name)
    reg.set_alias(spec.model.name, "challenger", v2["version"])
    return {"dir": d, "template": d / "template.duckdb", "reg": reg, "base": base, "v1": v1, "v2": v2}


def _wh(trained: dict[str, Any], tmp_path: Path) -> DuckDBAdapter:
    shutil.copy(trained["template"], tmp_path / "w.duckdb")
    return DuckDBAdapter(tmp_path / "w.duckdb")


def _spec(trained: dict[str, Any], tmp_path: Path, **scoring: Any) -> PipelineSpec:
    data = {**trained["base"], "scoring": {**trained["base"]["scoring"], **scoring}}
    return write_spec(tmp_path, data)[1]


def _score(wh: DuckDBAdapter, spec: PipelineSpec, models: ResolvedModels, batch: str = "b1", as_of: date = SCORE_AS_OF):
    res = score_partition(
        wh, spec, models, as_of=as_of, run_id=f"run-{batch}", batch_id=batch, scored_at=datetime.now(UTC)
    )
    summary = {
        "rows": res.rows,
        "model_name": models.champion.name,
        "model_version": models.champion.version,
        "is_fallback": models.champion.is_fallback,
        "served": res.served,
        "review_pending": res.review_pending,
        "baseline": models.champion.baseline,
        "drift": res.drift,
    }
    monitor.record_partition(wh, batch, 0, 1, f"run-{batch}", summary)
    return res


def _preds(wh: DuckDBAdapter) -> dict[str, dict[str, Any]]:
    return {r["customer_id"]: r for r in wh.query(f"SELECT * FROM {wh.quote(PRED)}").to_pylist()}


def test_buckets_and_actions() -> None:
    s = np.array([0.0, 0.29, 0.3, 0.69, 0.7, 0.9, 1.0])
    assert risk_buckets(s, {"low": 0.3, "medium": 0.7, "high": 1.0}).tolist() == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
        "high",
        "high",
    ]
    spec = PipelineSpec.model_validate(
        spec_dict(
            scoring={
                "nextBestAction": [
                    {"action": "call", "minScore": 0.8, "when": {"plan": ["enterprise"]}},
                    {"action": "offer", "minScore": 0.6},
                    {"action": "none"},
                ]
            }
        )
    )
    plan = np.array(["enterprise", "basic", "enterprise", "basic"], dtype=object)
    acts = next_actions(np.array([0.9, 0.9, 0.5, 0.1]), spec.scoring, {"plan": plan})
    assert acts.tolist() == ["call", "offer", "none", "none"]


def test_prepared_input_gives_the_pipelines_own_scores() -> None:
    """Batch scoring preprocesses the next chunk ahead and runs only the final estimator on it: the
    scores must be the pipeline's predict_proba, and a model that is not a Pipeline is left whole."""
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(3)
    x = pd.DataFrame({"a": rng.normal(size=400), "b": np.where(rng.random(400) < 0.1, np.nan, rng.normal(size=400))})
    y = (x["a"] + np.nan_to_num(x["b"]) > 0).astype(int)
    pipe = make_pipeline(SimpleImputer(), RandomForestClassifier(n_estimators=20, random_state=0)).fit(x, y)
    plain = LogisticRegression().fit(x.fillna(0), y)
    for model, frame, final in ((pipe, x, True), (plain, x.fillna(0), False)):
        sm = ScoringModel("m", "1", "champion", model)
        prepared = sm.prepare(frame)
        assert prepared.final is final
        np.testing.assert_array_equal(sm.scores_prepared(prepared), model.predict_proba(frame)[:, 1])


@pytest.mark.slow  # shares a module fixture that trains two models (~60 s)
def test_predictions_table_and_rerun(trained: dict[str, Any], tmp_path: Path) -> None:
    wh = _wh(trained, tmp_path)
    spec = _spec(trained, tmp_path)
    models = resolve_models(trained["reg"], spec)
    assert models.champion.version == "1" and models.challenger is None  # no shadow/canary configured
    res = _score(wh, spec, models)
    rows = _preds(wh)
    assert res.rows == res.inserted == len(rows) > 2000
    r = next(iter(rows.values()))
    assert r["model_name"] == spec.model.name and r["model_version"] == "1" and r["model_alias"] == "champion"
    assert r["is_fallback"] is False and r["score_date"] == SCORE_AS_OF and r["run_id"] == "run-b1"
    assert all(0 <= x["predicted_churn_risk"] <= 1 for x in rows.values())
    assert {x["risk_bucket"] for x in rows.values()} <= {"low", "medium", "high"}
    assert {x["next_best_action"] for x in rows.values()} <= {
        "executive_call",
        "retention_offer",
        "check_in_email",
        "none",
    }
    again = _score(wh, spec, models, batch="b2")
    assert again.inserted == 0 and {k: v["predicted_churn_risk"] for k, v in _preds(wh).items()} == {
        k: v["predicted_churn_risk"] for k, v in rows.items()
    }
    hist = wh.query("SELECT COUNT(*) AS n FROM ops_ai.prediction_history").column(0)[0].as_py()
    assert hist == len(rows)  # one row per entity and score date, however often it is rerun


@pytest.mark.slow  # shares a module fixture that trains two models (~60 s)
@pytest.mark.parametrize("mode", ["canary", "shadow"])
def test_canary_and_shadow(trained: dict[str, Any], tmp_path: Path, mode: str) -> None:
    wh = _wh(trained, tmp_path)
    spec = _spec(trained, tmp_path, **({"canaryShare": 0.2} if mode == "canary" else {"shadow": True}))
    models = resolve_models(trained["reg"], spec)
    assert models.challenger is not None and models.challenger.version == "2"
    _score(wh, spec, models)
    rows = _preds(wh)
    keys = sorted(rows)
    in_canary = (
        dict(zip(keys, stable_bucket(keys) < 0.2, strict=True)) if mode == "canary" else dict.fromkeys(keys, False)
    )
    for k, r in rows.items():
        assert r["challenger_score"] is not None and r["challenger_version"] == "2"
        if in_canary[k]:
            assert r["served_by"] == "challenger" and r["model_version"] == "2"
            assert r["predicted_churn_risk"] == r["challenger_score"]
        else:
            assert r["served_by"] == "champion" and r["predicted_churn_risk"] == r["champion_score"]
    share = sum(in_canary.values()) / len(keys)
    assert (0.15 < share < 0.25) if mode == "canary" else share == 0


def _drifted(wh: DuckDBAdapter) -> None:
    wh.execute(
        "UPDATE ops_ai.customer_features SET mrr = mrr * 8, plan = 'enterprise' WHERE as_of = $d", {"d": SCORE_AS_OF}
    )


@pytest.mark.slow  # shares a module fixture that trains two models (~60 s)
@pytest.mark.parametrize("policy", ["warn", "block_push", "retrain"])
def test_drift_policies(trained: dict[str, Any], tmp_path: Path, policy: str) -> None:
    wh = _wh(trained, tmp_path)
    spec = _spec(trained, tmp_path, drift={**trained["base"]["scoring"]["drift"], "policy": policy})
    _drifted(wh)
    _score(wh, spec, resolve_models(trained["reg"], spec))
    results, status, action = monitor.apply_drift(wh, spec, monitor.read_parts(wh, "b1"), "b1")
    by = {r.feature: r for r in results}
    assert status == "alert" and by["mrr"].status == "alert" and by["plan"].status == "alert"
    assert by["tenure_days"].status == "ok"
    assert action == {"warn": "warn", "block_push": "block_push", "retrain": "retrain"}[policy]
    gate = push_allowed(wh, spec.name, ["drift"])
    assert gate.allowed == (policy != "block_push"), gate.reason
    pending = triggers.should_retrain(wh, spec)
    assert (pending.pending == 1) == (policy == "retrain")
    drift_rows = wh.query("SELECT feature, psi, status FROM opsloop_meta._drift WHERE run_id = 'b1'").to_pylist()
    assert {r["feature"] for r in drift_rows} >= {"mrr", "plan", "__score__"}


@pytest.mark.slow  # shares a module fixture that trains two models (~60 s)
def test_small_samples_are_skipped_and_listed(trained: dict[str, Any], tmp_path: Path) -> None:
    wh = _wh(trained, tmp_path)
    spec = _spec(trained, tmp_path, drift={"minSample": 100_000})
    _score(wh, spec, resolve_models(trained["reg"], spec))
    results, status, _ = monitor.apply_drift(wh, spec, monitor.read_parts(wh, "b1"), "b1")
    assert status == "ok" and all(r.status == "skipped" and "minSample 100000" in r.note for r in results)


def test_concept_drift_auc_on_known_labels(duckdb_wh: DuckDBAdapter, tmp_path: Path) -> None:
    _, spec = write_spec(tmp_path, spec_dict(scoring={"drift": {"minLabels": 4, "minRealisedAuc": 0.7}}))
    rng = np.random.default_rng(3)
    hist, labels = [], {}
    days = {date(2026, 10, 1): 0.9, date(2026, 10, 8): 0.0}
    for d, quality in days.items():
        for i in range(60):
            cid = f"C{d.day:02d}{i:04d}"
            y = bool(rng.random() < 0.4)
            s = round(float(np.clip(quality * y + rng.random() * 0.7, 0, 1)), 2)  # rounded: ties on purpose
            hist.append(
                {
                    "customer_id": cid,
                    "predicted_churn_risk": s,
                    "score_date": d,
                    "model_name": "m",
                    "model_version": "1",
                    "is_fallback": False,
                }
            )
            labels[cid] = (y, datetime(2026, 10, 20, tzinfo=UTC) if y else None)
    hist.append({**hist[0], "customer_id": "C-unknown"})  # no label row → ignored
    labels["C-early"] = (True, datetime(2026, 9, 1, tzinfo=UTC))  # churned before the prediction → ignored
    hist.append({**hist[0], "customer_id": "C-early"})
    duckdb_wh.append(TableRef("ops_ai", "prediction_history"), pa.Table.from_pylist(hist))
    duckdb_wh.append(
        TableRef("ops_ai", "customers"),
        pa.Table.from_pylist(
            [{"customer_id": k, "churned": y, "churned_at": t} for k, (y, t) in labels.items()],
            schema=pa.schema(
                [("customer_id", pa.string()), ("churned", pa.bool_()), ("churned_at", pa.timestamp("us", tz="UTC"))]
            ),
        ),
    )
    out = monitor.concept_drift(duckdb_wh, spec, "run-x", today=date(2026, 11, 1))
    got = {r["score_date"]: r for r in duckdb_wh.query("SELECT * FROM opsloop_meta.model_quality").to_pylist()}
    for d in days:
        sub = [h for h in hist if h["score_date"] == d and h["customer_id"] in labels and h["customer_id"] != "C-early"]
        y = [labels[h["customer_id"]][0] for h in sub[:60]]
        s = [h["predicted_churn_risk"] for h in sub[:60]]
        assert got[d]["n_labelled"] == 60 and got[d]["realised_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert got[date(2026, 10, 1)]["realised_auc"] > 0.8 > got[date(2026, 10, 8)]["realised_auc"]
    assert out["status"] == "alert" and "2026-10-08" in out["reason"]
    assert triggers.should_retrain(duckdb_wh, spec).reasons[0].startswith("concept_drift: realised AUC")


@pytest.mark.slow  # shares a module fixture that trains two models (~60 s)
def test_review_queue_holds_exactly_the_high_risk_rows(trained: dict[str, Any], tmp_path: Path) -> None:
    wh = _wh(trained, tmp_path)
    spec = _spec(trained, tmp_path, review={"enabled": True, "minScore": 0.6, "column": "mrr", "minValue": 150})
    res = _score(wh, spec, resolve_models(trained["reg"], spec))
    feats = {
        r["customer_id"]: r
        for r in wh.query(
            "SELECT customer_id, mrr FROM ops_ai.customer_features WHERE as_of = $d", {"d": SCORE_AS_OF}
        ).to_pylist()
    }
    rows = _preds(wh)
    expected = {k for k, r in rows.items() if r["predicted_churn_risk"] >= 0.6 and (feats[k]["mrr"] or -1) >= 150}
    assert expected and res.review_pending == len(expected)
    n, queued = review.pending(wh, spec, "b1", limit=10_000)
    assert n == len(expected) and {q["customer_id"] for q in queued} == expected
    reject = sorted(expected)[:1]
    out = review.decide(wh, spec, "b1", approve=True, decided_by="test", note="ok", reject_keys=reject)
    assert out == {"released": len(expected) - 1, "rejected": 1}
    statuses = {k: r["review_status"] for k, r in _preds(wh).items()}
    assert {k for k, s in statuses.items() if s == "released"} == expected - set(reject)
    assert statuses[reject[0]] == "rejected"
    assert {s for k, s in statuses.items() if k not in expected} == {"not_required"}


@pytest.mark.slow  # shares a module fixture that trains two models (~60 s)
def test_rules_fallback_and_mlflow_down(trained: dict[str, Any], tmp_path: Path) -> None:
    wh = _wh(trained, tmp_path)
    spec = _spec(trained, tmp_path)
    empty = MLflowAdapter(f"sqlite:///{tmp_path / 'empty.db'}", artifact_location=str(tmp_path / "a"))
    models = resolve_models(empty, spec)
    assert models.champion.is_fallback and models.champion.name == "rules"
    assert any("@champion unavailable" in n for n in models.notes) and any("@previous" in n for n in models.notes)
    _score(wh, spec, models)
    rows = _preds(wh)
    assert {(r["model_name"], r["model_alias"], r["is_fallback"]) for r in rows.values()} == {("rules", "rules", True)}
    down = MLflowAdapter(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MLflowUnavailableError, match=rf"MLflow tracking server {down.tracking_uri} is unreachable"):
        resolve_models(down, spec)
    tolerant = _spec(trained, tmp_path, fallbackOnMlflowDown=True)
    got = resolve_models(down, tolerant)
    assert got.champion.is_fallback and "fallbackOnMlflowDown" in got.notes[0]
