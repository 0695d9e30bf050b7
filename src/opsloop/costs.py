"""Cost per run: price every stage of every flow run and keep it in the ``run_costs`` ledger.

One ledger row per (flow_run_id, stage): wall time, the stage's warehouse jobs (BigQuery bytes
billed and $), a compute estimate (wall seconds × the work pool's vCPU / GiB × Cloud Run prices),
CRM API calls per destination and what is left of each daily budget, rows ingested / scored /
pushed and unit costs. Rows are written with one MERGE keyed on (flow_run_id, stage), so writing
the same stage twice replaces its row and never duplicates it.

BigQuery on-demand rules applied here (Google Cloud, "BigQuery pricing", on-demand compute
pricing, https://cloud.google.com/bigquery/pricing, checked 2026-11): queries are billed per TiB
processed, rounded up to the nearest MB (MiB), with a minimum of 10 MB per query (and per
table referenced); cached results and failed queries are not billed; load, copy and export jobs
are free. ``totalBytesBilled`` from real BigQuery already includes the per-table minimum, so the
ledger takes the larger of the reported figure and the per-query minimum computed here. List
prices only: the monthly free TiB and committed-use discounts are not subtracted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsloop import faults
from opsloop.spec.ops import CostSpec
from opsloop.upsert import upsert_rows_sql
from opsloop.warehouse.base import Column, JobStats, TableRef, TableSchema, Warehouse, clean_labels
from opsloop.warehouse.base import jobs_for as _jobs_for

MIB = 1024**2
GIB = 1024**3
TIB = 1024**4
LEDGER_TABLE = "run_costs"
FREE_JOB_KINDS = frozenset({"load", "copy", "extract", "append"})
# the ledger's own jobs (cost and KPI writes) are overhead, not part of any stage
BOOKKEEPING_TASKS = frozenset(
    {"record_stage_cost", "evaluate_run_kpis", "read_run_costs", "write_cost_report", "reconcile_run_costs"}
)

LEDGER_SCHEMA = TableSchema(
    (
        Column("flow_run_id", "STRING", False),
        Column("stage", "STRING", False),
        Column("root_flow_run_id", "STRING"),
        Column("pipeline", "STRING"),
        Column("flow", "STRING"),
        Column("deployment", "STRING"),
        Column("status", "STRING"),
        Column("warehouse", "STRING"),
        Column("started_at", "TIMESTAMP"),
        Column("ended_at", "TIMESTAMP"),
        Column("wall_seconds", "FLOAT64"),
        Column("warehouse_jobs", "INT64"),
        Column("bq_jobs", "INT64"),
        Column("bq_bytes_processed", "INT64"),
        Column("bq_bytes_billed", "INT64"),
        Column("bq_slot_ms", "INT64"),
        Column("bq_usd", "FLOAT64"),
        Column("vcpu", "FLOAT64"),
        Column("memory_gib", "FLOAT64"),
        Column("compute_usd", "FLOAT64"),
        Column("api_calls", "INT64"),
        Column("api_calls_left", "INT64"),
        Column("api_detail", "STRING"),
        Column("api_usd", "FLOAT64"),
        Column("rows_ingested", "INT64"),
        Column("rows_scored", "INT64"),
        Column("rows_pushed", "INT64"),
        Column("total_usd", "FLOAT64"),
        Column("usd_per_1k_ingested", "FLOAT64"),
        Column("usd_per_1k_pushed", "FLOAT64"),
        Column("model_name", "STRING"),
        Column("model_version", "STRING"),
        Column("recorded_at", "TIMESTAMP"),
    ),
    partition_by="started_at",
    cluster_by=("pipeline", "flow_run_id"),
)
LEDGER_COLUMNS = tuple(LEDGER_SCHEMA.names)


# -- pricing arithmetic ----------------------------------------------------------------------------
def billed_bytes(job: JobStats, min_bytes: int = 10 * MIB) -> int:
    """Bytes one job bills under on-demand pricing (see the module docstring for the rules)."""
    if job.kind in FREE_JOB_KINDS or job.cache_hit:
        return 0
    processed = max(job.bytes_processed, 0)
    if processed == 0 and job.bytes_billed <= 0:
        return 0
    rounded = math.ceil(processed / MIB) * MIB
    return max(rounded, min_bytes, job.bytes_billed)


def bq_usd(bytes_billed: int, usd_per_tib: float) -> float:
    return bytes_billed / TIB * usd_per_tib


def compute_usd(wall_seconds: float, vcpu: float, memory_gib: float, costs: CostSpec) -> float:
    return wall_seconds * (vcpu * costs.usd_per_vcpu_second + memory_gib * costs.usd_per_gib_second)


def per_1k(usd: float, rows: int) -> float | None:
    """$ per 1,000 rows, or None when there were no rows (no unit cost, rather than infinity)."""
    return usd / rows * 1000 if rows > 0 else None


_CPU_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m?)\s*$")
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?\s*$")
_MEM_UNIT = {None: 1, "Ki": 1024, "Mi": MIB, "Gi": GIB, "Ti": TIB, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_cpu(value: Any) -> float | None:
    """Kubernetes/Cloud Run CPU: ``"1000m"`` → 1.0, ``"2"`` → 2.0, ``1`` → 1.0; unparsable → None."""
    m = _CPU_RE.match(str(value)) if value is not None else None
    if not m:
        return None
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def parse_memory_gib(value: Any) -> float | None:
    """Cloud Run memory: ``"512Mi"`` → 0.5, ``"2Gi"`` → 2.0, ``"1G"`` → 0.93; unparsable → None."""
    m = _MEM_RE.match(str(value)) if value is not None else None
    if not m:
        return None
    return float(m.group(1)) * _MEM_UNIT[m.group(2)] / GIB


def pool_resources(job_variables: Mapping[str, Any] | None, costs: CostSpec) -> tuple[float, float]:
    """(vCPU, GiB) of the run: the flow run's ``cpu`` / ``memory`` job variables, else the spec's."""
    jv = job_variables or {}
    return parse_cpu(jv.get("cpu")) or costs.vcpu, parse_memory_gib(jv.get("memory")) or costs.memory_gib


# -- a stage's usage → a ledger row ------------------------------------------------------------------
@dataclass
class StageUsage:
    """What one stage of one flow run used; built by the Prefect layer, priced by :func:`build_row`."""

    pipeline: str
    flow: str
    flow_run_id: str
    stage: str
    started_at: datetime
    ended_at: datetime
    deployment: str = "none"
    root_flow_run_id: str | None = None
    status: str = "completed"
    warehouse: str = "duckdb"
    jobs: Sequence[JobStats] = ()
    rows_ingested: int = 0
    rows_scored: int = 0
    rows_pushed: int = 0
    api_calls: Mapping[str, int] = field(default_factory=dict)
    api_left: Mapping[str, int] = field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""
    job_variables: Mapping[str, Any] | None = None


def by_destination(prices: Mapping[str, float] | Mapping[str, int], destination: str) -> float | None:
    """A per-destination setting: ``salesforce.Contact`` falls back to the vendor key ``salesforce``."""
    for key in (destination, destination.split(".", 1)[0]):
        if key in prices:
            return float(prices[key])
    return None


def build_row(usage: StageUsage, costs: CostSpec, api_used_today: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Price one stage. ``api_used_today``: calls per destination already in the ledger today (UTC)."""
    wall = max((usage.ended_at - usage.started_at).total_seconds(), 0.0)
    on_bq = usage.warehouse == "bigquery"
    bq_list = list(usage.jobs) if on_bq else []
    bq_bytes = sum(billed_bytes(j, costs.bq_min_bytes_per_query) for j in bq_list)
    vcpu, gib = pool_resources(usage.job_variables, costs)
    detail: dict[str, dict[str, int | None]] = {}
    for dest in sorted(set(usage.api_calls) | set(usage.api_left)):
        calls = int(usage.api_calls.get(dest, 0))
        left: int | None = usage.api_left.get(dest)
        budget = by_destination(costs.api_daily_budget, dest)
        if left is None and budget is not None:
            used = int((api_used_today or {}).get(dest, 0)) + calls
            left = max(int(budget) - used, 0)
        detail[dest] = {"calls": calls, "left": None if left is None else int(left)}
    lefts = [d["left"] for d in detail.values() if d["left"] is not None]
    api_usd = sum(
        float(d["calls"] or 0) * (by_destination(costs.api_usd_per_call, k) or 0.0) for k, d in detail.items()
    )
    bq = bq_usd(bq_bytes, costs.bq_usd_per_tib)
    comp = compute_usd(wall, vcpu, gib, costs)
    total = bq + comp + api_usd
    return {
        "flow_run_id": usage.flow_run_id,
        "stage": usage.stage,
        "root_flow_run_id": usage.root_flow_run_id or usage.flow_run_id,
        "pipeline": usage.pipeline,
        "flow": usage.flow,
        "deployment": usage.deployment,
        "status": usage.status,
        "warehouse": usage.warehouse,
        "started_at": usage.started_at,
        "ended_at": usage.ended_at,
        "wall_seconds": round(wall, 6),
        "warehouse_jobs": len(usage.jobs),
        "bq_jobs": len(bq_list),
        "bq_bytes_processed": sum(max(j.bytes_processed, 0) for j in bq_list),
        "bq_bytes_billed": bq_bytes,
        "bq_slot_ms": sum(max(j.slot_ms, 0) for j in bq_list),
        "bq_usd": round(bq, 9),
        "vcpu": vcpu,
        "memory_gib": gib,
        "compute_usd": round(comp, 9),
        "api_calls": sum(int(d["calls"] or 0) for d in detail.values()),
        "api_calls_left": min(lefts) if lefts else None,
        "api_detail": json.dumps(detail, sort_keys=True),
        "api_usd": round(api_usd, 9),
        "rows_ingested": int(usage.rows_ingested),
        "rows_scored": int(usage.rows_scored),
        "rows_pushed": int(usage.rows_pushed),
        "total_usd": round(total, 9),
        # unit costs derive from the stored (rounded) total so that a reader dividing
        # total_usd by the row count gets exactly the figure in the ledger
        "usd_per_1k_ingested": _r(per_1k(round(total, 9), usage.rows_ingested)),
        "usd_per_1k_pushed": _r(per_1k(round(total, 9), usage.rows_pushed)),
        "model_name": usage.model_name,
        "model_version": usage.model_version,
        "recorded_at": datetime.now(UTC),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 9)


def fill_from_existing(usage: StageUsage, existing: Mapping[str, Any] | None) -> StageUsage:
    """Combine with the stage's row already in the ledger (the stage priced itself, then the parent
    records it again): the earlier start, the later end, counts the new call does not give, and a
    failure from either. Re-recording a stage never loses what the first write knew."""
    if not existing:
        return usage
    old_api = {k: v for k, v in json.loads(existing.get("api_detail") or "{}").items()}
    started = min(usage.started_at, existing.get("started_at") or usage.started_at)
    ended = max(usage.ended_at, existing.get("ended_at") or usage.ended_at)
    usage.started_at, usage.ended_at = started, ended
    if existing.get("status") not in (None, "completed"):
        usage.status = str(existing["status"])
    for col in ("rows_ingested", "rows_scored", "rows_pushed"):
        if not getattr(usage, col):
            setattr(usage, col, int(existing.get(col) or 0))
    if not usage.api_calls and not usage.api_left:
        usage.api_calls = {k: int(v.get("calls") or 0) for k, v in old_api.items()}
        usage.api_left = {k: int(v["left"]) for k, v in old_api.items() if v.get("left") is not None}
    usage.model_name = usage.model_name or str(existing.get("model_name") or "")
    usage.model_version = usage.model_version or str(existing.get("model_version") or "")
    return usage


# -- which jobs belong to which stage ----------------------------------------------------------------
_CLAIMED: dict[str, tuple[str, str]] = {}


def _job_key(job: JobStats) -> str:
    return job.job_id or f"obj{id(job)}"


def label_value(value: str) -> str:
    """A value as the adapters store it in job labels (BigQuery label rules)."""
    return clean_labels({"v": value})["v"]


def stage_jobs(flow_run_id: str, stage: str, tasks: Iterable[str] | None = None) -> list[JobStats]:
    """The jobs of ``flow_run_id`` not yet priced for another stage (optionally only these tasks).

    Stages run one after another inside a flow run, so "not claimed by an earlier stage" splits a
    run's jobs between its stages; recording the same stage again sees the same jobs.
    """
    run = label_value(flow_run_id)
    wanted = {label_value(t) for t in tasks} if tasks is not None else None
    mine = (run, stage)
    return [
        j
        for j in _jobs_for(run)
        if (wanted is None or j.labels.get("task") in wanted)
        and j.labels.get("task") not in BOOKKEEPING_TASKS
        and _CLAIMED.get(_job_key(j), mine) == mine
    ]


def claim_jobs(jobs: Iterable[JobStats], flow_run_id: str, stage: str) -> None:
    for j in jobs:
        _CLAIMED[_job_key(j)] = (label_value(flow_run_id), stage)


# -- the ledger table ----------------------------------------------------------------------------------
def ledger_ref(wh: Warehouse) -> TableRef:
    return TableRef(wh.meta_dataset, LEDGER_TABLE)


def write_ledger(wh: Warehouse, rows: Sequence[Mapping[str, Any]]) -> int:
    """Upsert ledger rows (MERGE on flow_run_id + stage). Returns the number of rows written."""
    if not rows:
        return 0
    ref = ledger_ref(wh)
    wh.ensure_table(ref, LEDGER_SCHEMA)
    sql, params = upsert_rows_sql(wh, ref, LEDGER_SCHEMA, ("flow_run_id", "stage"), rows)
    faults.checkpoint("during_cost_write")
    wh.execute(sql, params, kind="merge")
    return len(rows)


def read_ledger(
    wh: Warehouse,
    start: datetime | None = None,
    end: datetime | None = None,
    pipeline: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Ledger rows with ``start <= started_at < end`` (and pipeline / root or stage run ids), oldest first."""
    ref = ledger_ref(wh)
    if wh.table_schema(ref) is None:
        return []
    where: list[str] = ["TRUE"]
    params: dict[str, Any] = {}
    if start is not None:
        where.append(f"started_at >= {wh.param('start')}")
        params["start"] = start
    if end is not None:
        where.append(f"started_at < {wh.param('end')}")
        params["end"] = end
    if pipeline:
        where.append(f"pipeline = {wh.param('pipeline')}")
        params["pipeline"] = pipeline
    if run_ids is not None:
        ids = sorted(set(run_ids))
        if not ids:
            return []
        names = [f"r{i}" for i in range(len(ids))]
        params.update(dict(zip(names, ids, strict=True)))
        inlist = ", ".join(wh.param(n) for n in names)
        where.append(f"(flow_run_id IN ({inlist}) OR root_flow_run_id IN ({inlist}))")
    cols = ", ".join(wh.quote(c) for c in LEDGER_COLUMNS)
    sql = f"SELECT {cols} FROM {wh.quote(ref)} WHERE {' AND '.join(where)} ORDER BY started_at, stage"
    return [_utc(r) for r in wh.query(sql, params).to_pylist()]


def _utc(row: dict[str, Any]) -> dict[str, Any]:
    for k in ("started_at", "ended_at", "recorded_at"):
        v = row.get(k)
        if isinstance(v, datetime):
            row[k] = v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
    return row


def api_calls_today(
    wh: Warehouse, pipeline: str, now: datetime, exclude: tuple[str, str] | None = None
) -> dict[str, int]:
    """CRM calls per destination already in the ledger for ``pipeline`` since UTC midnight."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    used: dict[str, int] = {}
    for row in read_ledger(wh, day, day + timedelta(days=1), pipeline):
        if exclude and (row["flow_run_id"], row["stage"]) == exclude:
            continue
        for dest, d in json.loads(row.get("api_detail") or "{}").items():
            used[dest] = used.get(dest, 0) + int(d.get("calls") or 0)
    return used


def api_usage_from_sync_runs(wh: Warehouse, flow_run_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """CRM calls and calls left per destination as the reverse-ETL stage logged them for this run
    (``<meta>._sync_runs``); empty when the run pushed nothing or the table does not exist."""
    ref = TableRef(wh.meta_dataset, "_sync_runs")
    schema = wh.table_schema(ref)
    if schema is None or not all(schema.column(c) for c in ("run_id", "destination", "api_calls", "api_left")):
        return {}, {}
    rows = wh.query(
        f"SELECT destination, SUM(api_calls) AS calls, MIN(api_left) AS lft FROM {wh.quote(ref)} "
        f"WHERE run_id = {wh.param('r')} GROUP BY destination",
        {"r": flow_run_id},
    ).to_pylist()
    calls = {str(r["destination"]): int(r["calls"] or 0) for r in rows}
    left = {str(r["destination"]): int(r["lft"]) for r in rows if r["lft"] is not None}
    return calls, left
