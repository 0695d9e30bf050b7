"""Training baselines and the Population Stability Index (PSI).

A baseline is JSON logged with every model version: per numeric feature the quantile bin edges
and training frequencies (+ a missing bin), mean, std and missing rate; per categorical feature
the level frequencies (+ other/missing); and the holdout score distribution. Scoring counts the
same bins chunk by chunk (:class:`DriftCounter`, bounded memory) and compares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from opsloop.ml.features import numeric_values
from opsloop.spec.ml import DriftSpec, FeatureSpec

SCORE = "__score__"
OTHER = "__other__"
MISSING = "__missing__"
EPS = 1e-4
SCORE_EDGES = [i / 10 for i in range(1, 10)]


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray, eps: float = EPS) -> float:
    """PSI = Σ (a − e) · ln(a / e) over bins; both inputs are frequencies (or counts), zeros → ``eps``."""
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape:
        raise ValueError(f"PSI needs equal bins (expected {e.shape}, actual {a.shape})")
    e = e / e.sum() if e.sum() > 0 else e
    a = a / a.sum() if a.sum() > 0 else a
    e = np.clip(e, eps, None)
    a = np.clip(a, eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _numeric_bins(values: np.ndarray, bins: int) -> list[float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return []
    qs = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])
    return sorted({float(q) for q in qs})


def _numeric_counts(values: np.ndarray, edges: list[float]) -> list[int]:
    """Counts per bin ``(-inf, e0], (e0, e1], …, (e_k, inf)`` plus a last bin for missing values."""
    miss = np.isnan(values)
    idx = np.searchsorted(np.asarray(edges, dtype=float), values[~miss], side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).tolist()
    return [*counts, int(miss.sum())]


def _categorical_counts(values: pd.Series | np.ndarray, levels: list[str]) -> list[int]:
    s = pd.Series(values, dtype=object)
    miss = s.isna()
    vc = s[~miss].value_counts()
    known = [int(vc.get(lv, 0)) for lv in levels]
    other = int((~miss).sum()) - sum(known)
    return [*known, other, int(miss.sum())]


def _arrow_categorical_counts(col: pa.Array, levels: list[str]) -> list[int]:
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    idx = pc.index_in(col, value_set=pa.array(levels, pa.string()))
    known = np.bincount(pc.fill_null(idx, len(levels)).to_numpy(zero_copy_only=False), minlength=len(levels) + 1)
    nulls = col.null_count
    other = int(known[len(levels)]) - nulls
    return [*(int(v) for v in known[: len(levels)]), other, nulls]


def baseline_stats(x: pd.DataFrame, fs: FeatureSpec, scores: np.ndarray | None, bins: int = 10) -> dict[str, Any]:
    """The training baseline of every feature (and of the holdout scores)."""
    out: dict[str, Any] = {"rows": len(x), "features": {}}
    for name in fs.numeric:
        v = x[name].to_numpy(dtype=float)
        edges = _numeric_bins(v, bins)
        counts = _numeric_counts(v, edges)
        finite = v[~np.isnan(v)]
        out["features"][name] = {
            "kind": "numeric",
            "edges": edges,
            "freq": [c / max(len(v), 1) for c in counts],
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "missing_rate": float(np.isnan(v).mean()) if len(v) else 0.0,
        }
    for name in fs.categorical:
        s = x[name]
        vc = s.dropna().astype(str).value_counts()
        levels = [str(k) for k in vc.index[:50]]
        counts = _categorical_counts(s, levels)
        out["features"][name] = {
            "kind": "categorical",
            "levels": levels,
            "freq": [c / max(len(s), 1) for c in counts],
            "missing_rate": float(s.isna().mean()) if len(s) else 0.0,
        }
    if scores is not None:
        out["score"] = {
            "kind": "numeric",
            "edges": SCORE_EDGES,
            "freq": [c / max(len(scores), 1) for c in _numeric_counts(np.asarray(scores, float), SCORE_EDGES)],
            "mean": float(np.mean(scores)) if len(scores) else None,
        }
    return out


@dataclass(frozen=True)
class ChunkCounts:
    rows: int
    features: dict[str, list[int]]


@dataclass
class DriftCounter:
    """Accumulates bin counts of scored chunks against a baseline; merge()-able across partitions."""

    baseline: dict[str, Any]
    counts: dict[str, list[int]] = field(default_factory=dict)
    rows: int = 0

    def add(self, x: pd.DataFrame | None, scores: np.ndarray, batch: pa.RecordBatch | None = None) -> None:
        """Count one chunk: its features (:meth:`feature_counts`) and its scores."""
        self.add_counts(self.feature_counts(x, batch), scores)

    def feature_counts(self, x: pd.DataFrame | None, batch: pa.RecordBatch | None = None) -> ChunkCounts:
        """One chunk's bin counts per baseline feature, from the Arrow ``batch`` (fast) or the frame ``x``.
        Touches no state, so scoring counts the next chunk on its prefetch thread."""
        if batch is not None:
            rows = batch.num_rows
        elif x is not None:
            rows = len(x)
        else:
            raise ValueError("feature_counts needs the chunk as a frame or an Arrow batch")
        counts: dict[str, list[int]] = {}
        for name, b in self.baseline.get("features", {}).items():
            numeric = b["kind"] == "numeric"
            if batch is not None and name in batch.schema.names:
                col = batch.column(name)
                c = (
                    _numeric_counts(numeric_values(col), b["edges"])
                    if numeric
                    else _arrow_categorical_counts(col, b["levels"])
                )
            elif x is not None and name in x.columns:
                c = (
                    _numeric_counts(x[name].to_numpy(dtype=float), b["edges"])
                    if numeric
                    else _categorical_counts(x[name], b["levels"])
                )
            else:
                continue
            counts[name] = c
        return ChunkCounts(rows, counts)

    def add_counts(self, chunk: ChunkCounts, scores: np.ndarray) -> None:
        self.rows += chunk.rows
        for name, c in chunk.features.items():
            self._acc(name, c)
        if "score" in self.baseline:
            self._acc(SCORE, _numeric_counts(np.asarray(scores, float), self.baseline["score"]["edges"]))

    def _acc(self, name: str, counts: list[int]) -> None:
        prev = self.counts.get(name)
        self.counts[name] = counts if prev is None else [a + b for a, b in zip(prev, counts, strict=True)]

    def merge(self, other: dict[str, Any]) -> None:
        self.rows += int(other.get("rows", 0))
        for name, c in other.get("counts", {}).items():
            self._acc(name, list(c))

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "counts": self.counts}


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float | None
    status: str  # ok | warn | alert | skipped
    rows: int
    note: str = ""


def evaluate_drift(counter: DriftCounter, ds: DriftSpec) -> list[FeatureDrift]:
    """PSI per feature and for the score; samples below ``minSample`` are skipped (and listed)."""
    out: list[FeatureDrift] = []
    names = [*counter.baseline.get("features", {}).keys(), *([SCORE] if "score" in counter.baseline else [])]
    for name in names:
        b = counter.baseline["score"] if name == SCORE else counter.baseline["features"][name]
        counts = counter.counts.get(name)
        n = sum(counts) if counts else 0
        if counts is None or n < ds.min_sample:
            out.append(FeatureDrift(name, None, "skipped", n, f"sample {n} < minSample {ds.min_sample}"))
            continue
        value = psi(b["freq"], counts)
        status = "alert" if value >= ds.alert_psi else "warn" if value >= ds.warn_psi else "ok"
        out.append(FeatureDrift(name, round(value, 6) if math.isfinite(value) else None, status, n))
    return out
