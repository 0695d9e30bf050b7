"""Evaluation reports: fairness per group, feature importance and the plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.inspection import permutation_importance
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from opsloop.spec.ml import FairnessSpec


def fairness_report(y: np.ndarray, p: np.ndarray, groups: np.ndarray, fs: FairnessSpec) -> dict[str, Any]:
    """Positive rate, AUC and calibration (mean score − observed rate) per group, and the max gap of
    the configured metric over groups with at least ``minGroupSize`` rows (smaller ones are listed)."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    g = pd.Series(groups, dtype=object).fillna("__missing__").astype(str).to_numpy()
    for level in sorted(set(g.tolist())):
        m = g == level
        n = int(m.sum())
        if n < fs.min_group_size:
            skipped.append(f"{level} (n={n} < {fs.min_group_size})")
            continue
        yy, pp = y[m], p[m]
        auc = float(roc_auc_score(yy, pp)) if len(set(yy.tolist())) == 2 else None
        rows.append(
            {
                "group": level,
                "n": n,
                "observed_rate": float(yy.mean()),
                "positive_rate": float((pp >= fs.threshold).mean()),
                "mean_score": float(pp.mean()),
                "calibration_gap": float(pp.mean() - yy.mean()),
                "roc_auc": auc,
            }
        )
    key = {"auc": "roc_auc", "positive_rate": "positive_rate", "calibration": "calibration_gap"}[fs.metric]
    vals = [r[key] for r in rows if r[key] is not None]
    if fs.metric == "calibration":
        gap = max((abs(v) for v in vals), default=0.0)
    else:
        gap = (max(vals) - min(vals)) if len(vals) >= 2 else 0.0
    return {"column": fs.group_column, "metric": fs.metric, "gap": float(gap), "groups": rows, "skipped": skipped}


def feature_importance(pipe: Pipeline, x: pd.DataFrame, y: np.ndarray, seed: int = 42) -> list[tuple[str, float]]:
    """Permutation importance (ROC AUC drop) on the original columns, on ≤ 3000 holdout rows."""
    n = min(len(x), 3000)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), n, replace=False)) if n < len(x) else np.arange(len(x))
    xs, ys = x.iloc[idx], y[idx]
    if len(set(ys.tolist())) < 2:
        return [(c, 0.0) for c in x.columns]
    model = pipe.steps[-1][1]
    jobs = getattr(model, "n_jobs", None)
    if jobs is not None:  # thread start-up per call dominates on a few thousand rows
        model.set_params(n_jobs=1)
    try:
        res = permutation_importance(pipe, xs, ys, scoring="roc_auc", n_repeats=3, random_state=seed, n_jobs=1)
    finally:
        if jobs is not None:
            model.set_params(n_jobs=jobs)
    pairs = [(str(c), float(v)) for c, v in zip(x.columns, res.importances_mean, strict=True)]
    return sorted(pairs, key=lambda t: -t[1])


def save_plots(
    y: np.ndarray, p: np.ndarray, importance: list[tuple[str, float]], out_dir: Path, title: str
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot(mean_pred, frac_pos, marker="o", label=title)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title(f"calibration · {title}")
    ax.legend(loc="upper left")
    cal = out_dir / "calibration.png"
    fig.savefig(cal, dpi=80, bbox_inches="tight")
    plt.close(fig)
    top = importance[:20][::-1]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.35 * len(top) + 1)))
    ax.barh([n for n, _ in top], [v for _, v in top])
    ax.set_xlabel("ROC AUC drop when permuted")
    ax.set_title(f"feature importance · {title}")
    imp = out_dir / "feature_importance.png"
    fig.savefig(imp, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return [cal, imp]


def calibration_table(y: np.ndarray, p: np.ndarray) -> list[dict[str, float]]:
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
    return [{"mean_predicted": float(a), "observed": float(b)} for a, b in zip(mean_pred, frac_pos, strict=True)]
