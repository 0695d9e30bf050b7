"""Operations sections: warehouse settings, sync options, KPIs, SLOs and cost configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opsloop.spec.base import Ident, SpecModel


class WarehouseSettings(SpecModel):
    meta_dataset: Ident = "opsloop_meta"
    maximum_bytes_billed: int | None = Field(default=None, ge=0)


class SignificanceSpec(SpecModel):
    """A score change is pushed only if its bucket changed or it moved by at least ``minDelta``."""

    min_delta: float = Field(default=0.0, ge=0, le=1)
    on_bucket_change: bool = True


class SyncOptions(SpecModel):
    dry_run: bool = False
    api_budget_share: float = Field(default=0.5, gt=0, le=1)
    bulk_threshold: int = Field(default=2000, ge=1)
    retry_cap: int = Field(default=5, ge=1)
    block_on: list[Literal["quality", "drift"]] = Field(default_factory=lambda: ["quality", "drift"])  # type: ignore[arg-type]
    require_review: bool = False
    significance: SignificanceSpec = Field(default_factory=SignificanceSpec)


class KpiSpec(SpecModel):
    """Process step → metric → data source → owner → baseline → target."""

    name: Ident
    step: str
    metric: str
    source: str = "builtin"
    owner: str
    baseline: float | None = None
    target: float | None = None
    higher_is_better: bool = True


class SloSpec(SpecModel):
    name: Ident
    kind: Literal["p95_stage_seconds", "failure_rate", "freshness_minutes", "retrain_days"]
    stage: str | None = None
    threshold: float
    window_runs: int = Field(default=20, ge=1)
    runbook: str = "docs/runbooks.md"


class CostSpec(SpecModel):
    bq_usd_per_tib: float = Field(default=6.25, ge=0)
    vcpu: float = Field(default=1.0, gt=0)
    memory_gib: float = Field(default=2.0, gt=0)
    usd_per_vcpu_second: float = Field(default=0.000018, ge=0)
    usd_per_gib_second: float = Field(default=0.000002, ge=0)
    budget_per_run_usd: float | None = Field(default=None, ge=0)
