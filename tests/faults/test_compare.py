"""The fault suite's judge (``tests/faults/compare.py``) on small hand-made snapshots: it passes an
identical run whose run-specific columns differ, and names the table / column / record of every
kind of difference the fault tests must catch."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.faults.compare import Snapshot, compare

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def _snap(day: datetime, run: str) -> Snapshot:
    at = day + timedelta(seconds=30)
    tables: dict[str, list[dict[str, Any]]] = {
        "ops_ai.transactions": [
            {"event_id": "E1", "amount": 10, "_lsn": 100},
            {"event_id": "E2", "amount": 20, "_lsn": 101},
        ],
        "ops_ai.predictions": [
            {"customer_id": "C1", "predicted_churn_risk": 0.25, "scored_at": at, "run_id": run, "batch_id": run},
        ],
        "opsloop_meta._opsloop_state": [
            {
                "pipeline": "p",
                "source": "pg.transactions",
                "cursor": f"0/{200 + len(run):X}",
                "extra": f'{{"slot": "slot_{run}"}}',
                "last_run_id": run,
                "updated_at": at,
            }
        ],
        "opsloop_meta._sync_log": [
            {
                "run_id": run,
                "destination": "salesforce.Contact",
                "entity": "C1",
                "payload_hash": "h1",
                "status": "updated",
                "error_message": None,
                "at": at,
            },
        ],
        "opsloop_meta._sync_state": [
            {
                "pipeline": "p",
                "destination": "salesforce.Contact",
                "entity": "C1",
                "external_id": "C1",
                "payload_hash": "h1",
                "payload": '{"AI_Churn_Risk__c": 0.25}',
                "run_id": run,
                "pushed_at": at,
            },
        ],
        "opsloop_meta._ingest_runs": [
            {
                "pipeline": "p",
                "source": "pg",
                "stream": "transactions",
                "kind": "incremental",
                "run_id": run,
                "inserted": 2,
                "rows_read": 2,
                "seconds": 0.5,
                "finished_at": at,
            },
        ],
        "opsloop_meta.kpis": [
            {
                "kpi": "cost.total_usd",
                "flow_run_id": run,
                "value": 0.001,
                "status": "ok",
                "detail": "",
                "computed_at": at,
            },
            {
                "kpi": "data.table_rows.transactions",
                "flow_run_id": run,
                "value": 2.0,
                "status": "ok",
                "detail": "",
                "computed_at": at,
            },
        ],
    }
    crm = {
        "salesforce.Contact": [
            {"Id": "003A", "Customer_Id__c": "C1", "AI_Churn_Risk__c": 0.25, "AI_Next_Action__c": "x"}
        ],
        "hubspot.contacts": [],
    }
    return Snapshot(tables, crm, day, day, f"slot_{run}")


@pytest.fixture
def ref() -> Snapshot:
    return _snap(T0, "ref-run")


@pytest.fixture
def got() -> Snapshot:
    return _snap(T0 + timedelta(hours=1), "rerun-run-xyz")  # other run ids, times, slot, cursor


def test_identical_but_for_run_specific_columns(ref: Snapshot, got: Snapshot) -> None:
    assert compare(ref, got) == []


def test_lost_and_duplicated_rows_are_named(ref: Snapshot, got: Snapshot) -> None:
    lost = copy.deepcopy(got)
    lost.tables["ops_ai.transactions"].pop()
    assert "ops_ai.transactions: record {'event_id': 'E2'} is missing (lost)" in compare(ref, lost)
    dup = copy.deepcopy(got)
    dup.tables["ops_ai.transactions"].append(dict(dup.tables["ops_ai.transactions"][0]))
    problems = compare(ref, dup)
    assert "ops_ai.transactions: 3 rows, the reference has 2" in problems
    assert "ops_ai.transactions: key {'event_id': 'E1'} appears 2 times (a duplicate)" in problems


def test_changed_values_name_table_column_and_record(ref: Snapshot, got: Snapshot) -> None:
    got.tables["ops_ai.predictions"][0]["predicted_churn_risk"] = 0.5
    got.tables["opsloop_meta.kpis"][1]["value"] = 3.0  # a KPI computed from the state
    got.tables["opsloop_meta.kpis"][0]["value"] = 9.9  # cost: run-specific, not compared
    got.tables["opsloop_meta._ingest_runs"][0]["kind"] = "snapshot"
    problems = compare(ref, got)
    assert (
        "ops_ai.predictions.predicted_churn_risk of record {'customer_id': 'C1'}: 0.5, the reference has 0.25"
        in problems
    )
    assert any(p.startswith("opsloop_meta.kpis.value of {'kpi': 'data.table_rows.transactions'}") for p in problems)
    assert not any("cost.total_usd" in p for p in problems)
    assert any(p.startswith("opsloop_meta._ingest_runs: the rerun did not write") for p in problems)


def test_sync_log_stale_duplicate_and_lost_pushes(ref: Snapshot, got: Snapshot) -> None:
    stale = copy.deepcopy(got)
    early = {**stale.tables["opsloop_meta._sync_log"][0], "payload_hash": "h0", "at": stale.day_started}
    stale.tables["opsloop_meta._sync_log"].append(early)
    assert any("pushed with payload h0 (stale" in p for p in compare(ref, stale, resend_allowed=True))
    again = copy.deepcopy(got)
    again.day_started = got.day_started - timedelta(minutes=5)  # a failed run before the rerun
    again.tables["opsloop_meta._sync_log"].append(
        {**again.tables["opsloop_meta._sync_log"][0], "at": again.day_started}
    )
    dup = "opsloop_meta._sync_log: salesforce.Contact record C1 pushed 2 times (the failed run and its rerun)"
    assert dup in compare(ref, again)
    assert compare(ref, again, resend_allowed=True) == []  # the documented at-least-once window
    lost = copy.deepcopy(got)
    lost.tables["opsloop_meta._sync_log"].clear()
    assert any("record C1 confirmed in the reference, never in this run (lost)" in p for p in compare(ref, lost))


def test_crm_values_and_state_claims(ref: Snapshot, got: Snapshot) -> None:
    got.crm["salesforce.Contact"][0]["AI_Churn_Risk__c"] = 0.3
    problems = compare(ref, got)
    assert any(p.startswith("CRM salesforce.Contact record C1:") for p in problems)
    assert any("_sync_state.payload of salesforce.Contact record C1: AI_Churn_Risk__c=0.25" in p for p in problems)


def test_an_unclassified_table_fails(ref: Snapshot, got: Snapshot) -> None:
    got.tables["ops_ai.something_new"] = []
    ref.tables["ops_ai.something_new"] = []
    assert any("['ops_ai.something_new'] are not classified" in p for p in compare(ref, got))
