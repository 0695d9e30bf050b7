"""Training: read a labelled snapshot, check it, split, fit the spec's estimator inside a
preprocessing Pipeline, evaluate on the holdout, and produce plots, fairness and the baseline.

Pure sklearn + warehouse; logging to MLflow is :mod:`opsloop.ml.registry`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.base import ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from opsloop.errors import TerminalError
from opsloop.ml.drift import baseline_stats
from opsloop.ml.features import check_columns, default_jobs, make_preprocessor, read_feature_batches, target_array
from opsloop.ml.features import to_frame as features_frame
from opsloop.ml.report import fairness_report, feature_importance, save_plots
from opsloop.ml.sql import sample_predicate
from opsloop.spec.ml import FeatureSpec, ModelSpec
from opsloop.warehouse.base import TableRef

DEFAULTS: dict[str, dict[str, Any]] = {
    # the playbook's default model
    "random_forest": {
        "n_estimators": 300,
        "max_depth": 8,
        "class_weight": "balanced_subsample",
        "random_state": 42,
    },
    "hist_gradient_boosting": {"max_iter": 200, "learning_rate": 0.1, "random_state": 42},
    "logistic_regression": {"max_iter": 2000, "C": 1.0, "class_weight": "balanced"},
}
_CLASSES: dict[str, type[ClassifierMixin]] = {
    "random_forest": RandomForestClassifier,
    "hist_gradient_boosting": HistGradientBoostingClassifier,
    "logistic_regression": LogisticRegression,
}


@dataclass
class TrainData:
    x: pd.DataFrame
    y: np.ndarray
    keys: np.ndarray
    groups: np.ndarray | None = None
    times: np.ndarray | None = None
    unlabelled: int = 0
    as_of: date | None = None
    table: pa.Table | None = None  # every column of the labelled rows (to score older champions)
    sampled_from: int | None = None  # rows in the snapshot when model.trainSample cut it down


@dataclass
class TrainResult:
    pipeline: Pipeline
    params: dict[str, Any]
    metrics: dict[str, float]
    x_test: pd.DataFrame
    y_test: np.ndarray
    scores_test: np.ndarray
    baseline: dict[str, Any]
    fairness: dict[str, Any] | None
    importance: list[tuple[str, float]]
    plots: list[Path] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    holdout_table: pa.Table | None = None


def load_training_data(wh: Any, ms: ModelSpec, as_of: date | None, batch_rows: int = 100_000) -> TrainData:
    """Read one labelled snapshot in Arrow chunks; fail with the spec path on a missing column."""
    fs = ms.features
    extra = [c for c in (ms.fairness.group_column if ms.fairness else None, ms.split.time_column) if c]
    check_columns(wh, fs, extra=extra)
    schema = wh.table_schema(TableRef(fs.dataset, fs.table))
    cols = list(dict.fromkeys([fs.entity_key, *fs.columns, fs.target, *extra, *(schema.names if schema else [])]))
    if fs.as_of is not None and as_of is None:
        raise TerminalError("train: an as-of date is required for a feature table with an asOf column")
    where, sampled_from = _sample_where(wh, ms, as_of)
    batches = list(read_feature_batches(wh, fs, cols, as_of=as_of, where=where, batch_rows=batch_rows))
    if not batches:
        raise TerminalError(f"train: {fs.dataset}.{fs.table} has no rows as of {as_of}")
    table = pa.Table.from_batches(batches)
    if table.num_rows == 0:
        raise TerminalError(f"train: {fs.dataset}.{fs.table} has no rows as of {as_of}")
    labelled = table.filter(table.column(fs.target).is_valid())
    unlabelled = table.num_rows - labelled.num_rows
    if labelled.num_rows == 0:
        raise TerminalError(f"model.features.target: {fs.target!r} is NULL in all {table.num_rows} rows as of {as_of}")
    gcol = ms.fairness.group_column if ms.fairness else None
    return TrainData(
        x=features_frame(labelled, fs),
        y=target_array(labelled, fs),
        keys=np.asarray(labelled.column(fs.entity_key).to_pylist(), dtype=object),
        groups=np.asarray(labelled.column(gcol).to_pylist(), dtype=object) if gcol else None,
        times=np.asarray(labelled.column(ms.split.time_column).to_pylist(), dtype=object)
        if ms.split.time_column
        else None,
        unlabelled=unlabelled,
        as_of=as_of,
        table=labelled,
        sampled_from=sampled_from,
    )


def _sample_where(wh: Any, ms: ModelSpec, as_of: date | None) -> tuple[str | None, int | None]:
    """``model.trainSample``: a stable hash sample of the snapshot's keys when it has more rows."""
    if ms.train_sample is None:
        return None, None
    fs = ms.features
    sql = f"SELECT COUNT(*) AS n FROM {wh.quote(TableRef(fs.dataset, fs.table))}"
    params: dict[str, Any] | None = None
    if as_of is not None and fs.as_of is not None:
        sql += f" WHERE {wh.quote(fs.as_of)} = {wh.param('as_of')}"
        params = {"as_of": as_of}
    total = int(wh.query(sql, params).column(0)[0].as_py() or 0)
    if total <= ms.train_sample:
        return None, None
    return sample_predicate(wh, fs.entity_key, ms.train_sample / total), total


def check_target(y: np.ndarray, ms: ModelSpec) -> None:
    """Constant target or too few positives/negatives → clear error before any fitting."""
    pos = int(y.sum())
    neg = len(y) - pos
    t = ms.features.target
    if pos == 0 or neg == 0:
        raise TerminalError(
            f"model.features.target: {t!r} is constant ({'all positive' if neg == 0 else 'all negative'}) "
            f"in {len(y)} labelled rows; nothing to learn"
        )
    if min(pos, neg) < ms.min_positives:
        which = "positives" if pos < neg else "negatives"
        raise TerminalError(
            f"model.minPositives: only {min(pos, neg)} {which} for {t!r} in {len(y)} labelled rows "
            f"(need ≥ {ms.min_positives})"
        )


def make_pipeline(ms: ModelSpec) -> Pipeline:
    params = {**DEFAULTS[ms.kind], **ms.params}
    if ms.kind == "random_forest":
        params.setdefault("n_jobs", default_jobs())
    try:
        est = _CLASSES[ms.kind]()
        est.set_params(**params)
    except (ValueError, TypeError) as exc:
        raise TerminalError(f"model.params: not valid for {ms.kind}: {exc}") from exc
    scale = ms.kind == "logistic_regression"
    return Pipeline([("prep", make_preprocessor(ms.features, scale=scale)), ("model", est)])


def split_indices(data: TrainData, ms: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    n = len(data.y)
    idx = np.arange(n)
    sp = ms.split
    if sp.strategy == "time":
        assert data.times is not None
        order = np.argsort(pd.to_datetime(pd.Series(data.times), utc=True).to_numpy(), kind="stable")
        n_test = max(1, math.ceil(n * sp.test_size))
        train_idx, test_idx = order[: n - n_test], order[n - n_test :]
    else:
        train_idx, test_idx = train_test_split(idx, test_size=sp.test_size, stratify=data.y, random_state=sp.seed)
    for name, part in (("training", train_idx), ("holdout", test_idx)):
        classes = set(data.y[part].tolist())
        if len(classes) < 2:
            raise TerminalError(f"model.split: the {name} part has only class(es) {sorted(classes)}; adjust testSize")
    return np.sort(train_idx), np.sort(test_idx)


def evaluate(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, np.clip(p, 1e-6, 1 - 1e-6), labels=[0, 1])),
        "positive_rate": float(np.mean(y)),
    }


def train(data: TrainData, ms: ModelSpec, out_dir: Path) -> TrainResult:
    """Fit on the training part, evaluate on the holdout; plots are written to ``out_dir``."""
    check_target(data.y, ms)
    train_idx, test_idx = split_indices(data, ms)
    pipe = make_pipeline(ms)
    x_train, y_train = data.x.iloc[train_idx], data.y[train_idx]
    x_test, y_test = data.x.iloc[test_idx].reset_index(drop=True), data.y[test_idx]
    pipe.fit(x_train, y_train)
    scores = pipe.predict_proba(x_test)[:, 1]
    metrics = evaluate(y_test, scores)
    fairness = None
    if ms.fairness is not None and data.groups is not None:
        fairness = fairness_report(y_test, scores, data.groups[test_idx], ms.fairness)
    importance = feature_importance(pipe, x_test, y_test, seed=ms.split.seed)
    plots = save_plots(y_test, scores, importance, out_dir, title=ms.name)
    est_params = pipe.named_steps["model"].get_params()
    params = {"kind": ms.kind, **{k: est_params[k] for k in sorted({**DEFAULTS[ms.kind], **ms.params})}}
    params.update({"split": ms.split.strategy, "test_size": ms.split.test_size, "seed": ms.split.seed})
    if "n_jobs" in est_params:
        params["n_jobs"] = est_params["n_jobs"]
    return TrainResult(
        pipeline=pipe,
        params=params,
        metrics=metrics,
        x_test=x_test,
        y_test=y_test,
        scores_test=scores,
        baseline=baseline_stats(x_train, ms.features, scores),
        fairness=fairness,
        importance=importance,
        plots=plots,
        rows={
            "train": len(train_idx),
            "holdout": len(test_idx),
            "unlabelled": data.unlabelled,
            **({"sampled_from": data.sampled_from} if data.sampled_from else {}),
        },
        holdout_table=data.table.take(pa.array(test_idx)) if data.table is not None else None,
    )


def pipeline_feature_spec(pipe: Any, like: FeatureSpec) -> FeatureSpec:
    """The numeric/categorical input columns a fitted opsloop pipeline expects (from its ColumnTransformer)."""
    prep = pipe.named_steps["prep"]
    cols = {name: list(c) for name, _, c in prep.transformers_ if name in ("num", "cat")}
    return like.model_copy(update={"numeric": cols.get("num", []), "categorical": cols.get("cat", [])})
