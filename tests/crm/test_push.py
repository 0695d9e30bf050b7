"""Reverse ETL through the real clients against the sandbox: exact landing, zero-write reruns,
significance, partial failures and retries, guards (dry run, budget, gates, review), schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsloop.crm.gates import record_gate
from opsloop.errors import TerminalError
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient
from tests.crm.helpers import (
    actual_hs,
    actual_sf,
    expected_hs,
    expected_sf,
    log_counts,
    predictions,
    push,
    staged,
    sync_state,
    write_predictions,
    write_spec,
)


def _writes(sbx: SandboxClient, vendor: str) -> int:
    return sbx.requests()[vendor]["writes"]


@pytest.mark.slow
def test_10k_to_salesforce_bulk_lands_exactly_then_zero_writes(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 10_000)
    crm_sandbox.seed("salesforce", "Contact", 10_000)
    rep = push(wh, spec, "salesforce", crm_sandbox)
    assert rep["status"] == "completed" and rep["updated"] == 10_000 and rep["failed"] == 0
    assert rep["api_calls"] <= 8 and len(crm_sandbox.jobs()) == 1  # describe + one Bulk 2.0 job
    assert actual_sf(crm_sandbox) == expected_sf(rows)
    assert len(sync_state(wh, "salesforce.Contact")) == 10_000
    writes = _writes(crm_sandbox, "salesforce")
    again = push(wh, spec, "salesforce", crm_sandbox, run_id="run-2")
    assert again["candidates"] == 0 and again["diff"]["unchanged"] == 10_000
    assert _writes(crm_sandbox, "salesforce") == writes  # zero write calls
    assert log_counts(wh, "run-2") == {}


@pytest.mark.slow
def test_10k_to_hubspot_lands_exactly_then_zero_writes(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 10_000)
    rep = push(wh, spec, "hubspot", crm_sandbox)
    assert rep["created"] == 10_000 and rep["failed"] == 0
    assert sorted(rep["schema"]["created"]) == sorted(
        ["customer_id", "ai_churn_risk", "ai_next_action", "ai_risk_bucket", "ai_scored_at"]
    )
    props = {p["name"]: p for p in crm_sandbox.schema("hubspot", "contacts")}
    assert props["customer_id"]["hasUniqueValue"] and props["ai_churn_risk"]["type"] == "number"
    assert props["ai_next_action"]["type"] == "enumeration"
    assert crm_sandbox.requests()["hubspot"]["routes"]["hs.batch_upsert"] == 100
    assert actual_hs(crm_sandbox) == expected_hs(rows)
    writes = _writes(crm_sandbox, "hubspot")
    again = push(wh, spec, "hubspot", crm_sandbox, run_id="run-2")
    assert again["candidates"] == 0 and _writes(crm_sandbox, "hubspot") == writes


def test_collections_below_threshold_and_only_changes_are_pushed(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 450)
    crm_sandbox.seed("salesforce", "Contact", 450)
    rep = push(wh, spec, "salesforce", crm_sandbox)
    assert rep["updated"] == 450 and crm_sandbox.requests()["salesforce"]["routes"]["sf.collections_upsert"] == 3
    changed = [dict(r) for r in rows]
    for r in changed[:30]:
        r["next_best_action"] = "executive_call" if r["next_best_action"] != "executive_call" else "none"
    write_predictions(wh, changed)
    rep2 = push(wh, spec, "salesforce", crm_sandbox, run_id="run-2")
    assert rep2["candidates"] == 30 and rep2["updated"] == 30
    assert crm_sandbox.requests()["salesforce"]["routes"]["sf.collections_upsert"] == 4
    assert actual_sf(crm_sandbox) == expected_sf(changed)


def test_significance_rule_skips_jitter(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    spec, rows = staged(wh, tmp_path, 200, delta=0.05)
    push(wh, spec, "hubspot", crm_sandbox)
    jitter = [dict(r) for r in rows]
    for r in jitter:
        moved = min(0.999, max(0.0, r["predicted_churn_risk"] + 0.01))
        if (moved < 0.3) == (r["predicted_churn_risk"] < 0.3) and (moved < 0.7) == (r["predicted_churn_risk"] < 0.7):
            r["predicted_churn_risk"] = moved  # same bucket, |Δ| < minDelta
    jitter[0]["predicted_churn_risk"], jitter[0]["risk_bucket"] = 0.95, "high"  # bucket change
    jitter[1]["predicted_churn_risk"] = rows[1]["predicted_churn_risk"] + 0.06  # |Δ| ≥ minDelta
    write_predictions(wh, jitter)
    writes = _writes(crm_sandbox, "hubspot")
    rep = push(wh, spec, "hubspot", crm_sandbox, run_id="run-2")
    assert rep["candidates"] == 2 and rep["diff"]["insignificant"] >= 150
    assert _writes(crm_sandbox, "hubspot") == writes + 1
    got = actual_hs(crm_sandbox)
    assert got[rows[0]["customer_id"]][0] == 0.95
    assert got[rows[2]["customer_id"]][0] == rows[2]["predicted_churn_risk"]  # jitter not pushed


def test_without_min_delta_a_confirmed_record_is_known_by_its_hash_alone(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    """minDelta 0: the diff reads no confirmed payloads (the widest state column); a changed hash is a
    changed record, and a record with a state row counts as changed, not new."""
    spec, rows = staged(wh, tmp_path, 40)
    assert push(wh, spec, "hubspot", crm_sandbox)["created"] == 40
    with wh.connect() as con:  # the stored payloads are not what the diff decides on
        con.execute("UPDATE opsloop_meta._sync_state SET payload = NULL")
    changed = [dict(r) for r in rows]
    for r in changed[:5]:
        r["next_best_action"] = "executive_call" if r["next_best_action"] != "executive_call" else "none"
    write_predictions(wh, changed)
    rep = push(wh, spec, "hubspot", crm_sandbox, run_id="run-2")
    assert rep["candidates"] == 5 and rep["diff"]["changed"] == 5 and rep["diff"]["new"] == 0
    assert rep["updated"] == 5 and rep["diff"]["unchanged"] == 35
    assert actual_hs(crm_sandbox) == expected_hs(changed)


def test_hubspot_207_partial_failure_then_only_failed_are_retried(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 300)
    bad = [rows[5]["customer_id"], rows[150]["customer_id"], rows[299]["customer_id"]]
    crm_sandbox.fail_records(
        "hubspot",
        "contacts",
        "customer_id",
        values=bad,
        error_code="INVALID_EMAIL",
        message="Email address is invalid",
        count=3,
    )
    rep = push(wh, spec, "hubspot", crm_sandbox)
    assert rep["created"] == 297 and rep["failed"] == 3 and rep["failed_by_code"] == {"INVALID_EMAIL": 3}
    assert set(sync_state(wh, "hubspot.contacts")) == {r["customer_id"] for r in rows} - set(bad)
    logged = wh.query(
        "SELECT entity, error_code, error_message, attempt FROM opsloop_meta._sync_log "
        "WHERE status = 'failed' ORDER BY entity"
    ).to_pylist()
    assert [r["entity"] for r in logged] == sorted(bad) and logged[0]["error_message"] == "Email address is invalid"
    before = crm_sandbox.requests()["hubspot"]["routes"]["hs.batch_upsert"]
    rep2 = push(wh, spec, "hubspot", crm_sandbox, run_id="run-2", retry_failed_only=True)
    assert rep2["candidates"] == 3 and rep2["updated"] + rep2["created"] == 3 and rep2["diff"]["retries"] == 3
    assert crm_sandbox.requests()["hubspot"]["routes"]["hs.batch_upsert"] == before + 1
    assert actual_hs(crm_sandbox) == expected_hs(rows)
    assert wh.query("SELECT count(*) AS n FROM opsloop_meta._sync_retry").to_pylist()[0]["n"] == 0
    attempts = wh.query("SELECT attempt FROM opsloop_meta._sync_log WHERE run_id = 'run-2'").to_pylist()
    assert {a["attempt"] for a in attempts} == {2}


def test_bulk_failed_rows_recorded_and_retried_until_cap(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 250, bulk=100, cap=2)
    crm_sandbox.seed("salesforce", "Contact", 249)  # the last customer has no Contact: LastName required
    crm_sandbox.fail_records("salesforce", "Contact", "Customer_Id__c", values=[rows[0]["customer_id"]], count=1)
    rep = push(wh, spec, "salesforce", crm_sandbox)
    assert rep["updated"] == 248 and rep["failed"] == 2
    assert rep["failed_by_code"] == {"FIELD_CUSTOM_VALIDATION_EXCEPTION": 1, "REQUIRED_FIELD_MISSING": 1}
    rep2 = push(wh, spec, "salesforce", crm_sandbox, run_id="run-2")
    assert rep2["candidates"] == 2 and rep2["updated"] == 1 and rep2["rejected"] == 1  # cap reached
    assert log_counts(wh, "run-2") == {"updated": 1, "rejected": 1}
    rep3 = push(wh, spec, "salesforce", crm_sandbox, run_id="run-3")
    assert rep3["candidates"] == 0 and rep3["diff"]["capped"] == 1
    assert actual_sf(crm_sandbox) == {k: v for k, v in expected_sf(rows).items() if k != rows[-1]["customer_id"]}


def test_dry_run_reports_and_writes_nothing(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    spec = write_spec(tmp_path)
    write_predictions(wh, predictions(500))
    rep = push(wh, spec, "hubspot", crm_sandbox, dry_run=True)
    assert rep["status"] == "dry_run" and rep["would_create"] == 500 and rep["planned_calls"] == 5
    assert rep["api_left"] == 250_000 - 1 and rep["fits_budget"] and len(rep["samples"]) == 5
    assert "customer_id" in rep["schema"]["missing"] and rep["schema"]["created"] == []
    assert _writes(crm_sandbox, "hubspot") == 0 and log_counts(wh) == {}


def test_api_budget_cap_stops_cleanly_and_resumes(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 1000, share=0.5)
    crm_sandbox.seed("salesforce", "Contact", 1000)
    crm_sandbox.budget("salesforce", daily_limit=8)  # share 0.5 → 4 calls a day: describe + 3 × 200 records
    rep = push(wh, spec, "salesforce", crm_sandbox)
    assert rep["status"] == "budget_stopped" and rep["api_calls"] == 4 and rep["allowance"] == 3
    assert rep["updated"] == 600 and rep["deferred"] == 400
    assert crm_sandbox.requests()["salesforce"]["api_usage"] == 4
    crm_sandbox.budget("salesforce", daily_limit=1000, used=0)
    rep2 = push(wh, spec, "salesforce", crm_sandbox, run_id="run-2")
    assert rep2["status"] == "completed" and rep2["candidates"] == rep["deferred"]
    assert actual_sf(crm_sandbox) == expected_sf(rows)


def test_gate_blocks_push(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    spec = write_spec(tmp_path)
    write_predictions(wh, predictions(50))
    record_gate(wh, "crm_test", "score-1", "drift", "fail", "PSI 0.4 on mrr (policy block_push)")
    rep = push(wh, spec, "hubspot", crm_sandbox)
    assert rep["status"] == "blocked" and "drift gate is fail: PSI 0.4" in rep["note"]
    assert crm_sandbox.requests()["hubspot"]["requests"] == 0
    record_gate(wh, "crm_test", "score-2", "drift", "pass")
    assert push(wh, spec, "hubspot", crm_sandbox, run_id="run-2")["created"] == 50


def test_review_queue_holds_until_released(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    import pyarrow as pa

    spec, rows = staged(wh, tmp_path, 20, review=True)
    review = pa.table(
        {
            "customer_id": [rows[0]["customer_id"], rows[1]["customer_id"], rows[2]["customer_id"]],
            "status": ["pending", "approved", "rejected"],
            "run_id": ["score-1"] * 3,
        }
    )
    from opsloop.warehouse.base import TableRef

    wh.append(TableRef("ops_ai", "review_queue"), review)
    rep = push(wh, spec, "hubspot", crm_sandbox)
    assert rep["created"] == 18 and rep["held"] == 1 and rep["diff"]["review_rejected"] == 1
    assert log_counts(wh) == {"created": 18, "held": 1, "review_rejected": 1}
    assert rows[0]["customer_id"] not in actual_hs(crm_sandbox)
    wh.execute("UPDATE ops_ai.review_queue SET status = 'released' WHERE status = 'pending'")
    rep2 = push(wh, spec, "hubspot", crm_sandbox, run_id="run-2")
    assert rep2["created"] == 1 and rows[0]["customer_id"] in actual_hs(crm_sandbox)


def test_missing_salesforce_fields_are_named(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    spec = write_spec(tmp_path)
    write_predictions(wh, predictions(10))
    crm_sandbox.drop_fields("salesforce", "Contact", ["AI_Churn_Risk__c", "AI_Scored_At__c"])
    dry = push(wh, spec, "salesforce", crm_sandbox, dry_run=True)
    assert dry["schema"]["missing"] == ["AI_Churn_Risk__c", "AI_Scored_At__c"]
    assert "Contact.AI_Churn_Risk__c: Number(18, 6)" in dry["schema"]["instructions"]
    with pytest.raises(TerminalError, match=r"missing field\(s\) AI_Churn_Risk__c, AI_Scored_At__c"):
        push(wh, spec, "salesforce", crm_sandbox)
    assert _writes(crm_sandbox, "salesforce") == 0


def test_401_fails_fast_naming_the_block(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    spec = write_spec(tmp_path)
    write_predictions(wh, predictions(10))
    for crm in ("salesforce", "hubspot"):
        with pytest.raises(TerminalError, match=rf"opsloop-{crm}/sandbox: .* HTTP 401"):
            push(wh, spec, crm, crm_sandbox, token="expired-token")
        assert crm_sandbox.requests()[crm]["requests"] == 1


def test_hubspot_enumeration_gains_missing_options(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 60)
    only_none = [{"label": "none", "value": "none", "displayOrder": 0, "hidden": False}]
    crm_sandbox.add_fields(
        "hubspot",
        "contacts",
        [{"name": "ai_next_action", "type": "enumeration", "fieldType": "select", "options": only_none}],
    )
    rep = push(wh, spec, "hubspot", crm_sandbox)
    assert rep["schema"]["updated"] == ["ai_next_action"] and rep["created"] == 60
    props = {p["name"]: p for p in crm_sandbox.schema("hubspot", "contacts")}
    assert {o["value"] for o in props["ai_next_action"]["options"]} == {
        "none",
        "executive_call",
        "retention_offer",
        "check_in_email",
    }
    assert actual_hs(crm_sandbox) == expected_hs(rows)
