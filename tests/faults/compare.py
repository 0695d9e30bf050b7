"""What "the rerun ends identical to the fault-free reference" means, table by table.

Every warehouse table opsloop writes is listed here by name (an unlisted table fails the suite):

* **state tables** (the data and the pipeline's own state) must be identical to the reference — same
  row count, same rows — after the columns named in ``ignore`` (each with its reason: run ids,
  timestamps, positions that depend on when a run happened) are left out;
* **run logs** (one row per run / stage / destination / feature) gain the failed run's rows; the
  rows the rerun wrote must match the reference run's rows on every column except those named in
  ``ignore`` — run ids, timestamps, durations, cost figures, and the per-run work counters whose
  split between the failed run and its rerun depends on where the fault hit (that nothing was lost
  or done twice is proven on the state tables, the sync log and the CRM records instead);
* the **sync log** is checked record by record: every record the reference confirmed is confirmed
  with the same payload, nothing is confirmed with another (stale) payload, nothing fails, and a
  record is sent twice only where the fault sits between the log append and the sync-state commit
  (the documented at-least-once window: the same values again, an idempotent upsert);
* the **CRM sandbox**: the same records (no duplicates) and AI field values; no sync state the CRM lacks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

RUN_ID = "run id"
TS = "timestamp of the run"
DUR = "duration of the run"
COST = "cost figure"
SPLIT = "per-run work counter: split between the failed run and its rerun depending on where the fault hit"
POS = "WAL position at the time of the run (each run reads up to the server's current LSN)"

Row = dict[str, Any]


@dataclass(frozen=True)
class StateTable:
    """Must end identical to the reference (``key`` None: compared as a multiset of rows)."""

    key: tuple[str, ...] | None
    ignore: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunLog:
    """One row per run/stage/…; ``at`` = the column that says when a row was written."""

    at: str
    ident: tuple[str, ...]
    ignore: dict[str, str] = field(default_factory=dict)


PRED_IGNORE = {"scored_at": TS, "run_id": RUN_ID, "batch_id": RUN_ID}

TABLES: dict[str, StateTable | RunLog] = {
    # -- data --------------------------------------------------------------------------------------
    "ops_ai.customers": StateTable(("customer_id",)),
    "ops_ai.transactions": StateTable(("event_id",)),
    "ops_ai.support_tickets": StateTable(("ticket_id",)),
    "ops_ai.customer_features": StateTable(("customer_id", "as_of")),
    "ops_ai.predictions": StateTable(("customer_id",), PRED_IGNORE),
    "ops_ai.prediction_history": StateTable(("customer_id", "score_date"), PRED_IGNORE),
    # -- pipeline state ------------------------------------------------------------------------------
    "opsloop_meta._opsloop_state": StateTable(
        ("pipeline", "source"),
        {"last_run_id": RUN_ID, "updated_at": TS, "cursor": POS + "; checked against the tables' _lsn instead"},
    ),
    "opsloop_meta._quarantine": StateTable(None, {"run_id": RUN_ID, "quarantined_at": TS}),
    "opsloop_meta._sync_state": StateTable(("pipeline", "destination", "entity"), {"run_id": RUN_ID, "pushed_at": TS}),
    "opsloop_meta._sync_retry": StateTable(("pipeline", "destination", "entity"), {"run_id": RUN_ID, "updated_at": TS}),
    "opsloop_meta.model_quality": StateTable(
        ("pipeline", "model_name", "model_version", "score_date"), {"run_id": RUN_ID, "computed_at": TS}
    ),
    "opsloop_meta._retrain_triggers": StateTable(
        None, {"trigger_id": "random id of the row", "created_at": TS, "created_by_run": RUN_ID}
    ),
    "opsloop_meta._pipeline_lease": StateTable(("pipeline",)),  # empty: every run gave its lease back
    # -- run logs ----------------------------------------------------------------------------------
    "opsloop_meta._ingest_runs": RunLog(
        "finished_at",
        ("pipeline", "source", "stream", "kind"),
        {
            "run_id": RUN_ID,
            "finished_at": TS,
            "seconds": DUR,
            "position_before": POS,
            "position_after": POS,
            "slot_lag_bytes": POS,
            **dict.fromkeys(("rows_read", "rows_quarantined", "inserted", "updated", "deleted"), SPLIT),
            "flags": "row-count-cliff warnings follow the split of the work (a rerun that finds nothing left warns)",
        },
    ),
    "opsloop_meta._sync_runs": RunLog(
        "finished_at",
        ("pipeline", "destination", "dry_run", "status"),
        {
            "run_id": RUN_ID,
            "started_at": TS,
            "finished_at": TS,
            **dict.fromkeys(("candidates", "pushed", "created", "updated", "deferred", "api_calls"), SPLIT),
            **dict.fromkeys(("api_used", "api_left"), SPLIT + " (the CRM counts the failed run's calls)"),
            "note": "free text of the run",
        },
    ),
    "opsloop_meta._drift": RunLog(
        "at", ("pipeline", "model_name", "model_version", "feature"), {"run_id": RUN_ID, "at": TS}
    ),
    "opsloop_meta._gates": RunLog("at", ("pipeline", "gate"), {"run_id": RUN_ID, "at": TS}),
    "opsloop_meta._score_parts": RunLog(
        "finished_at", ("partition", "partitions"), {"batch_id": RUN_ID, "run_id": RUN_ID, "finished_at": TS}
    ),
    "opsloop_meta.run_costs": RunLog(
        "recorded_at",
        ("pipeline", "stage", "flow"),
        {
            "flow_run_id": RUN_ID,
            "root_flow_run_id": RUN_ID,
            "started_at": TS,
            "ended_at": TS,
            "recorded_at": TS,
            "wall_seconds": DUR,
            **dict.fromkeys(
                ("compute_usd", "api_usd", "bq_usd", "total_usd", "usd_per_1k_ingested", "usd_per_1k_pushed"), COST
            ),
            **dict.fromkeys(
                ("warehouse_jobs", "api_calls", "api_calls_left", "api_detail", "rows_ingested", "rows_pushed"), SPLIT
            ),
        },
    ),
    # KPIs of the run: those computed from the warehouse's state must match; the run-specific ones
    # (cost, durations, freshness = now − max(updated_at), work counters split by the fault) are left
    # out by name in KPI_RUN_SPECIFIC
    "opsloop_meta.kpis": RunLog("computed_at", ("kpi",), {"flow_run_id": RUN_ID, "computed_at": TS}),
}

KPI_RUN_SPECIFIC = {
    "business.predictions_pushed": SPLIT,
    "kpi.predictions_in_crm": SPLIT,
    "data.rows_ingested": SPLIT,
    "data.quarantine_rate": SPLIT,
    "kpi.quarantine_rate": SPLIT,
    "cost.api_calls_left.hubspot.contacts": SPLIT,
    "cost.api_calls_left.salesforce.Contact": SPLIT,
    "cost.budget_per_run": COST,
    "cost.total_usd": COST,
    "cost.usd_per_1k_ingested": COST,
    "cost.usd_per_1k_pushed": COST,
    "kpi.cost_per_1k_pushed": COST,
    "data.freshness_minutes.customers": TS,
    "data.freshness_minutes.support_tickets": TS,
    "data.freshness_minutes.transactions": TS,
    "kpi.transactions_freshness": TS,
    "service.duration_seconds": DUR,
    "service.p95_stage_seconds.ingest": DUR,
    "service.p95_stage_seconds.score": DUR,
    "service.p95_stage_seconds.sync": DUR,
    "service.stage_seconds.ingest": DUR,
    "service.stage_seconds.score": DUR,
    "service.stage_seconds.sync": DUR,
}
KPI_VALUE_COLUMNS = ("value", "status", "detail")

CONFIRMED = ("created", "updated")
AI_FIELDS = {
    "salesforce.Contact": ("AI_Churn_Risk__c", "AI_Next_Action__c"),
    "hubspot.contacts": ("ai_churn_risk", "ai_next_action"),
}
CRM_KEY = {"salesforce.Contact": "Customer_Id__c", "hubspot.contacts": "customer_id"}


@dataclass
class Snapshot:
    """Everything a run leaves behind: every warehouse table, the CRM sandbox's records, and when
    the day-1 runs of this copy started (to tell the failed run's log rows from the rerun's)."""

    tables: dict[str, list[Row]]
    crm: dict[str, list[Row]]
    day_started: datetime  # before the first day-1 run (the faulted one, or the reference run)
    rerun_started: datetime  # before the run that must converge (the rerun, or the reference run)
    slot: str = ""


def _fmt(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


def _norm(table: str, row: Row, snap: Snapshot) -> Row:
    if table == "opsloop_meta._opsloop_state" and row.get("extra"):
        extra = json.loads(row["extra"])
        if extra.get("slot") == snap.slot:
            extra["slot"] = "<this pipeline's slot>"
        return {**row, "extra": json.dumps(extra, sort_keys=True)}
    return row


def _project(rows: Iterable[Row], ignore: dict[str, str]) -> list[Row]:
    return [{k: v for k, v in r.items() if k not in ignore} for r in rows]


def _freeze(row: Row) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in row.items()))


def compare_state(name: str, spec: StateTable, ref: Snapshot, got: Snapshot) -> list[str]:
    a = _project((_norm(name, r, ref) for r in ref.tables.get(name, [])), spec.ignore)
    b = _project((_norm(name, r, got) for r in got.tables.get(name, [])), spec.ignore)
    problems: list[str] = []
    if len(a) != len(b):
        problems.append(f"{name}: {len(b)} rows, the reference has {len(a)}")
    if spec.key is None:
        ca, cb = Counter(map(_freeze, a)), Counter(map(_freeze, b))
        for row, n in (cb - ca).items():
            problems.append(f"{name}: extra row (×{n}) {_fmt(dict(row))}")
        for row, n in (ca - cb).items():
            problems.append(f"{name}: missing row (×{n}) {_fmt(dict(row))}")
        return problems
    key = spec.key
    ka: dict[tuple[Any, ...], list[Row]] = {}
    kb: dict[tuple[Any, ...], list[Row]] = {}
    for rows, into in ((a, ka), (b, kb)):
        for r in rows:
            into.setdefault(tuple(r[k] for k in key), []).append(r)
    for k, rs in kb.items():
        if len(rs) > 1:
            problems.append(f"{name}: key {dict(zip(key, k, strict=True))} appears {len(rs)} times (a duplicate)")
    for k in ka.keys() - kb.keys():
        problems.append(f"{name}: record {dict(zip(key, k, strict=True))} is missing (lost)")
    for k in kb.keys() - ka.keys():
        problems.append(f"{name}: record {dict(zip(key, k, strict=True))} is not in the reference (extra)")
    for k in ka.keys() & kb.keys():
        ra, rb = ka[k][0], kb[k][0]
        for col in ra.keys() | rb.keys():
            if ra.get(col) != rb.get(col):
                problems.append(
                    f"{name}.{col} of record {dict(zip(key, k, strict=True))}: {_fmt(rb.get(col))}, "
                    f"the reference has {_fmt(ra.get(col))}"
                )
    return problems


def split_log(rows: list[Row], at: str, snap: Snapshot) -> tuple[list[Row], list[Row]]:
    """(rows the failed run wrote, rows the rerun wrote); earlier rows are the template's."""
    faulted = [r for r in rows if r[at] is not None and snap.day_started <= r[at] < snap.rerun_started]
    rerun = [r for r in rows if r[at] is not None and r[at] >= snap.rerun_started]
    return faulted, rerun


def compare_log(name: str, spec: RunLog, ref: Snapshot, got: Snapshot) -> list[str]:
    _, a = split_log(ref.tables.get(name, []), spec.at, ref)
    _, b = split_log(got.tables.get(name, []), spec.at, got)
    ignore = dict(spec.ignore)
    problems: list[str] = []
    if name == "opsloop_meta.kpis":
        a = [r if r["kpi"] not in KPI_RUN_SPECIFIC else {**r, **dict.fromkeys(KPI_VALUE_COLUMNS)} for r in a]
        b = [r if r["kpi"] not in KPI_RUN_SPECIFIC else {**r, **dict.fromkeys(KPI_VALUE_COLUMNS)} for r in b]
    pa_, pb = _project(a, ignore), _project(b, ignore)
    ident = spec.ident
    ia = Counter(tuple(r[c] for c in ident) for r in pa_)
    ib = Counter(tuple(r[c] for c in ident) for r in pb)
    if len(pa_) != len(pb):
        problems.append(f"{name}: the rerun wrote {len(pb)} rows, the reference run {len(pa_)}")
    for k, n in (ib - ia).items():
        problems.append(f"{name}: the rerun wrote {dict(zip(ident, k, strict=True))} ×{n} more than the reference run")
    for k, n in (ia - ib).items():
        problems.append(
            f"{name}: the rerun did not write {dict(zip(ident, k, strict=True))} (×{n}) as the reference run did"
        )
    by_a = {tuple(r[c] for c in ident): r for r in pa_}
    for r in pb:
        k = tuple(r[c] for c in ident)
        ra = by_a.get(k)
        if ra is None:
            continue
        for col in ra.keys() | r.keys():
            if ra.get(col) != r.get(col):
                problems.append(
                    f"{name}.{col} of {dict(zip(ident, k, strict=True))} (rerun): {_fmt(r.get(col))}, "
                    f"the reference run wrote {_fmt(ra.get(col))}"
                )
    return problems


def day_log(snap: Snapshot) -> list[Row]:
    return [r for r in snap.tables.get("opsloop_meta._sync_log", []) if r["at"] >= snap.day_started]


def compare_sync_log(ref: Snapshot, got: Snapshot, resend_allowed: bool) -> list[str]:
    """0 lost, 0 duplicated, nothing pushed with a stale value (see the module docstring)."""
    problems: list[str] = []
    name = "opsloop_meta._sync_log"
    want: dict[tuple[str, str], str] = {}
    for r in day_log(ref):
        if r["status"] in CONFIRMED:
            want[(r["destination"], r["entity"])] = r["payload_hash"]
    final = {(r["destination"], r["entity"]): r["payload_hash"] for r in got.tables.get("opsloop_meta._sync_state", [])}
    rows = day_log(got)
    confirmed: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        key = (r["destination"], r["entity"])
        if r["status"] not in CONFIRMED:
            problems.append(
                f"{name}: {r['destination']} record {r['entity']} logged {r['status']!r}: {r['error_message']}"
            )
            continue
        confirmed.setdefault(key, []).append(r)
        expected = want.get(key, final.get(key))
        if r["payload_hash"] != expected:
            problems.append(
                f"{name}: {r['destination']} record {r['entity']} was pushed with payload {r['payload_hash']} "
                f"(stale: the converged value is {expected})"
            )
    for key in want.keys() - confirmed.keys():
        problems.append(f"{name}: {key[0]} record {key[1]} confirmed in the reference, never in this run (lost)")
    for key in confirmed.keys() - want.keys():
        problems.append(f"{name}: {key[0]} record {key[1]} confirmed here, not in the reference (extra push)")
    for key, rs in confirmed.items():
        rerun = [r for r in rs if r["at"] >= got.rerun_started]
        if len(rerun) > 1:
            problems.append(f"{name}: {key[0]} record {key[1]} pushed {len(rerun)} times by the rerun")
        if len(rs) > 1 and not resend_allowed:
            problems.append(f"{name}: {key[0]} record {key[1]} pushed {len(rs)} times (the failed run and its rerun)")
    return problems


def crm_values(snap: Snapshot) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for obj, records in snap.crm.items():
        for rec in records:
            values = rec.get("properties", rec)
            key = (obj, str(values.get(CRM_KEY[obj])))
            vals = {f: values.get(f) for f in AI_FIELDS[obj]}
            vals["id"] = rec.get("Id") or rec.get("id")
            out.setdefault(key, {"n": 0, **vals})["n"] += 1
    return out


def compare_crm(ref: Snapshot, got: Snapshot) -> list[str]:
    problems: list[str] = []
    a, b = crm_values(ref), crm_values(got)
    for obj in ref.crm:
        if len(ref.crm[obj]) != len(got.crm.get(obj, [])):
            problems.append(f"CRM {obj}: {len(got.crm.get(obj, []))} records, the reference has {len(ref.crm[obj])}")
    for key in a.keys() | b.keys():
        if a.get(key) != b.get(key):
            problems.append(f"CRM {key[0]} record {key[1]}: {b.get(key)}, the reference has {a.get(key)}")
    # the sync state never claims a value the CRM does not hold
    for r in got.tables.get("opsloop_meta._sync_state", []):
        obj = r["destination"]
        held = b.get((obj, r["external_id"]))
        payload = json.loads(r["payload"]) if r["payload"] else {}
        for crm_field, value in payload.items():  # the payload is keyed by the CRM's field names
            if crm_field in AI_FIELDS.get(obj, ()) and (held is None or str(held.get(crm_field)) != str(value)):
                problems.append(
                    f"opsloop_meta._sync_state.payload of {obj} record {r['external_id']}: {crm_field}={value!r} "
                    f"but the CRM holds {None if held is None else held.get(crm_field)!r}"
                )
    return problems


def compare(ref: Snapshot, got: Snapshot, resend_allowed: bool = False) -> list[str]:
    """Every difference between a converged run and the reference, each naming table/column/record."""
    problems: list[str] = []
    for snap, who in ((ref, "reference"), (got, "rerun")):
        unknown = sorted(set(snap.tables) - set(TABLES) - {"opsloop_meta._sync_log"})
        if unknown:
            problems.append(f"{who}: table(s) {unknown} are not classified in tests/faults/compare.py")
    if set(ref.tables) != set(got.tables):
        problems.append(
            f"tables differ: only in the reference {sorted(set(ref.tables) - set(got.tables))}, "
            f"only here {sorted(set(got.tables) - set(ref.tables))}"
        )
    for name, spec in TABLES.items():
        if name not in ref.tables and name not in got.tables:
            continue
        if isinstance(spec, StateTable):
            problems += compare_state(name, spec, ref, got)
        else:
            problems += compare_log(name, spec, ref, got)
    problems += compare_sync_log(ref, got, resend_allowed)
    problems += compare_crm(ref, got)
    return problems


def cursor_covers_changes(snap: Snapshot) -> list[str]:
    """The committed CDC position is at or past every change the tables hold (nothing re-read later)."""
    from opsloop.sources.pgoutput import lsn_to_int

    problems = []
    for r in snap.tables.get("opsloop_meta._opsloop_state", []):
        stream = str(r["source"]).rsplit(".", 1)[-1]
        lsns = [x["_lsn"] for x in snap.tables.get(f"ops_ai.{stream}", []) if x.get("_lsn") is not None]
        if lsns and r["cursor"] and lsn_to_int(r["cursor"]) < max(lsns):
            problems.append(
                f"opsloop_meta._opsloop_state.cursor of {r['source']}: {r['cursor']} is before the newest change"
            )
    return problems
