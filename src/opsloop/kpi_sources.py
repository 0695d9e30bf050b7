"""Built-in KPI collectors: read what the stages wrote (ledger, quarantine, predictions, drift,
sync log) and turn it into KPI values. A table another stage has not written yet is not an error:
its KPIs are reported with status ``missing`` and a detail naming what was looked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import TableRef, TableSchema, Warehouse
from opsloop.warehouse.merge import Dialect


@dataclass
class Kpi:
    """One KPI value of one run. ``kpi`` is ``<category>.<metric>[.<detail>]``."""

    kpi: str
    value: float | None
    unit: str = ""
    status: str = "ok"
    detail: str = ""
    source: str = "builtin"
    name: str = ""
    step: str = ""
    owner: str = ""
    baseline: float | None = None
    target: float | None = None

    @property
    def category(self) -> str:
        return self.kpi.split(".", 1)[0]


def missing(kpi: str, detail: str, unit: str = "") -> Kpi:
    return Kpi(kpi, None, unit, "missing", detail)


def p95(values: Sequence[float]) -> float | None:
    """Nearest-rank 95th percentile (the value 95 % of observations are at or below)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return vals[max(math.ceil(0.95 * len(vals)) - 1, 0)]


def find_table(wh: Warehouse, candidates: Iterable[TableRef]) -> tuple[TableRef, TableSchema] | None:
    for ref in candidates:
        schema = wh.table_schema(ref)
        if schema is not None:
            return ref, schema
    return None


def _names(refs: Iterable[TableRef]) -> str:
    return " or ".join(str(r) for r in refs)


def run_filter(wh: Warehouse, schema: TableSchema, run_ids: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
    """``run_id IN (...)`` on the first run-id column the table has, or None if it has none."""
    col = next((c for c in ("run_id", "flow_run_id", "sync_run_id") if schema.column(c)), None)
    if col is None:
        return None
    params = {f"run{i}": r for i, r in enumerate(run_ids)}
    return f"{wh.quote(col)} IN ({', '.join(wh.param(p) for p in params)})", params


def _scalar(wh: Warehouse, sql: str, params: Mapping[str, Any] | None = None) -> float | None:
    t = wh.query(sql, params)
    if t.num_rows == 0 or t.num_columns == 0:
        return None
    v = t.column(0)[0].as_py()
    return None if v is None else float(v)


# -- service -------------------------------------------------------------------------------------------
def service_kpis(run_rows: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]], window: int) -> list[Kpi]:
    out: list[Kpi] = []
    if not run_rows:
        return [missing("service.duration_seconds", "no ledger rows for this run (no stage recorded its cost)", "s")]
    start = min(r["started_at"] for r in run_rows)
    end = max(r["ended_at"] for r in run_rows)
    out.append(Kpi("service.duration_seconds", (end - start).total_seconds(), "s"))
    for r in run_rows:
        out.append(Kpi(f"service.stage_seconds.{r['stage']}", float(r["wall_seconds"] or 0), "s"))
    for stage in sorted({r["stage"] for r in run_rows}):
        recent = [float(h["wall_seconds"] or 0) for h in history if h["stage"] == stage][-window:]
        out.append(Kpi(f"service.p95_stage_seconds.{stage}", p95(recent), "s", detail=f"last {len(recent)} run(s)"))
    out.append(Kpi("service.failed_stages", float(sum(1 for r in run_rows if r["status"] != "completed"))))
    return out


def task_kpis(failed_tasks: int | None, retries: int | None) -> list[Kpi]:
    if failed_tasks is None:
        return [missing("service.failed_tasks", "task states not available (not run inside Prefect)")]
    return [Kpi("service.failed_tasks", float(failed_tasks)), Kpi("service.task_retries", float(retries or 0))]


# -- data ------------------------------------------------------------------------------------------------
def _wh_destinations(spec: PipelineSpec) -> list[tuple[TableRef, str | None]]:
    return [(TableRef(str(d.dataset), str(d.table)), d.order_by) for d in spec.destinations if d.type == "warehouse"]


def data_kpis(
    wh: Warehouse, spec: PipelineSpec, run_rows: Sequence[Mapping[str, Any]], run_ids: Sequence[str], now: datetime
) -> list[Kpi]:
    ingested = sum(int(r.get("rows_ingested") or 0) for r in run_rows)
    out = [Kpi("data.rows_ingested", float(ingested), "rows")]
    for ref, order_by in _wh_destinations(spec):
        schema = wh.table_schema(ref)
        if schema is None:
            out.append(missing(f"data.missing_rate.{ref.table}", f"table {ref} does not exist yet (ingest not run)"))
            continue
        out.append(
            Kpi(
                f"data.columns.{ref.table}",
                float(len(schema.columns)),
                "columns",
                detail=column_fingerprint(schema),
                source="schema",
            )
        )
        cols = [c.name for c in schema.columns if not c.name.startswith("_")]
        counts = ", ".join(f"COUNT({wh.quote(c)}) AS {wh.quote('c_' + c)}" for c in cols)
        row = wh.query(f"SELECT COUNT(*) AS n, {counts} FROM {wh.quote(ref)}").to_pylist()[0]
        n = int(row["n"] or 0)
        out.append(Kpi(f"data.table_rows.{ref.table}", float(n), "rows"))
        for c in cols:
            rate = (1 - int(row["c_" + c] or 0) / n) if n else None
            out.append(Kpi(f"data.missing_rate.{ref.table}.{c}", rate, "share", detail="" if n else "empty table"))
        if order_by and schema.column(order_by):
            newest = wh.query(f"SELECT MAX({wh.quote(order_by)}) AS m FROM {wh.quote(ref)}").column(0)[0].as_py()
            age = None if newest is None else (now - _aware(newest)).total_seconds() / 60
            out.append(Kpi(f"data.freshness_minutes.{ref.table}", age, "min", detail=f"now − max({order_by})"))
    out.append(_quarantine_rate(wh, spec, run_ids, ingested))
    return out


def _aware(ts: Any) -> datetime:
    if isinstance(ts, datetime):
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
    return datetime.combine(ts, datetime.min.time(), UTC)


def _datasets(spec: PipelineSpec) -> list[str]:
    seen: list[str] = []
    for ref, _ in _wh_destinations(spec):
        if ref.dataset not in seen:
            seen.append(ref.dataset)
    return seen or [spec.scoring.dataset]


def _quarantine_rate(wh: Warehouse, spec: PipelineSpec, run_ids: Sequence[str], ingested: int) -> Kpi:
    """Quarantined / read rows of this run: ``<meta>._ingest_runs`` (ingest's per-stream counts), else
    ``<meta>._quarantine`` rows of this run against the rows the ledger says were ingested."""
    runs = TableRef(wh.meta_dataset, "_ingest_runs")
    schema = wh.table_schema(runs)
    flt = run_filter(wh, schema, run_ids) if schema is not None else None
    if schema is not None and flt is not None and schema.column("rows_quarantined") and schema.column("rows_read"):
        row = wh.query(
            f"SELECT SUM(rows_quarantined) AS q, SUM(rows_read) AS n FROM {wh.quote(runs)} WHERE {flt[0]}", flt[1]
        ).to_pylist()[0]
        if row["n"]:
            q, n = int(row["q"] or 0), int(row["n"])
            return Kpi("data.quarantine_rate", q / n, "share", detail=f"{q} of {n} rows read ({runs})")
    refs = [TableRef(wh.meta_dataset, "_quarantine")] + [TableRef(ds, "_quarantine") for ds in _datasets(spec)]
    found = find_table(wh, refs)
    if found is None:
        return missing("data.quarantine_rate", f"no {runs} or quarantine table ({_names(refs)}) yet", "share")
    ref, schema = found
    flt = run_filter(wh, schema, run_ids)
    if flt is None:
        return missing("data.quarantine_rate", f"{ref} has no run_id column to select this run's rows", "share")
    bad = _scalar(wh, f"SELECT COUNT(*) FROM {wh.quote(ref)} WHERE {flt[0]}", flt[1]) or 0.0
    total = ingested + bad
    return Kpi("data.quarantine_rate", bad / total if total else 0.0, "share", detail=f"{int(bad)} quarantined row(s)")


def column_fingerprint(schema: TableSchema) -> str:
    """``name:TYPE`` of every column, sorted: compared run to run to count schema changes."""
    return ",".join(sorted(f"{c.name}:{c.type}" for c in schema.columns))


def schema_changes(current: Sequence[Kpi], previous: Mapping[str, str]) -> Kpi:
    """Tables whose columns differ from the last run's fingerprint (``data.columns.<table>`` KPIs)."""
    cols = [k for k in current if k.kpi.startswith("data.columns.")]
    if not cols:
        return missing("data.schema_changes", "no destination table exists yet")
    compared = [k for k in cols if k.kpi in previous]
    if not compared:
        return Kpi("data.schema_changes", None, "tables", "missing", "first run with these tables: baseline recorded")
    notes = []
    for k in compared:
        old, new = set(previous[k.kpi].split(",")), set(k.detail.split(","))
        if old != new:
            table = k.kpi.removeprefix("data.columns.")
            notes.append(f"{table}: +{sorted(new - old)} -{sorted(old - new)}")
    return Kpi("data.schema_changes", float(len(notes)), "tables", detail="; ".join(notes) or "no change")


# -- model -------------------------------------------------------------------------------------------------
def model_kpis(wh: Warehouse, spec: PipelineSpec, run_ids: Sequence[str]) -> list[Kpi]:
    out: list[Kpi] = []
    pred = TableRef(spec.scoring.dataset, spec.scoring.table)
    schema = wh.table_schema(pred)
    score_col = "predicted_churn_risk"
    if schema is None or schema.column(score_col) is None:
        why = "does not exist yet (scoring not run)" if schema is None else f"has no {score_col} column"
        out.append(missing("model.score_mean", f"predictions table {pred} {why}", "score"))
    else:
        s = wh.quote(score_col)
        # the mean of exact decimals: a float sum depends on the order the rows are read in (the last
        # bits moved between a clean run and a rerun that wrote the same rows in another order)
        exact = Dialect(wh.dialect).type_name("NUMERIC")
        row = wh.query(
            f"SELECT COUNT({s}) AS n, AVG(CAST({s} AS {exact})) AS mean, MIN({s}) AS lo, MAX({s}) AS hi "
            f"FROM {wh.quote(pred)}"
        ).to_pylist()[0]
        out += [
            Kpi("model.scored_entities", float(row["n"] or 0), "rows"),
            Kpi("model.score_mean", None if row["mean"] is None else float(row["mean"]), "score"),
            Kpi("model.score_min", row["lo"], "score"),
            Kpi("model.score_max", row["hi"], "score"),
        ]
        if schema.column("risk_bucket") and row["n"]:
            b = wh.quote("risk_bucket")
            t = wh.query(f"SELECT {b} AS b, COUNT(*) AS n FROM {wh.quote(pred)} GROUP BY {b} ORDER BY {b}").to_pylist()
            out += [Kpi(f"model.bucket_share.{r['b']}", r["n"] / row["n"], "share") for r in t if r["b"] is not None]
    out += _drift(wh, spec, run_ids)
    out.append(_realised_auc(wh, spec))
    return out


def _realised_auc(wh: Warehouse, spec: PipelineSpec) -> Kpi:
    ref = TableRef(wh.meta_dataset, "model_quality")
    schema = wh.table_schema(ref)
    if schema is None or not schema.column("realised_auc"):
        return missing("model.realised_auc", f"{ref} not written yet (needs labelled outcomes of past scores)")
    rows = wh.query(
        f"SELECT realised_auc AS a, score_date AS d FROM {wh.quote(ref)} WHERE pipeline = {wh.param('p')} "
        "AND realised_auc IS NOT NULL ORDER BY score_date DESC LIMIT 1",
        {"p": spec.name},
    ).to_pylist()
    if not rows:
        return missing("model.realised_auc", f"{ref} has no judged scoring date yet")
    return Kpi("model.realised_auc", rows[0]["a"], "auc", detail=f"predictions of {rows[0]['d']}")


def _drift(wh: Warehouse, spec: PipelineSpec, run_ids: Sequence[str]) -> list[Kpi]:
    refs = [TableRef(wh.meta_dataset, "_drift"), TableRef(spec.scoring.dataset, "_drift")]
    found = find_table(wh, refs)
    if found is None:
        return [missing("model.psi", f"no drift table ({_names(refs)}): drift check not run yet")]
    ref, schema = found
    if not (schema.column("feature") and schema.column("psi")):
        return [missing("model.psi", f"{ref} lacks feature/psi columns ({schema.names})")]
    flt = run_filter(wh, schema, run_ids)
    if flt is None:
        return [missing("model.psi", f"{ref} has no run_id column")]
    rows = wh.query(
        f"SELECT {wh.quote('feature')} AS f, MAX({wh.quote('psi')}) AS psi FROM {wh.quote(ref)} "
        f"WHERE {flt[0]} GROUP BY 1 ORDER BY 1",
        flt[1],
    ).to_pylist()
    if not rows:
        return [missing("model.psi", f"{ref} has no rows for this run")]
    return [Kpi(f"model.psi.{r['f']}", r["psi"], "psi") for r in rows]


# -- business -----------------------------------------------------------------------------------------------
_ERROR_STATUSES = ("error", "failed", "rejected")  # _sync_log: failed = this attempt, rejected = gave up
_HELD_STATUSES = ("held",)


def business_kpis(
    wh: Warehouse, spec: PipelineSpec, run_rows: Sequence[Mapping[str, Any]], run_ids: Sequence[str]
) -> list[Kpi]:
    pushed = sum(int(r.get("rows_pushed") or 0) for r in run_rows)
    out = [Kpi("business.predictions_pushed", float(pushed), "rows", detail="from the cost ledger")]
    refs = [TableRef(wh.meta_dataset, "_sync_log"), TableRef(spec.scoring.dataset, "_sync_log")]
    found = find_table(wh, refs)
    if found is None:
        why = f"no sync log ({_names(refs)}): reverse ETL not run yet"
        out += [
            missing(k, why) for k in ("business.crm_errors", "business.held_for_review", "business.manual_overrides")
        ]
    else:
        out += _sync_log(wh, *found, run_ids)
    review = TableRef(spec.scoring.dataset, spec.scoring.review_table)
    rs = wh.table_schema(review)
    if rs is not None and rs.column("status"):
        n = _scalar(wh, f"SELECT COUNT(*) FROM {wh.quote(review)} WHERE {wh.quote('status')} = 'pending'")
        out.append(Kpi("business.review_pending", n, "rows", detail=f"pending in {review}"))
    return out


def _sync_log(wh: Warehouse, ref: TableRef, schema: TableSchema, run_ids: Sequence[str]) -> list[Kpi]:
    flt = run_filter(wh, schema, run_ids)
    if flt is None or schema.column("status") is None:
        why = f"{ref} lacks run_id/status columns ({schema.names})"
        return [missing(k, why) for k in ("business.crm_errors", "business.held_for_review")]
    st = wh.quote("status")
    rows = wh.query(
        f"SELECT LOWER({st}) AS s, COUNT(*) AS n FROM {wh.quote(ref)} WHERE {flt[0]} GROUP BY 1", flt[1]
    ).to_pylist()
    by = {str(r["s"]): int(r["n"]) for r in rows}
    out = [
        Kpi("business.crm_errors", float(sum(v for k, v in by.items() if k in _ERROR_STATUSES)), "rows"),
        Kpi("business.held_for_review", float(sum(v for k, v in by.items() if k in _HELD_STATUSES)), "rows"),
    ]
    out.append(Kpi("business.review_rejected", float(by.get("review_rejected", 0)), "rows"))
    if "overridden" in by or schema.column("manual_override"):
        n = by.get("overridden", 0)
        if schema.column("manual_override"):
            mo = wh.quote("manual_override")
            n += int(_scalar(wh, f"SELECT COUNT(*) FROM {wh.quote(ref)} WHERE {flt[0]} AND {mo}", flt[1]) or 0)
        out.append(Kpi("business.manual_overrides", float(n), "rows"))
    else:
        out.append(missing("business.manual_overrides", f"{ref} records no manual overrides (CRM did not report any)"))
    return out


# -- cost ------------------------------------------------------------------------------------------------------
def cost_kpis(run_rows: Sequence[Mapping[str, Any]]) -> list[Kpi]:
    total = sum(float(r.get("total_usd") or 0) for r in run_rows)
    ingested = sum(int(r.get("rows_ingested") or 0) for r in run_rows)
    pushed = sum(int(r.get("rows_pushed") or 0) for r in run_rows)
    out = [
        Kpi("cost.total_usd", total, "USD"),
        Kpi("cost.usd_per_1k_ingested", total / ingested * 1000 if ingested else None, "USD"),
        Kpi("cost.usd_per_1k_pushed", total / pushed * 1000 if pushed else None, "USD"),
    ]
    left: dict[str, int] = {}
    for r in run_rows:
        for dest, d in json.loads(r.get("api_detail") or "{}").items():
            if d.get("left") is not None:
                left[dest] = int(d["left"])
    out += [Kpi(f"cost.api_calls_left.{k}", float(v), "calls") for k, v in sorted(left.items())]
    return out


def guarded(kpi: str, fn: Callable[[], list[Kpi]]) -> list[Kpi]:
    """Run one collector; an unexpected error becomes a ``missing`` KPI naming it, never a crash."""
    try:
        return fn()
    except Exception as exc:
        return [missing(kpi, f"could not compute: {type(exc).__name__}: {exc}"[:500])]
