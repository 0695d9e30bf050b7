"""ML core without MLflow: features (point in time, idempotent), training checks, promotion gate,
PSI, fairness, retrain triggers."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from opsloop.errors import SpecError, TerminalError
from opsloop.ml import triggers
from opsloop.ml.drift import DriftCounter, baseline_stats, evaluate_drift, psi
from opsloop.ml.features import build_features, read_feature_batches, stable_bucket, to_frame
from opsloop.ml.promotion import decide
from opsloop.ml.report import fairness_report
from opsloop.ml.train import check_target, load_training_data, split_indices, train
from opsloop.ml.train import make_pipeline as opsloop_pipeline
from opsloop.spec import parse_spec
from opsloop.spec.ml import DriftSpec, FairnessSpec, PromotionSpec
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.support.ml_data import SCORE_AS_OF, TRAIN_AS_OF
from tests.support.ml_spec import spec_dict, write_spec

FEATURES = TableRef("ops_ai", "customer_features")


def _rows(wh: DuckDBAdapter, as_of: date) -> dict[str, dict]:
    t = wh.query(f"SELECT * FROM {wh.quote(FEATURES)} WHERE as_of = $d", {"d": as_of})
    return {r["customer_id"]: r for r in t.to_pylist()}


def test_build_features_is_point_in_time_and_rerunnable(demo_wh: DuckDBAdapter, tmp_path: Path) -> None:
    _, spec = write_spec(tmp_path)
    fs = spec.model.features
    first = build_features(demo_wh, fs, TRAIN_AS_OF)
    assert first.inserted == first.rows_staged > 1000
    again = build_features(demo_wh, fs, TRAIN_AS_OF)
    assert (again.inserted, again.updated) == (0, 0)
    before = _rows(demo_wh, TRAIN_AS_OF)
    cid = next(k for k, r in before.items() if r["churned"] is False)
    # events after the as-of date must not leak into the snapshot
    later = datetime(2026, 9, 15, tzinfo=UTC)
    demo_wh.append(
        TableRef("ops_ai", "transactions"),
        pa.table(
            {
                "event_id": ["E-future"],
                "customer_id": [cid],
                "amount": pa.array([Decimal("999.00")], pa.decimal128(38, 9)),
                "currency": ["EUR"],
                "event_time": pa.array([later], pa.timestamp("us", tz="UTC")),
                "updated_at": pa.array([later], pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    rebuilt = build_features(demo_wh, fs, TRAIN_AS_OF)
    assert rebuilt.updated == 0 and _rows(demo_wh, TRAIN_AS_OF)[cid] == before[cid]
    # ...but they count for a later snapshot; customers churned before a date are not in it
    build_features(demo_wh, fs, SCORE_AS_OF)
    after = _rows(demo_wh, SCORE_AS_OF)
    assert after[cid]["tx_count_90d"] >= 1
    churned_before = (
        demo_wh.query("SELECT customer_id FROM ops_ai.customers WHERE churned AND churned_at < $d", {"d": SCORE_AS_OF})
        .column(0)
        .to_pylist()
    )
    assert churned_before and not set(churned_before) & set(after)
    assert len(_rows(demo_wh, TRAIN_AS_OF)) == len(before)  # the older snapshot is untouched


def test_build_features_names_missing_output_column(demo_wh: DuckDBAdapter, tmp_path: Path) -> None:
    data = spec_dict()
    data["model"]["features"]["numeric"].append("arr_growth")
    _, spec = write_spec(tmp_path, data)
    with pytest.raises(TerminalError, match=r"arr_growth"):
        build_features(demo_wh, spec.model.features, TRAIN_AS_OF)


def test_training_checks_fail_before_fitting(demo_wh: DuckDBAdapter, tmp_path: Path) -> None:
    _, spec = write_spec(tmp_path)
    build_features(demo_wh, spec.model.features, TRAIN_AS_OF)
    bad = spec_dict()
    bad["model"]["features"]["target"] = "cancelled"
    bad["model"]["features"].pop("build")
    _, missing = write_spec(tmp_path, bad)
    with pytest.raises(TerminalError, match=r"model.features.target: column 'cancelled'"):
        load_training_data(demo_wh, missing.model, TRAIN_AS_OF)
    with pytest.raises(TerminalError, match="constant"):
        check_target(np.zeros(500, dtype=int), spec.model)
    with pytest.raises(TerminalError, match=r"minPositives: only 3 positives"):
        check_target(np.array([1, 1, 1] + [0] * 300), spec.model)
    with pytest.raises(TerminalError, match=r"model.params"):
        opsloop_pipeline(spec.model.model_copy(update={"params": {"n_estimatorz": 3}}))


def test_train_sample_reads_a_stable_hash_sample(demo_wh: DuckDBAdapter, tmp_path: Path) -> None:
    """model.trainSample bounds what training reads: a hash sample of the keys, the same on every read."""
    _, spec = write_spec(tmp_path)
    build_features(demo_wh, spec.model.features, TRAIN_AS_OF)
    full = load_training_data(demo_wh, spec.model, TRAIN_AS_OF)
    total = len(full.y) + full.unlabelled
    assert full.sampled_from is None
    cap = total // 3
    _, capped = write_spec(tmp_path, model={"trainSample": cap, "params": {"n_estimators": 5}})
    first, again = (load_training_data(demo_wh, capped.model, TRAIN_AS_OF) for _ in range(2))
    read = len(first.y) + first.unlabelled
    assert first.sampled_from == total
    assert 0.8 * cap <= read <= 1.2 * cap, (read, cap)
    assert first.keys.tolist() == again.keys.tolist()
    assert set(first.keys.tolist()) < set(full.keys.tolist())
    result = train(first, capped.model, tmp_path / "plots")
    assert result.rows["sampled_from"] == total
    assert result.rows["train"] + result.rows["holdout"] == len(first.y)
    _, loose = write_spec(tmp_path, model={"trainSample": total})  # a cap the snapshot fits in: no sample
    everything = load_training_data(demo_wh, loose.model, TRAIN_AS_OF)
    assert everything.sampled_from is None and len(everything.y) == len(full.y)


@pytest.mark.slow
def test_model_reaches_plain_sklearn_baseline(demo_wh: DuckDBAdapter, tmp_path: Path) -> None:
    _, spec = write_spec(tmp_path)
    build_features(demo_wh, spec.model.features, TRAIN_AS_OF)
    data = load_training_data(demo_wh, spec.model, TRAIN_AS_OF)
    result = train(data, spec.model, tmp_path / "plots")
    tr, te = split_indices(data, spec.model)
    num = spec.model.features.numeric
    x_tr, x_te = data.x.iloc[tr][num], data.x.iloc[te][num]
    # the plain baseline: sklearn's default random forest on the numeric columns, imputed by hand
    plain = make_pipeline(SimpleImputer(), RandomForestClassifier(random_state=0))
    plain.fit(x_tr, data.y[tr])
    plain_auc = roc_auc_score(data.y[te], plain.predict_proba(x_te)[:, 1])
    assert result.metrics["roc_auc"] >= plain_auc, (result.metrics, plain_auc)
    # and a linear baseline, which suits this synthetic data well: within one point of it
    lin = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=2000))
    lin.fit(x_tr, data.y[tr])
    lin_auc = roc_auc_score(data.y[te], lin.predict_proba(x_te)[:, 1])
    assert result.metrics["roc_auc"] >= lin_auc - 0.01, (result.metrics, lin_auc)
    print(f"AUC opsloop RF {result.metrics['roc_auc']:.4f} plain RF {plain_auc:.4f} logistic {lin_auc:.4f}")
    assert set(result.metrics) >= {"roc_auc", "pr_auc", "brier", "log_loss"}
    assert [p.name for p in result.plots] == ["calibration.png", "feature_importance.png"]
    assert all(p.stat().st_size > 1000 for p in result.plots)
    assert result.fairness is not None and {g["group"] for g in result.fairness["groups"]} == {
        "smb",
        "mid",
        "enterprise",
    }
    b = result.baseline["features"]
    assert b["plan"]["kind"] == "categorical" and abs(sum(b["plan"]["freq"]) - 1) < 1e-9
    assert b["mrr"]["missing_rate"] > 0 and len(b["mrr"]["freq"]) == len(b["mrr"]["edges"]) + 2


@pytest.mark.parametrize(
    ("kind", "params"), [("hist_gradient_boosting", {"max_iter": 60}), ("logistic_regression", {})]
)
def test_other_estimators_from_spec(demo_wh: DuckDBAdapter, tmp_path: Path, kind: str, params: dict) -> None:
    data = spec_dict(model={"kind": kind, "split": {"strategy": "time", "timeColumn": "tenure_days"}})
    data["model"]["params"] = params
    _, spec = write_spec(tmp_path, data)
    build_features(demo_wh, spec.model.features, TRAIN_AS_OF)
    result = train(load_training_data(demo_wh, spec.model, TRAIN_AS_OF), spec.model, tmp_path)
    assert type(result.pipeline.named_steps["model"]).__name__.lower().startswith(kind.split("_")[0][:4])
    assert result.metrics["roc_auc"] > 0.7


def test_unknown_categories_are_ignored_at_scoring(demo_wh: DuckDBAdapter, tmp_path: Path) -> None:
    _, spec = write_spec(tmp_path, model={"kind": "logistic_regression", "params": {}})
    build_features(demo_wh, spec.model.features, TRAIN_AS_OF)
    result = train(load_training_data(demo_wh, spec.model, TRAIN_AS_OF), spec.model, tmp_path)
    x = result.x_test.head(5).copy()
    x["plan"] = "platinum"  # never seen in training
    x.loc[0, "mrr"] = np.nan
    p = result.pipeline.predict_proba(x)[:, 1]
    assert np.isfinite(p).all()


def test_promotion_gate_reasons() -> None:
    ps = PromotionSpec(min_roc_auc=0.65, max_brier=0.25, min_margin=0.01, max_fairness_gap=0.2)
    good = {"roc_auc": 0.80, "brier": 0.12, "pr_auc": 0.5}
    first = decide(good, ps)
    assert first.promote and first.alias == "champion" and "first model" in first.reason
    low = decide({"roc_auc": 0.6, "brier": 0.3, "pr_auc": 0.2}, ps)
    assert (
        not low.promote and "roc_auc 0.6000 < minRocAuc 0.65" in low.reason and "brier 0.3000 > maxBrier" in low.reason
    )
    unfair = decide(good, ps, fairness_gap=0.3)
    assert not unfair.promote and "fairness gap 0.3000 > maxFairnessGap 0.2" in unfair.reason
    close = decide(good, ps, champion={"roc_auc": 0.795, "brier": 0.1}, champion_version="3")
    assert not close.promote and "minMargin 0.01" in close.reason and "champion v3 0.7950" in close.reason
    better = decide(good, ps, champion={"roc_auc": 0.75, "brier": 0.1}, champion_version="3")
    assert better.promote and "Δ +0.0500" in better.reason
    canary = decide(good, ps.model_copy(update={"rollout": "canary"}), {"roc_auc": 0.7, "brier": 0.1}, "3")
    assert not canary.promote and canary.alias == "challenger" and "canary rollout" in canary.reason


def test_psi_matches_hand_computed_values() -> None:
    # (0.5-0.4)ln(0.5/0.4) + (0.3-0.4)ln(0.3/0.4) + (0.2-0.2)ln(1) = 0.0223144 + 0.0287682
    assert psi([0.4, 0.4, 0.2], [0.5, 0.3, 0.2]) == pytest.approx(0.0510826, abs=1e-6)
    assert psi([40, 40, 20], [50, 30, 20]) == pytest.approx(0.0510826, abs=1e-6)  # counts are normalised
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    # an empty bin is clamped to 1e-4: (0.5-1e-4)ln(0.5/1e-4) + (0.5-1)ln(0.5/1) ≈ 4.604
    assert psi([0.5, 0.5], [0.0, 1.0]) == pytest.approx(
        (1e-4 - 0.5) * np.log(1e-4 / 0.5) + (1 - 0.5) * np.log(1 / 0.5), rel=1e-9
    )


def test_drift_counter_flags_shift_and_skips_small_samples(demo_wh: DuckDBAdapter, tmp_path: Path) -> None:
    _, spec = write_spec(tmp_path)
    fs = spec.model.features
    build_features(demo_wh, fs, TRAIN_AS_OF)
    t = pa.Table.from_batches(list(read_feature_batches(demo_wh, fs, fs.columns, as_of=TRAIN_AS_OF)))
    x = to_frame(t, fs)
    base = baseline_stats(x, fs, np.linspace(0, 1, len(x)))
    same = DriftCounter(base)
    for part in np.array_split(np.arange(len(x)), 3):  # chunked counting == one pass
        same.add(x.iloc[part], np.linspace(0, 1, len(part)))
    ds = DriftSpec(warn_psi=0.1, alert_psi=0.25, min_sample=100)
    assert all(d.status == "ok" for d in evaluate_drift(same, ds) if d.feature != "__score__")
    shifted = x.copy()
    shifted["mrr"] = shifted["mrr"] * 3
    shifted["plan"] = "basic"
    drifted = DriftCounter(base)
    drifted.add(shifted, np.full(len(x), 0.95))
    res = {d.feature: d for d in evaluate_drift(drifted, ds)}
    assert res["mrr"].status == "alert" and res["plan"].status == "alert" and res["__score__"].status == "alert"
    assert res["tenure_days"].status == "ok"
    tiny = DriftCounter(base)
    tiny.add(x.head(20), np.zeros(20))
    assert {d.status for d in evaluate_drift(tiny, ds)} == {"skipped"}
    merged = DriftCounter(base)
    merged.merge(drifted.to_json())
    assert {d.feature: d.psi for d in evaluate_drift(merged, ds)} == {d.feature: d.psi for d in res.values()}


def test_fairness_report_gap() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 600)
    good = np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.05, 600)
    noisy = rng.random(600)
    groups = np.array(["a"] * 300 + ["b"] * 290 + ["c"] * 10, dtype=object)
    p = np.concatenate([good[:300], noisy[300:]])
    rep = fairness_report(y, p, groups, FairnessSpec(group_column="g", min_group_size=30))
    aucs = {g["group"]: g["roc_auc"] for g in rep["groups"]}
    assert aucs["a"] > 0.95 and aucs["b"] < 0.65 and rep["gap"] == pytest.approx(aucs["a"] - aucs["b"])
    assert rep["skipped"] == ["c (n=10 < 30)"]


def test_stable_bucket_is_stable_and_uniform() -> None:
    keys = [f"C{i:07d}" for i in range(20000)]
    a, b = stable_bucket(keys), stable_bucket(list(reversed(keys)))[::-1]
    assert (a == b).all() and 0.19 < (a < 0.2).mean() < 0.21


def test_retrain_triggers(duckdb_wh: DuckDBAdapter, tmp_path: Path) -> None:
    _, spec = write_spec(tmp_path, model={"retrainEvery": "7d"})
    first = triggers.should_retrain(duckdb_wh, spec)
    assert first.retrain and first.reasons == ["no training recorded yet"]
    start = datetime.now(UTC)
    triggers.consume_triggers(duckdb_wh, spec, "run-1", start, "v1 promoted")
    assert not triggers.should_retrain(duckdb_wh, spec).retrain
    triggers.add_trigger(duckdb_wh, spec, "drift", "PSI alert on mrr (0.41)", "score-run")
    due = triggers.should_retrain(duckdb_wh, spec)
    assert due.retrain and due.pending == 1 and due.reasons == ["drift: PSI alert on mrr (0.41)"]
    triggers.consume_triggers(duckdb_wh, spec, "run-2", datetime.now(UTC), "v2 rejected")
    assert not triggers.should_retrain(duckdb_wh, spec).retrain
    later = datetime.now(UTC) + timedelta(days=8)
    sched = triggers.should_retrain(duckdb_wh, spec, now=later)
    assert sched.retrain and sched.reasons[0].startswith("schedule:")


def test_model_spec_errors_name_the_path() -> None:
    bad = spec_dict(model={"promotion": {"maxFairnessGap": 0.1}})
    bad["model"].pop("fairness")
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert ("model.promotion.maxFairnessGap", "needs a fairness.groupColumn") in err.value.problems
    worse = spec_dict(scoring={"riskBuckets": {"low": 0.3, "high": 0.9}})
    worse["model"]["features"]["build"]["sql"] = "SELECT 1"
    with pytest.raises(SpecError) as err:
        parse_spec(worse)
    paths = {p for p, _ in err.value.problems}
    assert {"scoring.riskBuckets", "model.features.build.sql"} <= paths
