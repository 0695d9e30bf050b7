"""The fitted preprocessing of opsloop's own pipelines (:func:`opsloop.ml.features.make_preprocessor`:
median/constant imputers with missing indicators, optional scaling, one-hot) applied straight to an
Arrow chunk — the same matrix, cell for cell, as the fitted ``ColumnTransformer`` on
:func:`opsloop.ml.features.to_frame`'s DataFrame, without building the DataFrame or sklearn's
per-value Python lookups for the categorical levels (245,760 rows: ≈ 0.03 instead of 0.26 CPU s).

:meth:`ArrowPreprocessor.compile` reads the fitted transformers and returns ``None`` for anything it
does not reproduce exactly (another transformer, infrequent categories, dropped levels, a sparse or
pandas output, an all-missing training column…); such a model is preprocessed by sklearn itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from opsloop.ml.features import numeric_values, string_values


@dataclass(frozen=True)
class _Numeric:
    """A SimpleImputer (+ its missing indicators) and an optional StandardScaler on numeric columns."""

    columns: tuple[str, ...]
    fill: np.ndarray  # the imputer's statistics, one per column
    indicators: tuple[int, ...]  # the columns (indices) with a missing-value indicator, in order
    mean: np.ndarray | None
    scale: np.ndarray | None

    @property
    def width(self) -> int:
        return len(self.columns) + len(self.indicators)

    def write(self, batch: pa.RecordBatch | pa.Table, out: np.ndarray) -> None:
        missing: list[np.ndarray] = []
        for j, name in enumerate(self.columns):
            v = numeric_values(batch.column(name))
            if np.isinf(v).any():  # as sklearn's imputer, which accepts NaN but no infinity
                raise ValueError(f"feature {name!r}: an infinite value; the model takes finite numbers or NULL")
            mask = np.isnan(v)
            out[:, j] = v
            out[mask, j] = self.fill[j]
            missing.append(mask)
        for k, j in enumerate(self.indicators):
            out[:, len(self.columns) + k] = missing[j]
        if self.mean is not None:  # StandardScaler: every column the imputer put out, indicators too
            out -= self.mean
        if self.scale is not None:
            out /= self.scale


@dataclass(frozen=True)
class _OneHot:
    """A constant SimpleImputer and a OneHotEncoder (unknown levels → all zeros) on one column."""

    column: str
    fill: str
    levels: pa.Array  # the encoder's categories, in its order

    @property
    def width(self) -> int:
        return len(self.levels)

    def write(self, batch: pa.RecordBatch | pa.Table, out: np.ndarray) -> None:
        values = pc.fill_null(string_values(batch.column(self.column)), self.fill)
        idx = pc.fill_null(pc.index_in(values, value_set=self.levels), -1).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(idx >= 0)
        out[rows, idx[rows]] = 1.0


class ArrowPreprocessor:
    """``transform(batch)`` = the fitted pipeline's preprocessing steps on ``to_frame(batch)``."""

    def __init__(self, parts: list[_Numeric | _OneHot]) -> None:
        self.parts = parts
        self.width = sum(p.width for p in parts)

    def transform(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        out = np.zeros((batch.num_rows, self.width), dtype=np.float64)
        at = 0
        for p in self.parts:
            p.write(batch, out[:, at : at + p.width])
            at += p.width
        return out

    @classmethod
    def compile(cls, model: Any) -> ArrowPreprocessor | None:
        """For a fitted ``Pipeline([ColumnTransformer, estimator])`` of the shapes above, else ``None``."""
        steps = getattr(model, "steps", None)
        if not (isinstance(model, Pipeline) and isinstance(steps, list) and len(steps) == 2):
            return None
        ct = steps[0][1]
        if not isinstance(ct, ColumnTransformer) or not _default_output(model, ct) or ct.sparse_output_:
            return None
        parts: list[_Numeric | _OneHot] = []
        for _name, trans, columns in ct.transformers_:
            if isinstance(trans, str) and trans == "drop":
                continue
            cols = list(columns) if isinstance(columns, list | tuple | np.ndarray) else None
            if not cols or not all(isinstance(c, str) for c in cols) or not isinstance(trans, Pipeline):
                return None
            part = _numeric(trans, cols) or _onehot(trans, cols)
            if part is None:
                return None
            parts.extend(part)
        width = sum(p.width for p in parts)
        if not parts or width != _output_width(ct):
            return None
        return cls(parts)


def _default_output(*estimators: Any) -> bool:
    """No ``set_output(transform="pandas"|"polars")`` on the pipeline or its transformers."""
    return all(getattr(e, "_sklearn_output_config", {}).get("transform", "default") == "default" for e in estimators)


def _output_width(ct: ColumnTransformer) -> int:
    slices = getattr(ct, "output_indices_", {})
    return max((s.stop for s in slices.values()), default=0)


def _numeric(pipe: Pipeline, cols: list[str]) -> list[_Numeric | _OneHot] | None:
    steps = [s for _, s in pipe.steps]
    if not steps or not _default_output(*steps) or not _nan_imputer(steps[0]):
        return None
    imp: SimpleImputer = steps[0]
    if imp.strategy == "constant" or imp.keep_empty_features:
        return None
    stats = np.asarray(imp.statistics_, dtype=np.float64)
    if len(stats) != len(cols) or np.isnan(stats).any():  # sklearn drops an all-missing column
        return None
    indicators: tuple[int, ...] = ()
    if imp.add_indicator:
        ind = imp.indicator_
        if ind.features != "missing-only" or ind.sparse not in (False, "auto"):
            return None
        indicators = tuple(int(i) for i in ind.features_)
    mean = scale = None
    if len(steps) == 2:
        sc = steps[1]
        if not isinstance(sc, StandardScaler):
            return None
        mean = np.asarray(sc.mean_, dtype=np.float64) if sc.with_mean else None
        scale = np.asarray(sc.scale_, dtype=np.float64) if sc.with_std else None
        if any(a is not None and len(a) != len(cols) + len(indicators) for a in (mean, scale)):
            return None
    elif len(steps) > 2:
        return None
    return [_Numeric(tuple(cols), stats, indicators, mean, scale)]


def _onehot(pipe: Pipeline, cols: list[str]) -> list[_Numeric | _OneHot] | None:
    steps = [s for _, s in pipe.steps]
    if len(steps) != 2 or not _default_output(*steps) or not _nan_imputer(steps[0]):
        return None
    imp, enc = steps
    if imp.strategy != "constant" or not isinstance(imp.fill_value, str) or imp.add_indicator:
        return None
    if not isinstance(enc, OneHotEncoder) or enc.sparse_output or enc.drop_idx_ is not None:
        return None
    if enc.handle_unknown not in ("ignore", "infrequent_if_exist") or np.dtype(enc.dtype) != np.float64:
        return None
    if getattr(enc, "_infrequent_enabled", False) and any(c is not None for c in enc.infrequent_categories_):
        return None
    if len(enc.categories_) != len(cols):
        return None
    out: list[_Numeric | _OneHot] = []
    for name, levels in zip(cols, enc.categories_, strict=True):
        if not all(isinstance(v, str) for v in levels):
            return None
        out.append(_OneHot(name, imp.fill_value, pa.array(list(levels), pa.string())))
    return out


def _nan_imputer(step: Any) -> bool:
    mv = getattr(step, "missing_values", None)
    return isinstance(step, SimpleImputer) and isinstance(mv, float) and np.isnan(mv)
