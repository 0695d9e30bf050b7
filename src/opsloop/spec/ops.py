"""Operations sections: warehouse settings, sync options, KPIs, SLOs and cost configuration."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, model_validator

from opsloop.spec.base import Duration, Ident, SpecModel, problems


class WarehouseSettings(SpecModel):
    meta_dataset: Ident = "opsloop_meta"
    maximum_bytes_billed: int | None = Field(default=None, ge=0)
    # the pipeline lease (opsloop.lease): one run of the pipeline at a time, subflows re-enter it
    lease_ttl: Duration = timedelta(minutes=10)  # a lease not renewed for this long is stale
    lease_wait: Duration = timedelta(minutes=10)  # how long a run waits for a busy pipeline, then fails


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


KPI_CATEGORIES = ("service", "data", "model", "business", "cost")
SLO_RUNBOOKS = {
    "p95_stage_seconds": "docs/runbooks.md#slow-stage",
    "failure_rate": "docs/runbooks.md#failed-runs",
    "freshness_minutes": "docs/runbooks.md#source-outage",
    "retrain_days": "docs/runbooks.md#drift",
}
COST_RUNBOOK = "docs/runbooks.md#cost-overrun"


class KpiSpec(SpecModel):
    """One row of the KPI map: process step → metric → data source → owner → baseline → target.

    ``metric`` names a built-in KPI (``<category>.<name>[.<detail>]``, e.g.
    ``business.predictions_pushed`` or ``data.missing_rate.customers.email``; see
    ``opsloop.kpis.BUILTIN_HELP``) when ``source`` is ``builtin``, or labels the value of ``sql`` — a
    read-only BigQuery-dialect ``SELECT`` returning one number in its first column, tables written
    as ``{{ ref('dataset.table') }}`` (transpiled for DuckDB, like the feature SQL).
    ``baseline`` is the value measured before the AI loop, ``target`` the value it should reach.
    """

    name: Ident
    step: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    source: Literal["builtin", "sql"] = "builtin"
    sql: str | None = None
    owner: str = Field(min_length=1)
    baseline: float | None = None
    target: float | None = None
    higher_is_better: bool = True
    unit: str = ""
    description: str = ""

    @model_validator(mode="after")
    def _check_source(self) -> KpiSpec:
        category = self.metric.split(".", 1)[0]
        problems(
            (self.source == "sql" and not (self.sql or "").strip(), "sql: required when source is sql"),
            (self.source == "builtin" and self.sql is not None, "sql: only allowed when source is sql"),
            (
                self.source == "builtin" and category not in KPI_CATEGORIES,
                f"metric: built-in metrics start with one of {list(KPI_CATEGORIES)} (got {self.metric!r})",
            ),
            (
                self.source == "sql" and not _is_select(self.sql or ""),
                "sql: must be a single read-only SELECT (or WITH … SELECT) statement",
            ),
        )
        return self


def _is_select(sql: str) -> bool:
    body = sql.strip().rstrip(";").strip()
    head = body.split(None, 1)[0].upper() if body else ""
    return head in ("SELECT", "WITH") and ";" not in body


class SloSpec(SpecModel):
    """A service-level objective checked at the end of every run; a breach fails the run.

    * ``p95_stage_seconds``: p95 of ``stage``'s wall seconds over the last ``windowRuns`` runs ≤ threshold
    * ``failure_rate``: share of failed stage runs over the last ``windowRuns`` ≤ threshold (0..1)
    * ``freshness_minutes``: minutes since the newest row of ``table`` (default: every warehouse
      destination with an ``orderBy`` column) ≤ threshold
    * ``retrain_days``: days since the last completed ``train`` stage ≤ threshold

    The two windowed kinds report ``no_data`` until ``minRuns`` runs exist (one slow or failed first
    run says little about a p95 or a rate).
    """

    name: Ident
    kind: Literal["p95_stage_seconds", "failure_rate", "freshness_minutes", "retrain_days"]
    stage: str | None = None
    table: str | None = None
    threshold: float = Field(ge=0)
    window_runs: int = Field(default=20, ge=1)
    min_runs: int = Field(default=5, ge=1)
    severity: Literal["fail", "warn"] = "fail"
    runbook: str | None = None

    @property
    def runbook_link(self) -> str:
        return self.runbook or SLO_RUNBOOKS[self.kind]

    @model_validator(mode="after")
    def _check_kind(self) -> SloSpec:
        problems(
            (self.kind == "p95_stage_seconds" and not self.stage, "stage: required for kind p95_stage_seconds"),
            (self.kind == "failure_rate" and self.threshold > 1, "threshold: a failure rate is between 0 and 1"),
            (
                self.table is not None and self.table.count(".") != 1,
                f"table: {self.table!r} is not a dataset.table name",
            ),
        )
        return self


class CostSpec(SpecModel):
    """Prices the cost ledger uses (list prices; no free tier or discounts are subtracted).

    BigQuery on-demand: ``bqUsdPerTib`` per TiB billed, each query job billed at least
    ``bqMinBytesPerQuery`` (10 MiB) and rounded up to whole MiB; load jobs are free. Compute: Cloud Run
    job prices per vCPU-second and GiB-second × the work pool's vCPU / memory (``vcpu`` /
    ``memoryGib`` unless the flow run's job variables say otherwise). CRM APIs: an internal
    chargeback price per call per destination (vendors bill API use through the licence, so 0 by
    default) and the daily call budget per destination opsloop may use.
    """

    bq_usd_per_tib: float = Field(default=6.25, ge=0)
    bq_min_bytes_per_query: int = Field(default=10 * 1024 * 1024, ge=0)
    vcpu: float = Field(default=1.0, gt=0)
    memory_gib: float = Field(default=2.0, gt=0)
    usd_per_vcpu_second: float = Field(default=0.000018, ge=0)
    usd_per_gib_second: float = Field(default=0.000002, ge=0)
    api_usd_per_call: dict[str, float] = Field(default_factory=dict)
    api_daily_budget: dict[str, int] = Field(default_factory=dict)
    budget_per_run_usd: float | None = Field(default=None, ge=0)
    runbook: str = COST_RUNBOOK

    @model_validator(mode="after")
    def _check_maps(self) -> CostSpec:
        problems(
            *[(v < 0, f"apiUsdPerCall.{k}: must be >= 0") for k, v in self.api_usd_per_call.items()],
            *[(v < 0, f"apiDailyBudget.{k}: must be >= 0") for k, v in self.api_daily_budget.items()],
        )
        return self
