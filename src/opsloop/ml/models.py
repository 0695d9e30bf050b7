"""Which model scores: ``@champion`` → ``@previous`` → the spec's rules fallback, and the optional
``@challenger`` for shadow / canary rollouts. Every step down is recorded with its reason."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from opsloop.errors import TerminalError
from opsloop.ml.arrow_prep import ArrowPreprocessor
from opsloop.ml.promotion import CHALLENGER, CHAMPION, PREVIOUS
from opsloop.ml.registry import MLflowAdapter, MLflowUnavailableError
from opsloop.spec import PipelineSpec
from opsloop.spec.ml import FallbackRule

RULES = "rules"


class RulesModel:
    """``sigmoid(intercept + Σ weight·column)``, missing values counted as 0 — the last resort."""

    def __init__(self, rule: FallbackRule) -> None:
        self.rule = rule

    @property
    def columns(self) -> list[str]:
        return list(self.rule.weights)

    def predict_proba(self, x: pd.DataFrame) -> np.ndarray:
        z = np.full(len(x), float(self.rule.intercept))
        for col, w in self.rule.weights.items():
            z += w * np.nan_to_num(x[col].to_numpy(dtype=float), nan=0.0)
        p = 1.0 / (1.0 + np.exp(-z))
        return np.column_stack([1 - p, p])


@dataclass
class ScoringModel:
    name: str
    version: str
    alias: str
    model: Any
    is_fallback: bool = False
    run_id: str | None = None
    baseline: dict[str, Any] | None = None

    def scores(self, x: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x)[:, 1], dtype=float)

    def prepare(self, x: pd.DataFrame) -> Prepared:
        """``x`` through every step of an sklearn Pipeline but the last (imputing, encoding…), for
        :meth:`scores_prepared`. Batch scoring runs this for the next chunk on another thread while
        the final estimator scores the current one: the preprocessing is single-threaded, the forest
        uses every core, so overlapping them keeps the cores busy. Not a Pipeline: ``x`` unchanged."""
        steps = getattr(self.model, "steps", None)
        if isinstance(steps, list) and len(steps) > 1 and hasattr(self.model, "__getitem__"):
            return Prepared(self.model[:-1].transform(x), final=True)
        return Prepared(x, final=False)

    def prepare_batch(self, batch: pa.RecordBatch, frame: Callable[[], pd.DataFrame]) -> Prepared:
        """:meth:`prepare` of ``frame()`` (the batch's feature frame), straight from the Arrow ``batch``
        when the pipeline's preprocessing is one :class:`ArrowPreprocessor` reproduces — the same
        matrix without the DataFrame or sklearn's per-value lookups."""
        prep = self.arrow_preprocessor
        if prep is None:
            return self.prepare(frame())
        return Prepared(prep.transform(batch), final=True)

    @cached_property
    def arrow_preprocessor(self) -> ArrowPreprocessor | None:
        return ArrowPreprocessor.compile(self.model)

    def scores_prepared(self, prepared: Prepared) -> np.ndarray:
        """The same scores as :meth:`scores` on the frame :meth:`prepare` was given."""
        if not prepared.final:
            return self.scores(prepared.data)
        return np.asarray(self.model[-1].predict_proba(prepared.data)[:, 1], dtype=float)


@dataclass
class Prepared:
    """A model input after the pipeline's preprocessing (``final``: only the last step is left)."""

    data: Any
    final: bool


@dataclass
class ResolvedModels:
    champion: ScoringModel
    challenger: ScoringModel | None = None
    notes: list[str] = field(default_factory=list)


def _load(reg: MLflowAdapter, name: str, alias: str) -> ScoringModel:
    info = reg.version(name, alias)
    if info is None:
        raise LookupError(f"no @{alias} alias on model {name!r}")
    model = reg.load_model(name, info.version)
    baseline = reg.load_json(info.run_id) if info.run_id else None
    return ScoringModel(name, info.version, alias, model, run_id=info.run_id, baseline=baseline)


def rules_model(spec: PipelineSpec, why: str) -> ScoringModel:
    if spec.scoring.fallback is None:
        raise TerminalError(f"{why}; and the spec has no scoring.fallback rules to score with")
    return ScoringModel(RULES, "rules", RULES, RulesModel(spec.scoring.fallback), is_fallback=True)


def resolve_models(reg: MLflowAdapter, spec: PipelineSpec, alias: str = CHAMPION) -> ResolvedModels:
    """``alias`` (default champion) → ``previous`` → rules. MLflow unreachable → error naming the URI,
    or the rules when ``scoring.fallbackOnMlflowDown`` is set."""
    if spec.model is None:
        raise TerminalError("model: the spec has no model section to score with")
    name = spec.model.name
    notes: list[str] = []
    try:
        reg.ping()
    except MLflowUnavailableError as exc:
        if not spec.scoring.fallback_on_mlflow_down:
            raise
        notes.append(f"{exc}; scoring with the rules fallback (scoring.fallbackOnMlflowDown)")
        return ResolvedModels(rules_model(spec, str(exc)), None, notes)
    champion: ScoringModel | None = None
    for candidate in dict.fromkeys([alias, PREVIOUS]):
        try:
            champion = _load(reg, name, candidate)
            break
        except MLflowUnavailableError:
            raise
        except Exception as exc:  # missing alias, deleted version, unreadable artifact
            notes.append(f"@{candidate} unavailable: {str(exc)[:300]}")
    if champion is None:
        champion = rules_model(spec, f"model {name!r}: " + "; ".join(notes))
        notes.append("scoring with the rules fallback (scoring.fallback)")
    challenger = None
    if not champion.is_fallback and (spec.scoring.shadow or spec.scoring.canary_share > 0):
        try:
            challenger = _load(reg, name, CHALLENGER)
        except MLflowUnavailableError:
            raise
        except Exception as exc:
            notes.append(f"no challenger to shadow/canary: {str(exc)[:200]}")
        if challenger is not None and challenger.version == champion.version:
            challenger = None
    return ResolvedModels(champion, challenger, notes)
