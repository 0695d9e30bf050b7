"""The HTML cost report in headless Chromium (Debian's ``chromium`` via Playwright's Python package):
every chart is visible, has drawn bars, and its screenshot is not blank. Screenshots: test-artifacts/."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opsloop import costs
from opsloop.reports.costreport import build_report, month_range
from opsloop.reports.html import write_html
from opsloop.spec.ops import CostSpec
from opsloop.warehouse.base import JobStats
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.support.browser import SHOTS, chromium

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
CHARTS = ("cost-per-day", "cost-per-run", "cost-per-pipeline", "cost-per-model-version", "unit-costs")


def _month_of_runs(wh: DuckDBAdapter) -> None:
    spec = CostSpec(api_usd_per_call={"salesforce": 0.00001, "hubspot": 0.000005})
    rows = []
    for day in range(1, 29):
        t0 = datetime(2026, 11, day, 1, 0, tzinfo=UTC)
        root = f"0000{day:04d}-1111-4222-8333-444455556666"
        for i, stage in enumerate(("ingest", "score", "sync")):
            jobs = [JobStats("merge", f"b{day}{i}{k}", bytes_processed=(day % 5 + 1) * 3 * 10**9) for k in range(2)]
            usage = costs.StageUsage(
                "customer_ops_ai" if day % 4 else "partner_feed",
                stage,
                root if i == 0 else f"{root[:-1]}{i}",
                stage,
                t0,
                t0 + timedelta(seconds=60 + 40 * ((day * (i + 1)) % 9)),
                root_flow_run_id=root,
                warehouse="bigquery",
                jobs=jobs,
                rows_ingested=40_000 if stage == "ingest" else 0,
                rows_pushed=1500 + day * 10 if stage == "sync" else 0,
                api_calls={"salesforce": 40, "hubspot": 25} if stage == "sync" else {},
                model_name="customer_churn" if stage == "score" else "",
                model_version=str(1 + day // 10) if stage == "score" else "",
            )
            rows.append(costs.build_row(usage, spec))
    costs.write_ledger(wh, rows)


def test_cost_report_renders_with_visible_charts(tmp_path: Path) -> None:
    from PIL import Image

    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    _month_of_runs(wh)
    lo, hi = month_range("2026-11")
    report = build_report(costs.read_ledger(wh, lo, hi), lo, hi, "2026-11", budget=0.2, ui_url="http://127.0.0.1:4200")
    html = write_html(report, tmp_path / "report")
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.route(
            "**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_()
        )
        page.goto(html.resolve().as_uri())
        page.screenshot(path=str(SHOTS / "cost-report-full.png"), full_page=True)
        for chart in CHARTS:
            el = page.locator(f"svg[data-chart='{chart}']")
            assert el.is_visible(), chart
            box = el.bounding_box()
            assert box is not None and box["width"] > 400 and box["height"] > 100, (chart, box)
            bars = el.locator("rect.bar")
            assert bars.count() > 0, chart
            sizes = [bars.nth(i).bounding_box() for i in range(min(bars.count(), 20))]
            assert all(b is not None and b["width"] > 0 and b["height"] > 0 for b in sizes), chart
            png = el.screenshot(path=str(SHOTS / f"cost-report-{chart}.png"))
            img = Image.open(io.BytesIO(png)).convert("RGB")
            colored = sum(1 for px in img.getdata() if max(px) - min(px) > 60)  # saturated bar pixels
            assert colored > 0.01 * img.width * img.height, (chart, colored)
        day_bars = page.locator("svg[data-chart='cost-per-day'] rect.bar")
        assert {day_bars.nth(i).get_attribute("data-series") for i in range(day_bars.count())} == {
            "BigQuery",
            "compute",
            "API",
        }
        links = page.locator("table[data-table='top-runs'] a.run")
        assert links.count() == 10
        assert links.first.get_attribute("href").startswith("http://127.0.0.1:4200/runs/flow-run/")
        assert page.locator("[data-alert='budget']").is_visible()
