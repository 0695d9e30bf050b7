"""The ingest run's summary (returned to ``nightly``) and its markdown / table renderings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOTALS = ("rows_read", "rows_quarantined", "rows_ingested", "inserted", "updated", "deleted")


def combine(
    pipeline: str, results: Sequence[dict[str, Any]], failures: Sequence[tuple[str, BaseException]] = ()
) -> dict[str, Any]:
    """Totals first (``nightly`` reads rows_read / rows_ingested / rows_quarantined), then per source."""
    out: dict[str, Any] = {"pipeline": pipeline}
    for key in TOTALS:
        out[key] = sum(int(r.get(key) or 0) for r in results)
    lags = [r["slot_lag_bytes"] for r in results if r.get("slot_lag_bytes") is not None]
    if lags:
        out["slot_lag_bytes"] = max(lags)
    by_rule: dict[str, int] = {}
    for r in results:
        for rule, k in (r.get("quarantined_by_rule") or {}).items():
            by_rule[rule] = by_rule.get(rule, 0) + int(k)
    out["quarantined_by_rule"] = by_rule
    out["warnings"] = [f"{r['source']}: {w}" for r in results for w in r.get("warnings", [])]
    out["failed"] = [f"{sid}: {type(exc).__name__}: {exc}" for sid, exc in failures]
    out["sources"] = {r["source"]: r for r in results}
    return out


def _position(stream: dict[str, Any]) -> str:
    before, after = stream.get("position_before") or "—", stream.get("position_after") or "—"
    return f"{before} → {after}"


def report_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for sid, res in summary.get("sources", {}).items():
        for name, s in (res.get("streams") or {}).items():
            rows.append(
                {
                    "source": sid,
                    "stream": name,
                    "target": s.get("target", ""),
                    "kind": s.get("kind", ""),
                    "rows_read": s.get("rows_read", 0),
                    "quarantined": s.get("rows_quarantined", 0),
                    "inserted": s.get("inserted", 0),
                    "updated": s.get("updated", 0),
                    "deleted": s.get("deleted", 0),
                    "position": _position(s),
                    "seconds": s.get("seconds", 0),
                    "slot_lag_bytes": res.get("slot_lag_bytes", ""),
                    "flags": "; ".join(s.get("flags", [])),
                }
            )
    return rows


def report_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# ingest · {summary['pipeline']}",
        "",
        f"**{summary['rows_read']}** rows read · **{summary['rows_ingested']}** changed "
        f"({summary['inserted']} inserted, {summary['updated']} updated, {summary['deleted']} deleted) · "
        f"**{summary['rows_quarantined']}** quarantined",
        "",
        "| source | stream | kind | read | quarantined | inserted | updated | deleted | watermark / LSN | s |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report_rows(summary):
        lines.append(
            f"| {r['source']} | {r['stream']} | {r['kind']} | {r['rows_read']} | {r['quarantined']} | "
            f"{r['inserted']} | {r['updated']} | {r['deleted']} | {r['position']} | {r['seconds']} |"
        )
    for sid, res in summary.get("sources", {}).items():
        if res.get("slot_lag_bytes") is not None:
            lines += ["", f"Replication slot lag of `{sid}`: {res['slot_lag_bytes']} bytes of WAL."]
    if summary.get("quarantined_by_rule"):
        lines += ["", "## Quarantined by rule", "", "| rule:column | rows |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(summary["quarantined_by_rule"].items())]
    if summary.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    if summary.get("failed"):
        lines += ["", "## Failed", ""] + [f"- {f}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"
