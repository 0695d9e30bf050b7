"""KPIs and SLOs of every run: the ``kpis`` table, the spec's KPI map, SLO checks that fail loudly.

``evaluate_run`` collects the built-in KPIs (service, data, model, business, cost — see
:mod:`opsloop.kpi_sources`), attaches the spec's KPI map (step → metric → source → owner →
baseline → target, SQL KPIs run in the warehouse), evaluates every SLO and the per-run cost
budget, and upserts one row per KPI and run into ``<meta>.kpis`` (MERGE on flow_run_id + kpi, so
evaluating a run twice replaces its rows). :func:`raise_on_breach` turns breached SLOs into a
:class:`SloBreachedError` naming each SLO, its value, its threshold and its runbook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsloop import costs, faults
from opsloop.errors import TerminalError
from opsloop.kpi_sources import (
    Kpi,
    business_kpis,
    cost_kpis,
    data_kpis,
    guarded,
    missing,
    model_kpis,
    p95,
    schema_changes,
    service_kpis,
    task_kpis,
)
from opsloop.spec import PipelineSpec
from opsloop.spec.ops import KpiSpec, SloSpec
from opsloop.upsert import adapter_dialect, held_open, upsert_rows_sql
from opsloop.warehouse.base import Column, TableRef, TableSchema, Warehouse

KPI_TABLE = "kpis"
KPI_SCHEMA = TableSchema(
    (
        Column("flow_run_id", "STRING", False),
        Column("kpi", "STRING", False),
        Column("pipeline", "STRING"),
        Column("category", "STRING"),
        Column("name", "STRING"),
        Column("step", "STRING"),
        Column("owner", "STRING"),
        Column("value", "FLOAT64"),
        Column("unit", "STRING"),
        Column("baseline", "FLOAT64"),
        Column("target", "FLOAT64"),
        Column("status", "STRING"),
        Column("detail", "STRING"),
        Column("source", "STRING"),
        Column("computed_at", "TIMESTAMP"),
    ),
    cluster_by=("pipeline", "flow_run_id"),
)
BUILTIN_HELP = {
    "service": "duration_seconds, stage_seconds.<stage>, p95_stage_seconds.<stage>, failed_stages, failed_tasks, "
    "task_retries",
    "data": "rows_ingested, table_rows.<table>, columns.<table>, missing_rate.<table>.<column>, "
    "freshness_minutes.<table>, quarantine_rate, schema_changes",
    "model": "auc (training), realised_auc, scored_entities, score_mean/min/max, bucket_share.<bucket>, psi.<feature>",
    "business": "predictions_pushed, crm_errors, held_for_review, review_rejected, review_pending, manual_overrides",
    "cost": "total_usd, usd_per_1k_ingested, usd_per_1k_pushed, api_calls_left.<destination>",
}
HISTORY_DAYS = 400


class SloBreachedError(TerminalError):
    """One or more SLOs of the spec are breached; the message lists each with its runbook."""


class CostBudgetExceededError(TerminalError):
    """A run cost more than ``costs.budgetPerRunUsd``."""


@dataclass
class RunFacts:
    """The run being evaluated. ``metrics``: built-in values the caller knows (e.g. ``model.auc``)."""

    pipeline: str
    flow_run_id: str
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    failed_tasks: int | None = None
    task_retries: int | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    window_runs: int = 20


@dataclass
class SloResult:
    slo: SloSpec
    value: float | None
    status: str
    detail: str = ""

    @property
    def message(self) -> str:
        v = "no data" if self.value is None else f"{self.value:.4g}"
        return (
            f"SLO {self.slo.name} ({self.slo.kind}{' ' + self.slo.stage if self.slo.stage else ''}) = {v}, "
            f"threshold {self.slo.threshold:g}: {self.status}. {self.detail} Runbook: {self.slo.runbook_link}"
        )


@dataclass
class RunEvaluation:
    kpis: list[Kpi]
    slos: list[SloResult]
    budget: Kpi | None = None

    @property
    def breaches(self) -> list[SloResult]:
        return [s for s in self.slos if s.status == "breach" and s.slo.severity == "fail"]


# -- the KPI map ------------------------------------------------------------------------------------------------
def sql_kpi(wh: Warehouse, k: KpiSpec) -> Kpi:
    from opsloop.ml.sql import render_sql

    try:
        t = wh.query(render_sql(wh, k.sql or ""))
        value = t.column(0)[0].as_py() if t.num_rows and t.num_columns else None
        return Kpi(k.metric, None if value is None else float(value), k.unit, "ok", source="sql")
    except Exception as exc:
        return Kpi(k.metric, None, k.unit, "missing", f"SQL failed: {type(exc).__name__}: {exc}"[:500], "sql")


def apply_kpi_map(wh: Warehouse, spec: PipelineSpec, builtin: Sequence[Kpi]) -> list[Kpi]:
    """The spec's KPIs with value, baseline, target, owner and whether the target is met."""
    by_key = {k.kpi: k for k in builtin}
    out: list[Kpi] = []
    for k in spec.kpis:
        if k.source == "sql":
            got = sql_kpi(wh, k)
        else:
            got = by_key.get(k.metric) or missing(k.metric, f"built-in metric {k.metric!r} was not computed this run")
        status = got.status
        if got.value is not None and k.target is not None:
            met = got.value >= k.target if k.higher_is_better else got.value <= k.target
            status = "on_target" if met else "off_target"
        out.append(
            Kpi(
                f"kpi.{k.name}",
                got.value,
                k.unit or got.unit,
                status,
                got.detail,
                got.source,
                k.name,
                k.step,
                k.owner,
                k.baseline,
                k.target,
            )
        )
    return out


# -- SLOs ------------------------------------------------------------------------------------------------------
def _recent_roots(history: Sequence[Mapping[str, Any]], n: int) -> list[str]:
    order: dict[str, datetime] = {}
    for r in history:
        root = r["root_flow_run_id"]
        order[root] = max(order.get(root, r["started_at"]), r["started_at"])
    return sorted(order, key=lambda k: order[k])[-n:]


def evaluate_slo(
    slo: SloSpec, history: Sequence[Mapping[str, Any]], builtin: Sequence[Kpi], now: datetime
) -> SloResult:
    """One SLO against the ledger history (oldest first, includes this run) and this run's KPIs."""
    value: float | None
    detail = ""
    if slo.kind == "p95_stage_seconds":
        vals = [float(r["wall_seconds"] or 0) for r in history if r["stage"] == slo.stage][-slo.window_runs :]
        value, detail = p95(vals), f"over the last {len(vals)} run(s) of stage {slo.stage}."
        if len(vals) < slo.min_runs:
            return SloResult(slo, value, "no_data", f"only {len(vals)} run(s), fewer than minRuns {slo.min_runs}.")
    elif slo.kind == "failure_rate":
        roots = set(_recent_roots(history, slo.window_runs))
        failed = {
            r["root_flow_run_id"] for r in history if r["root_flow_run_id"] in roots and r["status"] != "completed"
        }
        value = len(failed) / len(roots) if roots else None
        detail = f"{len(failed)} of the last {len(roots)} run(s) had a failed stage."
        if len(roots) < slo.min_runs:
            return SloResult(slo, value, "no_data", f"{detail} Fewer than minRuns {slo.min_runs}.")
    elif slo.kind == "freshness_minutes":
        suffix = f".{slo.table.split('.', 1)[1]}" if slo.table else ""
        vals = [
            k.value
            for k in builtin
            if k.kpi.startswith("data.freshness_minutes.") and k.kpi.endswith(suffix) and k.value is not None
        ]
        value = max(vals) if vals else None
        detail = f"oldest newest-row age over {len(vals)} table(s)."
    else:
        trained = [r["ended_at"] for r in history if r["stage"] == "train" and r["status"] == "completed"]
        value = (now - max(trained)).total_seconds() / 86400 if trained else None
        detail = "days since the last completed train stage."
    if value is None:
        return SloResult(slo, None, "no_data", detail or "nothing recorded yet.")
    return SloResult(slo, value, "breach" if value > slo.threshold else "ok", detail)


def budget_check(spec: PipelineSpec, run_rows: Sequence[Mapping[str, Any]]) -> Kpi | None:
    budget = spec.costs.budget_per_run_usd
    if budget is None:
        return None
    total = sum(float(r.get("total_usd") or 0) for r in run_rows)
    status = "breach" if total > budget else "ok"
    detail = f"budget ${budget:g}; runbook {spec.costs.runbook}"
    return Kpi("cost.budget_per_run", total, "USD", status, detail, target=budget)


# -- evaluate and store -----------------------------------------------------------------------------------------
def evaluate_run(wh: Warehouse, spec: PipelineSpec, facts: RunFacts, write: bool = True) -> RunEvaluation:
    """Collect KPIs, apply the KPI map, evaluate SLOs and the budget; upsert the rows into ``kpis``."""
    with held_open(wh):
        return _evaluate(wh, spec, facts, write)


def _evaluate(wh: Warehouse, spec: PipelineSpec, facts: RunFacts, write: bool) -> RunEvaluation:
    history = costs.read_ledger(wh, facts.now - timedelta(days=HISTORY_DAYS), None, spec.name)
    run_rows = [r for r in history if facts.flow_run_id in (r["root_flow_run_id"], r["flow_run_id"])]
    run_ids = sorted({facts.flow_run_id, *(r["flow_run_id"] for r in run_rows)})
    builtin: list[Kpi] = []
    builtin += guarded("service", lambda: service_kpis(run_rows, history, facts.window_runs))
    builtin += task_kpis(facts.failed_tasks, facts.task_retries)
    builtin += guarded("data", lambda: data_kpis(wh, spec, run_rows, run_ids, facts.now))
    builtin += guarded("model", lambda: model_kpis(wh, spec, run_ids))
    builtin += guarded("business", lambda: business_kpis(wh, spec, run_rows, run_ids))
    builtin += guarded("cost", lambda: cost_kpis(run_rows))
    builtin.append(schema_changes(builtin, guarded_previous_columns(wh, spec.name, facts.flow_run_id)))
    known = {k.kpi for k in builtin}
    for key, value in facts.metrics.items():
        if key in known:
            builtin = [k for k in builtin if k.kpi != key]
        builtin.append(Kpi(key, value, status="ok" if value is not None else "missing", source="run"))
    if "model.auc" not in {k.kpi for k in builtin}:
        builtin.append(missing("model.auc", "no training in this run (the train stage reports model.auc)"))
    mapped = apply_kpi_map(wh, spec, builtin)
    slos = [evaluate_slo(s, history, builtin, facts.now) for s in spec.slos]
    budget = budget_check(spec, run_rows)
    ev = RunEvaluation(builtin + mapped, slos, budget)
    if write:
        write_kpis(wh, facts, ev)
    return ev


def guarded_previous_columns(wh: Warehouse, pipeline: str, flow_run_id: str) -> dict[str, str]:
    """The latest earlier run's column fingerprints (``data.columns.<table>`` rows of ``kpis``)."""
    ref = TableRef(wh.meta_dataset, KPI_TABLE)
    try:
        if wh.table_schema(ref) is None:
            return {}
        rows = wh.query(
            f"SELECT kpi, detail FROM {wh.quote(ref)} WHERE pipeline = {wh.param('p')} "
            f"AND flow_run_id != {wh.param('r')} AND kpi LIKE 'data.columns.%' ORDER BY computed_at",
            {"p": pipeline, "r": flow_run_id},
        ).to_pylist()
    except Exception:
        return {}
    return {str(r["kpi"]): str(r["detail"] or "") for r in rows}


def kpi_rows(facts: RunFacts, ev: RunEvaluation) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    items = list(ev.kpis)
    for s in ev.slos:
        items.append(
            Kpi(
                f"slo.{s.slo.name}",
                s.value,
                "",
                s.status,
                s.message,
                "slo",
                s.slo.name,
                s.slo.kind,
                "",
                None,
                s.slo.threshold,
            )
        )
    if ev.budget is not None:
        items.append(ev.budget)
    rows: dict[str, dict[str, Any]] = {}
    for k in items:
        rows[k.kpi] = {
            "flow_run_id": facts.flow_run_id,
            "kpi": k.kpi,
            "pipeline": facts.pipeline,
            "category": k.category,
            "name": k.name,
            "step": k.step,
            "owner": k.owner,
            "value": _finite(k.value),
            "unit": k.unit,
            "baseline": k.baseline,
            "target": k.target,
            "status": k.status,
            "detail": k.detail[:1000],
            "source": k.source,
            "computed_at": now,
        }
    return list(rows.values())


def _finite(v: float | None) -> float | None:
    return None if v is None or v != v or v in (float("inf"), float("-inf")) else float(v)


def write_kpis(wh: Warehouse, facts: RunFacts, ev: RunEvaluation, chunk: int = 200) -> int:
    ref = TableRef(wh.meta_dataset, KPI_TABLE)
    wh.ensure_table(ref, KPI_SCHEMA)
    rows = kpi_rows(facts, ev)
    d = adapter_dialect(wh)
    for i in range(0, len(rows), chunk):
        sql, params = upsert_rows_sql(d, ref, KPI_SCHEMA, ("flow_run_id", "kpi"), rows[i : i + chunk])
        faults.checkpoint("during_cost_write")  # the KPI rows are the run's other bookkeeping write
        wh.execute(sql, params, kind="merge")
    return len(rows)


def read_kpis(wh: Warehouse, flow_run_id: str) -> list[dict[str, Any]]:
    ref = TableRef(wh.meta_dataset, KPI_TABLE)
    if wh.table_schema(ref) is None:
        return []
    sql = f"SELECT * FROM {wh.quote(ref)} WHERE flow_run_id = {wh.param('r')} ORDER BY kpi"
    return wh.query(sql, {"r": flow_run_id}).to_pylist()


def raise_on_breach(spec: PipelineSpec, ev: RunEvaluation) -> None:
    """Fail loudly: every breached SLO (severity fail) and a blown cost budget, with runbook links."""
    lines = [s.message for s in ev.breaches]
    if ev.budget is not None and ev.budget.status == "breach":
        msg = (
            f"run cost ${ev.budget.value:.6f} exceeds costs.budgetPerRunUsd ${ev.budget.target:g} — "
            f"Runbook: {spec.costs.runbook}"
        )
        if not lines:
            raise CostBudgetExceededError(msg)
        lines.append(msg)
    if lines:
        raise SloBreachedError(f"{len(lines)} objective(s) of pipeline {spec.name} breached:\n" + "\n".join(lines))
