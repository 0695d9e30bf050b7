"""Cost report: periods, aggregation against hand-computed sums, CSV totals = ledger totals, the HTML's
charts, the reconciliation SQL (parsed as BigQuery) and comparison, and ``opsloop costs``."""

from __future__ import annotations

import csv
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from sqlglot import exp

from opsloop import costs, reconcile
from opsloop.cli import main
from opsloop.errors import ConfigError
from opsloop.reports.costreport import build_report, month_range, period_range, write_csv
from opsloop.reports.html import render_html
from opsloop.reports.svg import money, nice_ticks
from opsloop.spec.ops import CostSpec
from opsloop.warehouse.base import JobStats
from opsloop.warehouse.duckdb import DuckDBAdapter

SPEC = CostSpec(api_usd_per_call={"salesforce": 0.001})
UI = "http://127.0.0.1:4200"


def row(root: str, stage: str, day: int, seconds: float, **kw: Any) -> dict[str, Any]:
    start = datetime(2026, 11, day, 2, 0, tzinfo=UTC)
    usage = costs.StageUsage(
        kw.pop("pipeline", "customer_ops_ai"),
        "nightly",
        f"{root}-{stage}",
        stage,
        start,
        start + timedelta(seconds=seconds),
        root_flow_run_id=root,
        **kw,
    )
    return costs.build_row(usage, SPEC)


@pytest.fixture
def ledger() -> list[dict[str, Any]]:
    big = [JobStats("merge", f"m{i}", bytes_processed=2 * 1024**4) for i in range(2)]  # 2 × 2 TiB
    return [
        row("a", "ingest", 1, 1000, rows_ingested=10_000),  # compute 1000 × 0.000022 = $0.022
        row("a", "sync", 1, 500, rows_pushed=200, api_calls={"salesforce": 50}),  # $0.011 + $0.05
        row("b", "ingest", 2, 100, warehouse="bigquery", jobs=big, rows_ingested=5000),  # $0.0022 + 4 TiB × $6.25
        row("b", "score", 2, 50, model_name="churn", model_version="3", rows_scored=5000),  # $0.0011
        row("c", "ingest", 3, 10, pipeline="other_pipe"),  # $0.00022
    ]


def test_periods() -> None:
    assert month_range("2026-11") == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    assert month_range("2026-12")[1] == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ConfigError, match="YYYY-MM"):
        month_range("2026-13")
    lo, hi, label = period_range(None, date(2026, 11, 3), date(2026, 11, 4), date(2026, 12, 1))
    assert (lo.day, hi.day, label) == (3, 5, "2026-11-03_2026-11-04")  # end date inclusive
    assert period_range(None, None, None, date(2026, 12, 1))[2] == "2026-11"  # default: previous month
    assert period_range(None, None, None, date(2027, 1, 15))[2] == "2026-12"
    with pytest.raises(ConfigError, match="not both"):
        period_range("2026-11", date(2026, 11, 1), None, date(2026, 12, 1))


def test_aggregation_against_hand_computed_sums(ledger: list[dict[str, Any]]) -> None:
    lo, hi = month_range("2026-11")
    rep = build_report(ledger, lo, hi, "2026-11", budget=1.0, ui_url=UI, budget_pipeline="customer_ops_ai")
    by_run = {r.run_id: r for r in rep.runs}
    assert by_run["a"].compute_usd == pytest.approx(0.033) and by_run["a"].api_usd == pytest.approx(0.05)
    assert by_run["a"].total_usd == pytest.approx(0.083) and by_run["a"].stages == 2
    assert by_run["b"].bq_usd == pytest.approx(25.0)  # 4 TiB × $6.25
    assert by_run["b"].total_usd == pytest.approx(25.0033)
    assert by_run["b"].model_version == "churn:3" and by_run["b"].url == f"{UI}/runs/flow-run/b"
    assert rep.totals["total_usd"] == pytest.approx(0.083 + 25.0033 + 0.00022)
    assert rep.unit["usd_per_1k_ingested"] == pytest.approx(rep.totals["total_usd"] / 15)  # 15k rows ingested
    assert rep.unit["usd_per_1k_pushed"] == pytest.approx(rep.totals["total_usd"] / 0.2)  # 200 pushed
    days = dict(rep.by_day)
    assert (
        len(days) == 30
        and days["2026-11-02"]["bq_usd"] == pytest.approx(25.0)
        and days["2026-11-30"]
        == {
            "bq_usd": 0.0,
            "compute_usd": 0.0,
            "api_usd": 0.0,
        }
    )
    assert dict(rep.by_pipeline)["other_pipe"] == pytest.approx(0.00022)
    assert dict(rep.by_model_version)["churn:3"] == pytest.approx(25.0033)
    assert [r.run_id for r in rep.top_runs] == ["b", "a", "c"]
    assert [r.run_id for r in rep.over_budget] == ["b"]


def test_csv_totals_equal_ledger(tmp_path: Path, ledger: list[dict[str, Any]]) -> None:
    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    costs.write_ledger(wh, ledger)
    lo, hi = month_range("2026-11")
    stored = costs.read_ledger(wh, lo, hi)
    rep = build_report(stored, lo, hi, "2026-11")
    ledger_csv, runs_csv = write_csv(rep, tmp_path / "out")
    with ledger_csv.open() as fh:
        lines = list(csv.DictReader(fh))
    with runs_csv.open() as fh:
        runs = list(csv.DictReader(fh))
    (ledger_total,) = wh.query("SELECT SUM(total_usd) FROM opsloop_meta.run_costs").to_pylist()[0].values()
    assert len(lines) == 5 and len(runs) == 3
    for col in ("total_usd", "bq_usd", "compute_usd", "api_usd"):
        (db,) = wh.query(f"SELECT SUM({col}) FROM opsloop_meta.run_costs").to_pylist()[0].values()
        assert sum(float(r[col]) for r in lines) == pytest.approx(db, abs=1e-12)
        assert sum(float(r[col]) for r in runs) == pytest.approx(db, abs=1e-9)
    assert sum(float(r["total_usd"]) for r in lines) == pytest.approx(ledger_total, abs=1e-12)
    assert {r["bq_bytes_billed"] for r in lines if r["stage"] == "ingest" and r["warehouse"] == "bigquery"} == {
        str(4 * 1024**4)
    }


def test_html_is_self_contained_with_charts(ledger: list[dict[str, Any]]) -> None:
    lo, hi = month_range("2026-11")
    html = render_html(build_report(ledger, lo, hi, "2026-11", budget=1.0, ui_url=UI))
    charts = re.findall(r"data-chart='([^']+)'", html)
    assert charts == ["cost-per-day", "cost-per-run", "cost-per-pipeline", "cost-per-model-version", "unit-costs"]
    assert html.count("class='bar'") >= 3 + 5  # day bars per split + run bars + pipelines …
    fetches = html.replace(f"href='{UI}/runs/flow-run/", "").replace("xmlns='http://www.w3.org/2000/svg'", "")
    assert "http://" not in fetches and "https://" not in fetches  # no network assets, only run links
    assert "<script" not in html and "src=" not in html
    assert f"{UI}/runs/flow-run/b" in html and "docs/runbooks.md#cost-overrun" in html


def test_money_and_ticks() -> None:
    assert money(0) == "$0" and money(25.0033) == "$25.00" and money(0.00022) == "$0.000220"
    assert nice_ticks(0.083) == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    assert nice_ticks(0) == [0.0, 1.0]


def test_reconcile_sql_is_bigquery() -> None:
    sql = reconcile.jobs_by_label_sql("opsloop-prod", "EU")
    tree = sqlglot.parse_one(sql, read="bigquery")
    assert isinstance(tree, exp.Select)
    table = tree.find(exp.Table)
    assert table is not None and table.name.upper().endswith("JOBS") and table.db == "region-eu"
    assert "`opsloop-prod`.`region-eu`.INFORMATION_SCHEMA.JOBS" in sql
    assert "@run_ids" in sql and "creation_time >= @start" in sql
    with pytest.raises(ConfigError, match="location"):
        reconcile.jobs_by_label_sql("opsloop-prod", "eu; DROP")


def test_reconcile_comparison() -> None:
    ledger = [
        {"flow_run_id": "r1", "warehouse": "bigquery", "bq_jobs": 3, "bq_bytes_billed": 30 * 2**20},
        {"flow_run_id": "r2", "warehouse": "bigquery", "bq_jobs": 2, "bq_bytes_billed": 20 * 2**20},
        {"flow_run_id": "r3", "warehouse": "bigquery", "bq_jobs": 1, "bq_bytes_billed": 10 * 2**20},
        {"flow_run_id": "dd", "warehouse": "duckdb", "bq_jobs": 0, "bq_bytes_billed": 0},
    ]
    history = [
        {"flow_run_id": "r1", "task": "load_x", "jobs": 3, "bytes_billed": 30 * 2**20},
        {"flow_run_id": "r1", "task": "record_stage_cost", "jobs": 2, "bytes_billed": 20 * 2**20},
        {"flow_run_id": "r2", "task": "score", "jobs": 4, "bytes_billed": 40 * 2**20},
        {"flow_run_id": "parent", "task": "read_run_costs", "jobs": 2, "bytes_billed": 20 * 2**20},
    ]
    got = {r.flow_run_id: r for r in reconcile.reconcile(ledger, history)}
    assert got["r1"].status == "ok" and got["r1"].overhead_jobs == 2
    assert got["r2"].status == "ledger_low" and got["r2"].bq_bytes_billed == 40 * 2**20
    assert got["r3"].status == "not_in_job_history"
    assert got["parent"].status == "overhead_only" and got["parent"].overhead_jobs == 2
    assert "dd" not in got


def test_cli_prints_the_same_numbers(
    tmp_path: Path, ledger: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    costs.write_ledger(wh, ledger)
    rc = main(
        [
            "costs",
            "--month",
            "2026-11",
            "--warehouse-path",
            str(tmp_path / "w.duckdb"),
            "--ui-url",
            UI,
            "--output-dir",
            str(tmp_path / "rep"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "$25.09" in out  # the total: 0.083 + 25.0033 + 0.00022 = 25.0865…
    assert "$25.00" in out and "2026-11-02" in out and "churn:3" in out and "other_pipe" in out
    assert (tmp_path / "rep" / "cost-report-2026-11.html").exists()
    assert main(["costs", "--month", "2026-11", "--warehouse-path", str(tmp_path / "missing.duckdb")]) == 2
    assert "no DuckDB warehouse" in capsys.readouterr().err
