"""The nightly run's outcome per stage, and the markdown / table an operator reads at the end.

Pure data and formatting (no Prefect here): the nightly flow fills one :class:`StageOutcome` per
stage from the subflow's final state and result, then renders them with :func:`summary_markdown`
and :func:`stage_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from opsloop.runbooks import Advice

Status = Literal["completed", "failed", "blocked", "skipped", "not_available"]
Scalar = str | int | float | bool | None

STATUS_ICON: dict[str, str] = {
    "completed": "✅",
    "failed": "❌",
    "blocked": "⛔",
    "skipped": "⏭️",
    "not_available": "·",
}

# headline figures: (label, stage, candidate metric keys — first present wins)
HEADLINE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rows read", "ingest", ("rows_read",)),
    ("rows ingested", "ingest", ("rows_ingested",)),
    ("rows quarantined", "ingest", ("rows_quarantined",)),
    ("model trained", "train", ("version", "model_version")),
    ("promotion", "train", ("decision",)),
    ("predictions", "score", ("rows_scored",)),
    ("drift", "score", ("drift.status",)),
    ("CRM pushes", "sync", ("rows_pushed",)),
    ("CRM rejects", "sync", ("crm_failed",)),
    ("CRM API calls", "sync", ("crm_api_calls",)),
    ("cost", "report", ("total_usd",)),
)


@dataclass
class StageOutcome:
    stage: str
    status: Status
    seconds: float = 0.0
    flow_run_id: str | None = None
    flow: str = ""
    metrics: dict[str, Scalar] = field(default_factory=dict)
    message: str = ""
    advice: Advice | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "skipped", "not_available")


def flatten(result: Any, prefix: str = "", depth: int = 2, limit: int = 40) -> dict[str, Scalar]:
    """Scalars of a stage result (dict / dataclass / pydantic model), nested keys joined by ``.``.

    Lists become their length (``n_<key>``); everything else non-scalar is left out.
    """
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    elif hasattr(result, "model_dump"):
        result = result.model_dump()
    out: dict[str, Scalar] = {}
    if not isinstance(result, Mapping):
        if isinstance(result, str | int | float | bool):
            out[prefix or "result"] = result
        return out
    for key, value in result.items():
        name = f"{prefix}{key}"
        if len(out) >= limit:
            break
        if isinstance(value, str | int | float | bool) or value is None:
            out[name] = value
        elif isinstance(value, list | tuple | set):
            out[f"n_{name}"] = len(value)
        elif depth > 1 and (isinstance(value, Mapping) or hasattr(value, "model_dump")):
            out.update(flatten(value, f"{name}.", depth - 1, limit - len(out)))
        elif hasattr(value, "isoformat"):
            out[name] = value.isoformat()
    return out


def pick(metrics: Mapping[str, Scalar], keys: Iterable[str]) -> Scalar:
    """The first of ``keys`` present in ``metrics``; also sums ``<prefix>.<key>`` over nested entries."""
    for key in keys:
        if key in metrics and metrics[key] is not None:
            return metrics[key]
        nested = [v for k, v in metrics.items() if k.endswith(f".{key}") and isinstance(v, int | float)]
        if nested and not any(isinstance(v, bool) for v in nested):
            return sum(nested)
    return None


def headline(outcomes: Sequence[StageOutcome]) -> list[tuple[str, str]]:
    by_stage = {o.stage: o for o in outcomes}
    out: list[tuple[str, str]] = []
    for label, stage, keys in HEADLINE:
        o = by_stage.get(stage)
        if o is None or o.status != "completed":
            continue
        value = pick(o.metrics, keys)
        if value is None:
            continue
        text = _fmt(value, usd=label == "cost")
        if label == "model trained" and o.metrics.get("model"):
            text = f"{o.metrics['model']} v{value}"
        out.append((label, text))
    return out


def _fmt(value: Scalar, usd: bool = False) -> str:
    if isinstance(value, float):
        return f"${value:.6f}" if usd else f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


_NOISE = frozenset({"pipeline", "run_id", "batch", "flow_run_id"})


def _details(o: StageOutcome, n: int = 6) -> str:
    if o.status in ("failed", "blocked") and o.message:
        first = o.message.strip().splitlines()[0]
        return first[:200]
    if o.status in ("skipped", "not_available"):
        return o.message
    shown = [f"{k}={_fmt(v)}" for k, v in o.metrics.items() if v is not None and k not in _NOISE][:n]
    return ", ".join(shown)


def stage_rows(outcomes: Sequence[StageOutcome]) -> list[dict[str, Any]]:
    """One row per stage for the Prefect table artifact."""
    return [
        {
            "stage": o.stage,
            "status": o.status,
            "seconds": round(o.seconds, 2),
            "flow": o.flow,
            "flow_run_id": o.flow_run_id or "",
            "details": _details(o, 12),
            "runbook": o.advice.link if o.advice else "",
        }
        for o in outcomes
    ]


def final_verdict(outcomes: Sequence[StageOutcome]) -> tuple[Status, StageOutcome | None]:
    """``completed`` unless a stage failed or was blocked (the first such stage is returned)."""
    for o in outcomes:
        if o.status in ("failed", "blocked"):
            return o.status, o
    return "completed", None


def summary_markdown(
    pipeline: str,
    outcomes: Sequence[StageOutcome],
    parameters: Mapping[str, Any],
    cost_line: str = "",
    ui_url: str = "",
) -> str:
    verdict, culprit = final_verdict(outcomes)
    title = {"completed": "completed", "failed": "FAILED", "blocked": "BLOCKED"}.get(verdict, verdict)
    lines = [f"# nightly · {pipeline} · {title}", ""]
    if culprit is not None:
        lines += [f"**{culprit.stage} {culprit.status}** — the chain stopped here; later stages did not run.", ""]
        if culprit.advice:
            lines += [
                f"- error: `{(culprit.message.strip().splitlines() or [''])[0][:300]}`",
                f"- what to do: {culprit.advice.action}",
                f"- runbook: [{culprit.advice.title}]({culprit.advice.link})",
                f"- then rerun: `{culprit.advice.rerun}`",
                "",
            ]
    heads = headline(outcomes)
    if heads:
        lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in heads], ""]
    warns = [f"- {o.stage}: {w}" for o in outcomes for w in o.warnings]
    if warns:
        lines += ["**Warnings**", "", *warns, ""]
    if cost_line:
        lines += [f"**Cost:** {cost_line}", ""]
    lines += ["| stage | status | seconds | details |", "|---|---|---:|---|"]
    for o in outcomes:
        icon = STATUS_ICON.get(o.status, "")
        lines.append(f"| {o.stage} | {icon} {o.status} | {o.seconds:.1f} | {_details(o).replace('|', '/')} |")
    shown = {k: v for k, v in parameters.items() if v not in (None, [], "")}
    lines += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in shown.items())]
    if ui_url:
        lines.append(f"Run page: {ui_url}")
    return "\n".join(lines)
