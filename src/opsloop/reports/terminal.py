"""``opsloop costs``: the cost report's numbers as rich tables in the terminal (no Prefect needed)."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from opsloop import costs
from opsloop.errors import ConfigError
from opsloop.reports.costreport import CostReport, build_report, period_range, write_csv
from opsloop.reports.html import write_html
from opsloop.reports.svg import money
from opsloop.warehouse.base import Warehouse


def open_warehouse(
    warehouse_path: str | None, bigquery_project: str | None, location: str, meta_dataset: str
) -> Warehouse:
    """A DuckDB file (default ``$OPSLOOP_HOME/warehouse.duckdb``) or BigQuery with application-default
    credentials — the CLI takes a path or a project directly, never a Prefect block."""
    if bigquery_project:
        from google.cloud import bigquery

        from opsloop.warehouse.bigquery import BigQueryAdapter

        client = bigquery.Client(project=bigquery_project, location=location)
        return BigQueryAdapter(client, project=bigquery_project, location=location, meta_dataset=meta_dataset)
    from opsloop.warehouse.duckdb import DuckDBAdapter

    path = Path(warehouse_path or Path(os.environ.get("OPSLOOP_HOME", ".opsloop")) / "warehouse.duckdb")
    if not path.exists():
        raise ConfigError(f"no DuckDB warehouse at {path} (pass --warehouse-path or run `make demo` first)")
    return DuckDBAdapter(path, meta_dataset=meta_dataset)


def _fmt(v: float | None) -> str:
    return "—" if v is None else money(v)


def render(report: CostReport, console: Console, all_runs: bool = False) -> None:
    t = report.totals
    head = Table(title=f"opsloop costs {report.label} ({report.start:%Y-%m-%d} – {report.end:%Y-%m-%d}, UTC)")
    for col in ("runs", "total", "BigQuery", "compute", "API", "$/1k ingested", "$/1k pushed", "$/run"):
        head.add_column(col, justify="right")
    head.add_row(
        f"{int(t['runs'])}",
        money(t["total_usd"]),
        money(t["bq_usd"]),
        money(t["compute_usd"]),
        money(t["api_usd"]),
        _fmt(report.unit["usd_per_1k_ingested"]),
        _fmt(report.unit["usd_per_1k_pushed"]),
        _fmt(report.unit["usd_per_run"]),
    )
    console.print(head)
    days = Table(title="cost per day")
    for col in ("day", "BigQuery", "compute", "API", "total"):
        days.add_column(col, justify="right")
    for day, v in report.by_day:
        total = sum(v.values())
        if total:
            days.add_row(day, money(v["bq_usd"]), money(v["compute_usd"]), money(v["api_usd"]), money(total))
    console.print(days)
    for title, items in (
        ("cost per pipeline", report.by_pipeline),
        ("cost per model version", report.by_model_version),
    ):
        tab = Table(title=title)
        tab.add_column(title.split(" per ")[1])
        tab.add_column("total", justify="right")
        for name, amount in items:
            tab.add_row(name, money(amount))
        console.print(tab)
    runs = report.runs if all_runs else report.top_runs
    tab = Table(title="all runs" if all_runs else "top 10 most expensive runs")
    for col in ("run", "pipeline", "started (UTC)", "status", "BigQuery", "compute", "API", "total", "link"):
        tab.add_column(col, justify="right" if col in ("BigQuery", "compute", "API", "total") else "left")
    for r in runs:
        over = report.budget is not None and r in report.over_budget
        tab.add_row(
            r.run_id[:8],
            r.pipeline,
            f"{r.started_at:%Y-%m-%d %H:%M}",
            r.status,
            money(r.bq_usd),
            money(r.compute_usd),
            money(r.api_usd),
            f"[bold red]{money(r.total_usd)}[/]" if over else money(r.total_usd),
            r.url,
        )
    console.print(tab)
    if report.over_budget:
        console.print(
            f"[bold red]{len(report.over_budget)} run(s) over the budget of {money(report.budget or 0)} per run[/] "
            "— docs/runbooks.md#cost-overrun"
        )


def costs_command(args: Any, console: Console | None = None) -> int:
    """The ``opsloop costs`` subcommand (see :func:`opsloop.cli.main`)."""
    lo, hi, label = period_range(args.month, args.start, args.end, datetime.now(UTC).date())
    wh = open_warehouse(args.warehouse_path, args.bigquery_project, args.location, args.meta_dataset)
    rows = costs.read_ledger(wh, lo, hi, args.pipeline)
    budget = None
    if args.spec:
        from opsloop.spec import load_spec

        budget = load_spec(args.spec).costs.budget_per_run_usd
    report = build_report(rows, lo, hi, label, budget, args.ui_url or ui_url_from_env())
    render(report, console or Console(), args.all_runs)
    if args.output_dir:
        out = Path(args.output_dir)
        paths = [*write_csv(report, out), write_html(report, out)]
        (console or Console()).print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def ui_url_from_env() -> str | None:
    """``PREFECT_UI_URL``, else the UI next to ``PREFECT_API_URL`` (local server: same host, no /api)."""
    ui = os.environ.get("PREFECT_UI_URL")
    api = os.environ.get("PREFECT_API_URL", "")
    if ui:
        return ui
    return (
        api.removesuffix("/").removesuffix("/api") if api.startswith("http://127.0.0.1") or "localhost" in api else None
    )


def parse_date(value: str) -> date:
    return date.fromisoformat(value)
