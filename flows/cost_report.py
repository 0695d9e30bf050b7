"""Finance cost report: CSV + a self-contained HTML report with charts for a month or a date range.

Monthly schedule (prefect.yaml, ``cost-report`` deployment): ``0 6 1 * *`` Europe/Berlin with no
month → the previous month. On demand: ``month="2026-11"`` or ``start``/``end`` dates (inclusive).
Ends ``Failed`` with the cost-overrun runbook link when a run of the spec's pipeline cost more than
``costs.budgetPerRunUsd``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from prefect import flow

from opsloop.kpis import CostBudgetExceededError
from opsloop.reports.costreport import period_range
from tasks.reports import write_cost_report


@flow(name="cost-report", log_prints=True, description="Monthly / on-demand finance report of the cost ledger.")
def cost_report(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    month: str | None = None,
    start: date | None = None,
    end: date | None = None,
    output_dir: str | None = None,
    all_pipelines: bool = True,
) -> dict[str, Any]:
    """Report ``month`` (YYYY-MM; default the previous month) or ``start``..``end`` (inclusive dates)."""
    lo, hi, label = period_range(month, start, end, datetime.now(UTC).date())
    res = write_cost_report(spec_path, warehouse, lo, hi, label, output_dir, all_pipelines)
    print(f"cost report {label}: {res['runs']} run(s), ${res['total_usd']:.6f} → {res['html']}")
    if res["over_budget"]:
        worst = max(res["over_budget"], key=lambda r: r["total_usd"])
        raise CostBudgetExceededError(
            f"{len(res['over_budget'])} run(s) in {label} cost more than costs.budgetPerRunUsd "
            f"${res['budget']:g}; the most expensive: {worst['run_id']} at ${worst['total_usd']:.4f} "
            f"({worst['url'] or 'see the report'}). Report: {res['html']}. Runbook: {res['runbook']}"
        )
    return res


if __name__ == "__main__":
    cost_report()
