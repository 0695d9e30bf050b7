"""Reconcile the cost ledger with BigQuery's ``INFORMATION_SCHEMA.JOBS`` by job label (BigQuery mode).

On DuckDB there are no BigQuery jobs: the flow completes saying so. Run it a few hours after the
runs (the job history lags) for a month or a date range; ``fail_on_mismatch`` turns a run whose
BigQuery figures differ from the ledger into a Failed state.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from prefect import flow

from opsloop.errors import TerminalError
from opsloop.reports.costreport import period_range
from tasks.reports import reconcile_run_costs


@flow(name="reconcile-costs", log_prints=True, description="Cost ledger vs INFORMATION_SCHEMA.JOBS by label.")
def reconcile_costs(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-bigquery/prod",
    month: str | None = None,
    start: date | None = None,
    end: date | None = None,
    fail_on_mismatch: bool = False,
) -> dict[str, Any]:
    lo, hi, label = period_range(month, start, end, datetime.now(UTC).date())
    res = reconcile_run_costs(spec_path, warehouse, lo, hi)
    print(f"reconcile {label}: {res.get('message') or res.get('by_status')}")
    bad = [r for r in res.get("rows", []) if r["status"] in ("ledger_low", "ledger_high")]
    if fail_on_mismatch and bad:
        raise TerminalError(
            f"{len(bad)} run(s) in {label} differ between the cost ledger and INFORMATION_SCHEMA.JOBS "
            f"(see the cost-reconciliation artifact). Runbook: docs/runbooks.md#cost-overrun"
        )
    return res


if __name__ == "__main__":
    reconcile_costs()
