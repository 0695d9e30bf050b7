"""KPI/SLO task: evaluate a run at its end, store the ``kpis`` rows, fail loudly on a breached SLO."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

from blocks import load_warehouse
from opsloop import kpis
from opsloop.spec import load_spec
from tasks.common import TRANSIENT_RETRIES, run_labels
from tasks.costs import current_run_info

log = logging.getLogger("opsloop.kpis")


def task_state_counts(root_flow_run_id: str, depth: int = 3) -> tuple[int, int] | None:
    """(failed task runs, retries) over a run and its subflows, from the Prefect API; None if unknown."""
    try:
        root = UUID(root_flow_run_id)
    except ValueError:
        return None
    with get_client(sync_client=True) as client:
        ids, frontier = [root], [root]
        for _ in range(depth):
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [c.id for c in children if c.id not in ids]
            if not frontier:
                break
            ids += frontier
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    failed = sum(1 for t in runs if t.state is not None and t.state.is_failed())
    retries = sum(max(int(t.run_count or 0) - 1, 0) for t in runs)
    return failed, retries


@task(name="evaluate_run_kpis", **TRANSIENT_RETRIES)
def evaluate_run_kpis(
    spec_path: str,
    warehouse: str,
    flow_run_id: str | None = None,
    metrics: Mapping[str, float | None] | None = None,
    fail_on_breach: bool = True,
) -> dict[str, Any]:
    """KPIs of the run ``flow_run_id`` (default: the current root run, i.e. the nightly run).

    Writes ``<meta>.kpis``, publishes the KPI map (actual vs baseline vs target per owner) and the
    SLO results as table artifacts, and raises :class:`~opsloop.kpis.SloBreachedError` (→ Failed
    state, runbook links in the message) when an SLO of severity ``fail`` or the run's cost budget
    is breached. ``metrics``: built-in values this run knows, e.g. ``{"model.auc": 0.84}``.
    """
    spec = load_spec(spec_path)
    root = flow_run_id or current_run_info().root_flow_run_id
    counts = None
    try:
        counts = task_state_counts(root)
    except Exception as exc:  # the API is optional for KPIs: say so in the row instead
        log.warning("task states of run %s unavailable: %s", root, exc)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "evaluate_run_kpis"))
    facts = kpis.RunFacts(
        spec.name,
        root,
        failed_tasks=counts[0] if counts else None,
        task_retries=counts[1] if counts else None,
        metrics=dict(metrics or {}),
    )
    ev = kpis.evaluate_run(wh, spec, facts)
    publish_kpi_artifacts(spec.name, root, ev)
    summary = {
        "kpis": len(ev.kpis),
        "missing": sorted(k.kpi for k in ev.kpis if k.status == "missing"),
        "slos": {s.slo.name: s.status for s in ev.slos},
        "budget": None if ev.budget is None else ev.budget.status,
    }
    log.info("KPIs of run %s: %s", root, summary)
    if fail_on_breach:
        kpis.raise_on_breach(spec, ev)
    return summary


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.6g}"


def publish_kpi_artifacts(pipeline: str, root: str, ev: kpis.RunEvaluation) -> None:
    mapped = [k for k in ev.kpis if k.kpi.startswith("kpi.")]
    create_table_artifact(
        key="run-kpi-map",
        description=f"KPI map of {pipeline}, run {root}: actual vs baseline vs target per owner",
        table=[
            {
                "kpi": k.name,
                "step": k.step,
                "owner": k.owner,
                "actual": _num(k.value),
                "baseline": _num(k.baseline),
                "target": _num(k.target),
                "status": k.status,
                "detail": k.detail,
            }
            for k in mapped
        ],
    )
    lines = [f"# KPIs and SLOs · {pipeline}", "", f"run `{root}` — {len(ev.kpis)} KPI values", ""]
    lines += ["| SLO | kind | value | threshold | status | runbook |", "|---|---|---|---|---|---|"]
    for s in ev.slos:
        lines.append(
            f"| {s.slo.name} | {s.slo.kind} {s.slo.stage or ''} | {_num(s.value)} | {s.slo.threshold:g} | "
            f"{s.status} | {s.slo.runbook_link} |"
        )
    if ev.budget is not None:
        lines.append(
            f"| cost budget | per run | {_num(ev.budget.value)} | {_num(ev.budget.target)} | {ev.budget.status} | "
            "docs/runbooks.md#cost-overrun |"
        )
    gaps = [k for k in ev.kpis if k.status == "missing"]
    if gaps:
        lines += ["", "Not available this run:", *[f"- `{k.kpi}`: {k.detail}" for k in gaps[:40]]]
    create_markdown_artifact("\n".join(lines), key="run-slos", description=f"SLOs of {pipeline}, run {root}")
