"""The finance view of the cost ledger: a period's rows aggregated per day, run, pipeline and model
version, unit costs, the most expensive runs and the runs over budget; written as CSV."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from opsloop.costs import LEDGER_COLUMNS, per_1k
from opsloop.errors import ConfigError

SPLIT = ("bq_usd", "compute_usd", "api_usd")
SPLIT_NAMES = {"bq_usd": "BigQuery", "compute_usd": "compute", "api_usd": "API"}
RUN_COLUMNS = (
    "run_id",
    "pipeline",
    "flow",
    "deployment",
    "started_at",
    "ended_at",
    "stages",
    "status",
    "model_version",
    "bq_bytes_billed",
    "api_calls",
    "rows_ingested",
    "rows_scored",
    "rows_pushed",
    "bq_usd",
    "compute_usd",
    "api_usd",
    "total_usd",
    "url",
)


def month_range(month: str) -> tuple[datetime, datetime]:
    """``"2026-11"`` → [2026-11-01, 2026-12-01) in UTC."""
    m = re.fullmatch(r"(\d{4})-(\d{2})", month.strip())
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise ConfigError(f"month {month!r}: expected YYYY-MM, e.g. 2026-11")
    y, mo = int(m.group(1)), int(m.group(2))
    start = datetime(y, mo, 1, tzinfo=UTC)
    end = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=UTC)
    return start, end


def previous_month(today: date) -> str:
    first = today.replace(day=1) - timedelta(days=1)
    return f"{first.year:04d}-{first.month:02d}"


def period_range(
    month: str | None, start: date | None, end: date | None, today: date
) -> tuple[datetime, datetime, str]:
    """Month (default: the previous month) or an inclusive date range → [start, end) and a label."""
    if start or end:
        if month:
            raise ConfigError("give either month or start/end dates, not both")
        s = start or end
        e = end or start
        assert s is not None and e is not None
        if e < s:
            raise ConfigError(f"end date {e} is before start date {s}")
        lo = datetime.combine(s, datetime.min.time(), UTC)
        return lo, datetime.combine(e, datetime.min.time(), UTC) + timedelta(days=1), f"{s}_{e}"
    label = month or previous_month(today)
    lo, hi = month_range(label)
    return lo, hi, label


def run_url(ui_url: str | None, run_id: str) -> str:
    """The flow run's page in the Prefect UI (``{PREFECT_UI_URL}/runs/flow-run/<id>``)."""
    return f"{ui_url.rstrip('/')}/runs/flow-run/{run_id}" if ui_url else ""


@dataclass
class RunCost:
    run_id: str
    pipeline: str
    flow: str
    deployment: str
    started_at: datetime
    ended_at: datetime
    stages: int = 0
    status: str = "completed"
    model_version: str = ""
    bq_bytes_billed: int = 0
    api_calls: int = 0
    rows_ingested: int = 0
    rows_scored: int = 0
    rows_pushed: int = 0
    bq_usd: float = 0.0
    compute_usd: float = 0.0
    api_usd: float = 0.0
    total_usd: float = 0.0
    url: str = ""

    def as_row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in RUN_COLUMNS}


@dataclass
class CostReport:
    label: str
    start: datetime
    end: datetime
    rows: list[dict[str, Any]]
    runs: list[RunCost]
    by_day: list[tuple[str, dict[str, float]]]
    by_pipeline: list[tuple[str, float]]
    by_model_version: list[tuple[str, float]]
    totals: dict[str, float]
    unit: dict[str, float | None]
    budget: float | None = None
    over_budget: list[RunCost] = field(default_factory=list)

    @property
    def top_runs(self) -> list[RunCost]:
        return sorted(self.runs, key=lambda r: r.total_usd, reverse=True)[:10]


def _sum(rows: Sequence[Mapping[str, Any]], col: str) -> float:
    return sum(float(r.get(col) or 0) for r in rows)


def build_report(
    rows: Sequence[Mapping[str, Any]],
    start: datetime,
    end: datetime,
    label: str,
    budget: float | None = None,
    ui_url: str | None = None,
    budget_pipeline: str | None = None,
) -> CostReport:
    """Aggregate ledger rows (one per run and stage) of the period ``[start, end)``.

    ``budget`` is checked for the runs of ``budget_pipeline`` (all runs when None).
    """
    ledger = [dict(r) for r in rows]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ledger:
        groups[str(r.get("root_flow_run_id") or r["flow_run_id"])].append(r)
    runs: list[RunCost] = []
    for rid, rs in groups.items():
        head = next((r for r in rs if r["flow_run_id"] == rid), rs[0])
        versions = sorted({f"{r['model_name']}:{r['model_version']}" for r in rs if r.get("model_version")})
        run = RunCost(
            rid,
            str(head.get("pipeline") or ""),
            str(head.get("flow") or ""),
            str(head.get("deployment") or ""),
            min(r["started_at"] for r in rs),
            max(r["ended_at"] for r in rs),
            len(rs),
            "completed" if all(r.get("status") == "completed" for r in rs) else "failed",
            ", ".join(versions),
            int(_sum(rs, "bq_bytes_billed")),
            int(_sum(rs, "api_calls")),
            int(_sum(rs, "rows_ingested")),
            int(_sum(rs, "rows_scored")),
            int(_sum(rs, "rows_pushed")),
            _sum(rs, "bq_usd"),
            _sum(rs, "compute_usd"),
            _sum(rs, "api_usd"),
            _sum(rs, "total_usd"),
            run_url(ui_url, rid),
        )
        runs.append(run)
    runs.sort(key=lambda r: r.started_at)
    days: dict[str, dict[str, float]] = {}
    d = start.date()
    while d < end.date() or (d == end.date() and end.time() != datetime.min.time()):
        days[d.isoformat()] = dict.fromkeys(SPLIT, 0.0)
        d += timedelta(days=1)
    for r in ledger:
        day = days.setdefault(r["started_at"].astimezone(UTC).date().isoformat(), dict.fromkeys(SPLIT, 0.0))
        for c in SPLIT:
            day[c] += float(r.get(c) or 0)
    by_pipe: dict[str, float] = defaultdict(float)
    by_model: dict[str, float] = defaultdict(float)
    for run in runs:
        by_pipe[run.pipeline] += run.total_usd
        by_model[run.model_version or "(no model)"] += run.total_usd
    totals = {c: _sum(ledger, c) for c in (*SPLIT, "total_usd", "rows_ingested", "rows_scored", "rows_pushed")}
    totals["runs"] = float(len(runs))
    unit: dict[str, float | None] = {
        "usd_per_1k_ingested": per_1k(totals["total_usd"], int(totals["rows_ingested"])),
        "usd_per_1k_pushed": per_1k(totals["total_usd"], int(totals["rows_pushed"])),
        "usd_per_run": totals["total_usd"] / len(runs) if runs else None,
    }
    over = [r for r in runs if budget is not None and r.total_usd > budget and budget_pipeline in (None, r.pipeline)]
    return CostReport(
        label,
        start,
        end,
        ledger,
        runs,
        sorted(days.items()),
        sorted(by_pipe.items(), key=lambda kv: -kv[1]),
        sorted(by_model.items(), key=lambda kv: -kv[1]),
        totals,
        unit,
        budget,
        over,
    )


def _csv_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.astimezone(UTC).isoformat()
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else v


def write_csv(report: CostReport, out_dir: Path) -> tuple[Path, Path]:
    """``cost-report-<label>.csv`` (the ledger rows, one per run and stage) and ``…-runs.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = out_dir / f"cost-report-{report.label}.csv"
    runs_path = out_dir / f"cost-report-{report.label}-runs.csv"
    with ledger_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(LEDGER_COLUMNS)
        for r in report.rows:
            w.writerow([_csv_value(r.get(c)) for c in LEDGER_COLUMNS])
    with runs_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(RUN_COLUMNS)
        for run in report.runs:
            w.writerow([_csv_value(v) for v in run.as_row().values()])
    return ledger_path, runs_path


def summary_markdown(report: CostReport, html_path: str | None = None) -> str:
    """The short markdown artifact of a cost report run."""
    from opsloop.reports.svg import money

    t, u = report.totals, report.unit
    lines = [
        f"# Cost report {report.label}",
        "",
        f"{int(t['runs'])} run(s), total **{money(t['total_usd'])}** — BigQuery {money(t['bq_usd'])}, "
        f"compute {money(t['compute_usd'])}, API {money(t['api_usd'])}.",
        "",
        "| unit cost | value |",
        "|---|---|",
        *[f"| {k} | {'—' if v is None else money(v)} |" for k, v in u.items()],
        "",
        "| top runs | pipeline | started | total |",
        "|---|---|---|---|",
        *[
            f"| [{r.run_id[:8]}]({r.url or '#'}) | {r.pipeline} | {r.started_at:%Y-%m-%d %H:%M} "
            f"| {money(r.total_usd)} |"
            for r in report.top_runs[:5]
        ],
    ]
    if report.over_budget:
        lines += ["", f"**{len(report.over_budget)} run(s) over the budget of {money(report.budget or 0)}.**"]
    if html_path:
        lines += ["", f"Full report: `{html_path}`"]
    return "\n".join(lines)
