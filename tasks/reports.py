"""Report tasks: the finance cost report (CSV + HTML + markdown artifact) and the BigQuery reconciliation."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.settings import PREFECT_UI_URL

from blocks import load_warehouse
from opsloop import costs, reconcile
from opsloop.reports.costreport import build_report, summary_markdown, write_csv
from opsloop.reports.html import write_html
from opsloop.spec import load_spec
from tasks.common import TRANSIENT_RETRIES, run_labels


def default_output_dir() -> Path:
    """Where reports go unless told: ``$OPSLOOP_HOME/reports`` (the local stack's data dir)."""
    return Path(os.environ.get("OPSLOOP_HOME", ".opsloop")) / "reports"


@task(name="write_cost_report", **TRANSIENT_RETRIES)
def write_cost_report(
    spec_path: str,
    warehouse: str,
    start: datetime,
    end: datetime,
    label: str,
    output_dir: str | None = None,
    all_pipelines: bool = True,
) -> dict[str, Any]:
    """Read the ledger for ``[start, end)``, write CSV + HTML, publish the markdown/link artifacts."""
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "write_cost_report"))
    rows = costs.read_ledger(wh, start, end, None if all_pipelines else spec.name)
    ui = PREFECT_UI_URL.value()
    report = build_report(rows, start, end, label, spec.costs.budget_per_run_usd, ui, budget_pipeline=spec.name)
    out = Path(output_dir) if output_dir else default_output_dir()
    csv_path, runs_csv = write_csv(report, out)
    html_path = write_html(report, out)
    create_markdown_artifact(
        summary_markdown(report, str(html_path.resolve())),
        key="cost-report",
        description=f"cost report {label}",
    )
    create_link_artifact(
        link=html_path.resolve().as_uri(), link_text=f"cost report {label} (HTML)", key="cost-report-html"
    )
    return {
        "label": label,
        "rows": len(rows),
        "runs": len(report.runs),
        "total_usd": report.totals["total_usd"],
        "csv": str(csv_path),
        "runs_csv": str(runs_csv),
        "html": str(html_path),
        "over_budget": [{"run_id": r.run_id, "total_usd": r.total_usd, "url": r.url} for r in report.over_budget],
        "budget": report.budget,
        "runbook": spec.costs.runbook,
    }


@task(name="reconcile_run_costs", **TRANSIENT_RETRIES)
def reconcile_run_costs(spec_path: str, warehouse: str, start: datetime, end: datetime) -> dict[str, Any]:
    """Ledger vs ``INFORMATION_SCHEMA.JOBS`` per flow run (BigQuery mode; DuckDB has nothing to check)."""
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "reconcile_run_costs"))
    if wh.dialect != "bigquery":
        return {"mode": wh.dialect, "runs": 0, "message": f"{wh.dialect} warehouse: no BigQuery jobs to reconcile"}
    rows = [r for r in costs.read_ledger(wh, start, end, spec.name) if r.get("warehouse") == "bigquery"]
    run_ids = sorted({str(r["flow_run_id"]) for r in rows})
    history = reconcile.job_history(wh, start, end, run_ids) if run_ids else []
    result = reconcile.reconcile(rows, history)
    create_table_artifact(
        table=[r.as_row() for r in result],
        key="cost-reconciliation",
        description=f"cost ledger vs INFORMATION_SCHEMA.JOBS, {start:%Y-%m-%d} to {end:%Y-%m-%d}",
    )
    by_status: dict[str, int] = {}
    for r in result:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    return {"mode": "bigquery", "runs": len(result), "by_status": by_status, "rows": [r.as_row() for r in result]}
