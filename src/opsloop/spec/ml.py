"""Model and scoring sections: features, training, promotion gate, fairness, scoring, drift."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from opsloop.spec.base import Duration, Ident, IdentList, ModelName, SpecModel, problems


class FeatureBuildSpec(SpecModel):
    """SQL (BigQuery dialect; transpiled for DuckDB) deriving the feature table as of a date.

    ``{{ ref('dataset.table') }}`` names an input table, ``@as_of`` is the as-of DATE parameter.
    It must return the entity key, the as-of column and every feature (and the target, NULL where
    unknown). Rows are MERGEd on (entity key, as-of), so rebuilding a date is idempotent.
    """

    sql: str
    horizon_days: int = Field(default=90, ge=1)

    @model_validator(mode="after")
    def _check(self) -> FeatureBuildSpec:
        problems(
            ("@as_of" not in self.sql, "sql: must use the @as_of parameter (point-in-time features)"),
            ("{{" not in self.sql, "sql: name its input tables with {{ ref('dataset.table') }}"),
        )
        return self


class FeatureSpec(SpecModel):
    """A feature set read from the warehouse: one row per entity (and as-of date)."""

    dataset: Ident
    table: Ident
    entity_key: Ident
    as_of: Ident | None = None
    target: Ident
    numeric: IdentList = Field(default_factory=list)
    categorical: IdentList = Field(default_factory=list)
    build: FeatureBuildSpec | None = None

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        dup = set(self.numeric) & set(self.categorical)
        problems(
            (not self.numeric and not self.categorical, "numeric: list at least one feature"),
            (bool(dup), f"categorical: {sorted(dup)} also listed as numeric"),
            (self.target in self.columns, f"target: {self.target!r} cannot also be a feature"),
            (self.entity_key in self.columns, f"entityKey: {self.entity_key!r} cannot also be a feature"),
        )
        return self


class SplitSpec(SpecModel):
    strategy: Literal["stratified", "time"] = "stratified"
    test_size: float = Field(default=0.2, gt=0, lt=1)
    time_column: Ident | None = None
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        problems((self.strategy == "time" and not self.time_column, "timeColumn: required for a time split"))
        return self


class PromotionSpec(SpecModel):
    """A challenger becomes champion only if it passes the floors and beats the champion by margin."""

    metric: Literal["roc_auc", "pr_auc"] = "roc_auc"
    min_roc_auc: float = Field(default=0.6, ge=0, le=1)
    max_brier: float = Field(default=0.25, ge=0, le=1)
    min_margin: float = Field(default=0.0, ge=0, le=1)
    max_fairness_gap: float | None = Field(default=None, ge=0, le=1)
    # direct: the gate decides at training time. shadow / canary: a challenger that passes the
    # gate gets the ``challenger`` alias, is scored beside the champion, and promote-challenger
    # decides on the observed score distributions and realised metrics.
    rollout: Literal["direct", "shadow", "canary"] = "direct"
    max_score_psi: float = Field(default=0.25, ge=0)
    min_rollout_labels: int = Field(default=50, ge=1)


class FairnessSpec(SpecModel):
    group_column: Ident
    min_group_size: int = Field(default=30, ge=1)
    metric: Literal["auc", "positive_rate", "calibration"] = "auc"
    threshold: float = Field(default=0.5, gt=0, lt=1)


class ModelSpec(SpecModel):
    name: ModelName
    kind: Literal["random_forest", "hist_gradient_boosting", "logistic_regression"] = "random_forest"
    params: dict[str, Any] = Field(default_factory=dict)
    features: FeatureSpec
    split: SplitSpec = Field(default_factory=SplitSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    fairness: FairnessSpec | None = None
    min_positives: int = Field(default=20, ge=1)
    retrain_every: Duration | None = None
    # at most this many rows of the snapshot are read for training: a stable hash sample of the
    # entity key (the same rows on every rerun); bounds training memory and time on big populations
    train_sample: int | None = Field(default=None, ge=100)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        f = self.features
        problems(
            (
                self.split.strategy == "time"
                and self.split.time_column is not None
                and self.split.time_column in (f.target, f.entity_key),
                "split.timeColumn: cannot be the target or the entity key",
            ),
            (
                self.promotion.max_fairness_gap is not None and self.fairness is None,
                "promotion.maxFairnessGap: needs a fairness.groupColumn",
            ),
        )
        return self


class LabelSpec(SpecModel):
    """Where ground truth arrives later (concept drift): ``column`` true/false per ``key``; with
    ``eventTime`` a positive counts only for predictions made before the event."""

    dataset: Ident
    table: Ident
    key: Ident
    column: Ident
    event_time: Ident | None = None


class DriftSpec(SpecModel):
    warn_psi: float = Field(default=0.1, ge=0)
    alert_psi: float = Field(default=0.25, ge=0)
    min_sample: int = Field(default=100, ge=1)
    policy: Literal["warn", "block_push", "retrain"] = "warn"
    min_realised_auc: float = Field(default=0.6, ge=0, le=1)
    min_labels: int = Field(default=50, ge=2)
    label_lookback_days: int = Field(default=180, ge=1)
    labels: LabelSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> DriftSpec:
        problems((self.alert_psi < self.warn_psi, "alertPsi: must be ≥ warnPsi"))
        return self


class ActionRule(SpecModel):
    """Next-best-action rule: first rule whose bounds hold wins."""

    action: str
    min_score: float = 0.0
    max_score: float = 1.0
    when: dict[Ident, Any] = Field(default_factory=dict)


class ReviewSpec(SpecModel):
    enabled: bool = False
    min_score: float = Field(default=0.9, ge=0, le=1)
    column: Ident | None = None
    min_value: float | None = None
    timeout: int = Field(default=3600, ge=1)
    default: Literal["approve", "reject"] = "reject"


class FallbackRule(SpecModel):
    """Rules-based score used when no model can be loaded: weighted sum squashed to 0..1."""

    weights: dict[Ident, float] = Field(default_factory=dict)
    intercept: float = 0.0


class ScoringSpec(SpecModel):
    dataset: Ident = "ops_ai"
    table: Ident = "predictions"
    population: Ident | None = None
    score_column: Ident = "predicted_churn_risk"
    risk_buckets: dict[str, float] = Field(default_factory=lambda: {"low": 0.3, "medium": 0.7, "high": 1.0})
    next_best_action: list[ActionRule] = Field(default_factory=list)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    review: ReviewSpec = Field(default_factory=ReviewSpec)
    fallback: FallbackRule | None = None
    fallback_on_mlflow_down: bool = False
    partitions: int = Field(default=1, ge=1, le=256)
    # rows per predict_proba call: two DuckDB row groups; 300 trees cost 9 % more CPU per row in calls of
    # 100,000 rows than in one call over 1M rows, 2 % more in calls of 245,760
    chunk_rows: int = Field(default=245_760, ge=1)
    canary_share: float = Field(default=0.0, ge=0, le=1)
    shadow: bool = False
    history_table: Ident = "prediction_history"
    review_table: Ident = "review_queue"

    @model_validator(mode="after")
    def _check(self) -> ScoringSpec:
        edges = sorted(self.risk_buckets.values())
        problems(
            (not self.risk_buckets, "riskBuckets: name at least one bucket"),
            (bool(edges) and edges[-1] < 1.0, "riskBuckets: the highest bound must be 1.0"),
            (
                self.review.enabled and (self.review.column is None) != (self.review.min_value is None),
                "review.minValue: give column and minValue together",
            ),
        )
        return self
