"""The self-contained HTML cost report: inline CSS and SVG charts, no scripts, no network assets."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from pathlib import Path

from opsloop.reports.costreport import SPLIT, SPLIT_NAMES, CostReport, RunCost
from opsloop.reports.svg import hbars, money, stacked_bars

CSS = """
body { font-family: 'DejaVu Sans', Arial, sans-serif; margin: 24px; color: #212121; background: #fafafa; }
h1 { margin-bottom: 4px; } .sub { color: #616161; margin-top: 0; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.card { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: 10px 16px; min-width: 150px; }
.card .v { font-size: 20px; font-weight: bold; } .card .k { color: #757575; font-size: 12px; }
.chart { display: block; margin: 12px 0 24px; background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; }
table { border-collapse: collapse; background: #fff; margin: 8px 0 24px; font-size: 13px; }
th, td { border: 1px solid #e0e0e0; padding: 4px 8px; text-align: right; }
th { background: #f5f5f5; } td.l, th.l { text-align: left; }
.alert { background: #ffebee; border: 1px solid #e57373; padding: 10px 16px; border-radius: 6px; }
.note { color: #616161; font-size: 12px; max-width: 900px; }
"""


def _card(key: str, value: str) -> str:
    return f"<div class='card'><div class='k'>{escape(key)}</div><div class='v'>{escape(value)}</div></div>"


def _run_link(r: RunCost) -> str:
    text = f"<span title='{escape(r.run_id)}'>{escape(r.run_id[:8])}</span>"
    return f"<a class='run' href='{escape(r.url)}'>{text}</a>" if r.url else text


def _runs_table(runs: list[RunCost], caption: str) -> str:
    head = (
        "<tr><th class='l'>run</th><th class='l'>pipeline</th><th class='l'>flow</th><th class='l'>started (UTC)</th>"
        "<th>stages</th><th class='l'>status</th><th class='l'>model</th><th>BigQuery</th><th>compute</th>"
        "<th>API</th><th>total</th><th>rows in</th><th>pushed</th></tr>"
    )
    body = [
        f"<tr><td class='l'>{_run_link(r)}</td><td class='l'>{escape(r.pipeline)}</td>"
        f"<td class='l'>{escape(r.flow)}</td>"
        f"<td class='l'>{r.started_at.astimezone(UTC):%Y-%m-%d %H:%M}</td><td>{r.stages}</td>"
        f"<td class='l'>{escape(r.status)}</td><td class='l'>{escape(r.model_version or '—')}</td>"
        f"<td>{money(r.bq_usd)}</td><td>{money(r.compute_usd)}</td><td>{money(r.api_usd)}</td>"
        f"<td><b>{money(r.total_usd)}</b></td><td>{r.rows_ingested:,}</td><td>{r.rows_pushed:,}</td></tr>"
        for r in runs
    ]
    return f"<table data-table='{escape(caption)}'><caption>{escape(caption)}</caption>{head}{''.join(body)}</table>"


def render_html(report: CostReport, generated: datetime | None = None) -> str:
    t, u = report.totals, report.unit
    split = {SPLIT_NAMES[c]: c for c in SPLIT}
    day_labels = [d for d, _ in report.by_day]
    per_day = {name: [v[c] for _, v in report.by_day] for name, c in split.items()}
    runs = report.runs
    run_labels = [f"{r.started_at:%m-%d %H:%M} {r.run_id[:6]}" for r in runs]
    per_run = {name: [float(getattr(r, c)) for r in runs] for name, c in split.items()}
    unit_items = [(k.replace("_", " "), v) for k, v in u.items() if v is not None]
    gen = (generated or datetime.now(UTC)).astimezone(UTC)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>opsloop cost report {escape(report.label)}</title><style>{CSS}</style></head><body>",
        f"<h1>Cost report {escape(report.label)}</h1>",
        f"<p class='sub'>{report.start:%Y-%m-%d} to {report.end:%Y-%m-%d} (UTC, end exclusive) · "
        f"generated {gen:%Y-%m-%d %H:%M} UTC from the run_costs ledger</p>",
    ]
    if report.over_budget:
        parts.append(
            f"<div class='alert' data-alert='budget'><b>{len(report.over_budget)} run(s) cost more than the "
            f"budget of {money(report.budget or 0)} per run</b> — see docs/runbooks.md#cost-overrun.<br>"
            + ", ".join(f"{_run_link(r)} ({money(r.total_usd)})" for r in report.over_budget)
            + "</div>"
        )
    parts.append("<div class='cards'>")
    parts += [
        _card("total", money(t["total_usd"])),
        _card("BigQuery", money(t["bq_usd"])),
        _card("compute", money(t["compute_usd"])),
        _card("API", money(t["api_usd"])),
        _card("runs", f"{int(t['runs'])}"),
        _card("$ per 1k rows ingested", "—" if u["usd_per_1k_ingested"] is None else money(u["usd_per_1k_ingested"])),
        _card("$ per 1k predictions pushed", "—" if u["usd_per_1k_pushed"] is None else money(u["usd_per_1k_pushed"])),
        "</div>",
        stacked_bars("cost-per-day", "Cost per day (BigQuery / compute / API)", day_labels, per_day),
        stacked_bars("cost-per-run", "Cost per run (BigQuery / compute / API)", run_labels, per_run),
        hbars("cost-per-pipeline", "Cost per pipeline", report.by_pipeline),
        hbars("cost-per-model-version", "Cost per model version (runs that scored with it)", report.by_model_version),
        hbars("unit-costs", "Unit costs", unit_items),
        "<h2>Top 10 most expensive runs</h2>",
        _runs_table(report.top_runs, "top-runs"),
        "<h2>All runs</h2>",
        _runs_table(runs, "all-runs"),
        "<p class='note'>BigQuery: on-demand list price per TiB billed, each query job billed at least 10 MiB and "
        "rounded up to whole MiB, load jobs free, no free tier subtracted; reconcile with INFORMATION_SCHEMA.JOBS "
        "by the flow_run_id job label (flow reconcile-costs). Compute: wall seconds × the work pool's vCPU and GiB "
        "× Cloud Run job prices. API: CRM calls × the chargeback price in the spec. Prices come from the "
        "pipeline spec's <code>costs</code> section.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_html(report: CostReport, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cost-report-{report.label}.html"
    path.write_text(render_html(report), encoding="utf-8")
    return path
