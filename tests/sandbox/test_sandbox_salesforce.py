"""The sandbox's Salesforce side, driven through the real simple-salesforce client."""

from __future__ import annotations

import csv
import io
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
)

from opsloop.crm.clients import salesforce_client
from sandbox.client import SandboxClient, SandboxServer


def test_query_pagination_and_watermark(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.seed("salesforce", "Contact", 4500, modstamp="2026-01-01T00:00:00Z", step_ms=1000)
    soql = "SELECT Id, Email, SystemModstamp FROM Contact WHERE SystemModstamp > 2026-01-01T00:16:39Z"
    first = sf_client.query(soql)
    assert first["totalSize"] == 3500 and first["done"] is False and len(first["records"]) == 2000
    assert first["nextRecordsUrl"].startswith("/services/data/v59.0/query/")
    rows = list(sf_client.query_all_iter(soql + " ORDER BY SystemModstamp"))
    assert len(rows) == 3500
    assert rows[0]["SystemModstamp"] == "2026-01-01T00:16:40.000+0000"
    assert rows[0]["attributes"]["type"] == "Contact"
    stamps = [r["SystemModstamp"] for r in rows]
    assert stamps == sorted(stamps)


def test_query_all_returns_deleted_rows(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.seed("salesforce", "Contact", 10)
    ids = [r["Id"] for r in crm_sandbox.records("salesforce", "Contact")][:3]
    crm_sandbox.delete("salesforce", "Contact", ids)
    live = sf_client.query_all("SELECT Id FROM Contact")
    every = sf_client.query_all("SELECT Id, IsDeleted FROM Contact", include_deleted=True)
    assert live["totalSize"] == 7 and every["totalSize"] == 10
    assert sorted(r["Id"] for r in every["records"] if r["IsDeleted"]) == sorted(ids)


def test_query_errors(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    with pytest.raises(SalesforceMalformedRequest, match=r"Nope__c"):
        sf_client.query("SELECT Id, Nope__c FROM Contact")
    with pytest.raises(SalesforceMalformedRequest, match="MALFORMED_QUERY"):
        sf_client.query("SELECT FROM Contact")


def test_upsert_create_update_and_errors(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    assert sf_client.Contact.upsert("Customer_Id__c/X1", {"LastName": "A", "AI_Churn_Risk__c": 0.25}) == 201
    assert sf_client.Contact.upsert("Customer_Id__c/x1", {"AI_Churn_Risk__c": 0.5}) == 200  # case-insensitive
    rec = crm_sandbox.by_key("salesforce", "Contact", "Customer_Id__c")["X1"]
    assert rec["AI_Churn_Risk__c"] == 0.5 and rec["LastName"] == "A"
    with pytest.raises(SalesforceMalformedRequest, match="Bogus__c"):
        sf_client.Contact.upsert("Customer_Id__c/X2", {"Bogus__c": 1})
    with pytest.raises(SalesforceMalformedRequest, match="REQUIRED_FIELD_MISSING"):
        sf_client.Contact.upsert("Customer_Id__c/X3", {"AI_Churn_Risk__c": 1})


def test_collections_upsert_limits_and_per_record_results(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.seed("salesforce", "Contact", 150)
    recs = [
        {"attributes": {"type": "Contact"}, "Customer_Id__c": f"C{i:07d}", "AI_Churn_Risk__c": i / 1000}
        for i in range(1, 201)
    ]
    out = sf_client.restful(
        "composite/sobjects/Contact/Customer_Id__c", method="PATCH", json={"allOrNone": False, "records": recs}
    )
    assert len(out) == 200
    assert sum(r["success"] for r in out) == 150  # 50 new contacts lack LastName
    assert {e["statusCode"] for r in out if not r["success"] for e in r["errors"]} == {"REQUIRED_FIELD_MISSING"}
    assert all(r["created"] is False for r in out if r["success"])
    with pytest.raises(SalesforceMalformedRequest, match="EXCEEDED_ID_LIMIT"):
        sf_client.restful(
            "composite/sobjects/Contact/Customer_Id__c",
            method="PATCH",
            json={"allOrNone": False, "records": recs + recs[:1]},
        )


def test_bulk2_lifecycle_with_results(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.seed("salesforce", "Contact", 5)
    crm_sandbox.settings(bulk_inprogress_polls=2)
    data = "Customer_Id__c,AI_Churn_Risk__c,AI_Next_Action__c\nC0000001,0.9,#N/A\nC0000002,,call\nNEW,0.1,x\n"
    res = sf_client.bulk2.Contact.upsert(csv_file=_tmp(data), external_id_field="Customer_Id__c", wait=0.05)
    assert res[0]["numberRecordsProcessed"] == 3 and res[0]["numberRecordsFailed"] == 1
    ok = list(csv.DictReader(io.StringIO(sf_client.bulk2.Contact.get_successful_records(res[0]["job_id"]))))
    bad = list(csv.DictReader(io.StringIO(sf_client.bulk2.Contact.get_failed_records(res[0]["job_id"]))))
    assert [r["Customer_Id__c"] for r in ok] == ["C0000001", "C0000002"] and ok[0]["sf__Created"] == "false"
    assert bad[0]["Customer_Id__c"] == "NEW" and bad[0]["sf__Error"].startswith("REQUIRED_FIELD_MISSING")
    recs = crm_sandbox.by_key("salesforce", "Contact", "Customer_Id__c")
    assert recs["C0000001"]["AI_Churn_Risk__c"] == 0.9 and "AI_Next_Action__c" not in recs["C0000001"]
    assert "AI_Churn_Risk__c" not in recs["C0000002"] and recs["C0000002"]["AI_Next_Action__c"] == "call"
    polls = crm_sandbox.requests()["salesforce"]["routes"]["sf.bulk_get"]
    assert polls == 4  # 2 × InProgress, JobComplete, final read


def test_external_id_index_follows_every_kind_of_write(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    """Upserts that only set other fields keep the key index as it was; a write that changes the
    external id moves the record's index entry; records sharing an id are reported in id order."""
    crm_sandbox.seed("salesforce", "Contact", 3)
    data = "Customer_Id__c,AI_Churn_Risk__c\nc0000001,0.5\nC0000002,0.25\n"
    res = sf_client.bulk2.Contact.upsert(csv_file=_tmp(data), external_id_field="Customer_Id__c", wait=0.05)
    assert res[0]["numberRecordsFailed"] == 0
    recs = crm_sandbox.by_key("salesforce", "Contact", "Customer_Id__c")
    assert len(recs) == 3 and recs["C0000001"]["AI_Churn_Risk__c"] == 0.5  # stored value kept, not lower-cased
    sf_client.Contact.update(recs["C0000002"]["Id"], {"Customer_Id__c": "Z9"})
    assert sf_client.Contact.upsert("Customer_Id__c/z9", {"AI_Churn_Risk__c": 0.75}) == 200  # found by its new id
    with pytest.raises(SalesforceMalformedRequest, match="REQUIRED_FIELD_MISSING"):  # the old id matches nothing
        sf_client.Contact.upsert("Customer_Id__c/C0000002", {"AI_Churn_Risk__c": 0.1})
    twins = crm_sandbox.load("salesforce", "Contact", [{"LastName": "T", "Customer_Id__c": "DUP"}] * 2)
    out = sf_client.restful(
        "composite/sobjects/Contact/Customer_Id__c",
        method="PATCH",
        json={"allOrNone": False, "records": [{"attributes": {"type": "Contact"}, "Customer_Id__c": "dup"}]},
    )
    assert out[0]["errors"][0]["statusCode"] == "DUPLICATE_EXTERNAL_ID"
    assert str(sorted(twins)) in out[0]["errors"][0]["message"]
    after = {r["Id"]: r for r in crm_sandbox.records("salesforce", "Contact")}
    assert after[recs["C0000002"]["Id"]]["Customer_Id__c"] == "Z9"
    assert after[recs["C0000002"]["Id"]]["AI_Churn_Risk__c"] == 0.75


def test_bulk2_unknown_column_fails_job(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    job = sf_client.restful(
        "jobs/ingest",
        method="POST",
        json={
            "object": "Contact",
            "operation": "upsert",
            "externalIdFieldName": "Customer_Id__c",
            "contentType": "CSV",
        },
    )
    sf_client.session.put(
        f"{sf_client.base_url}jobs/ingest/{job['id']}/batches",
        data=b"Customer_Id__c,Nope__c\nA,1\n",
        headers={**sf_client.headers, "Content-Type": "text/csv"},
    ).raise_for_status()
    sf_client.restful(f"jobs/ingest/{job['id']}", method="PATCH", json={"state": "UploadComplete"})
    info = sf_client.restful(f"jobs/ingest/{job['id']}")
    assert info["state"] == "Failed" and "Nope__c" in info["errorMessage"]
    unprocessed = sf_client.session.get(
        f"{sf_client.base_url}jobs/ingest/{job['id']}/unprocessedRecords", headers=sf_client.headers
    ).text
    assert "A,1" in unprocessed


def test_limit_header_budget_and_auth(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    sf_client.query("SELECT Id FROM Contact")
    assert sf_client.api_usage["api-usage"].used == 1
    crm_sandbox.budget("salesforce", daily_limit=10, used=10)
    with pytest.raises(SalesforceRefusedRequest, match="REQUEST_LIMIT_EXCEEDED"):
        sf_client.query("SELECT Id FROM Contact")
    bad = salesforce_client(crm_sandbox.url, "wrong-token")
    with pytest.raises(SalesforceExpiredSession, match="INVALID_SESSION_ID"):
        bad.query("SELECT Id FROM Contact")


def test_fault_injection_skip_count_and_body(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.fault(r"/query", method="GET", status=503, count=2, skip=1)
    sf_client.query("SELECT Id FROM Contact")
    for _ in range(2):
        with pytest.raises(SalesforceGeneralError) as info:
            sf_client.query("SELECT Id FROM Contact")
        assert info.value.status == 503
    sf_client.query("SELECT Id FROM Contact")
    log = crm_sandbox.requests(log=10)["log"]
    assert [e["status"] for e in log] == [200, 503, 503, 200] and [e["injected"] for e in log][1:3] == [True, True]


def test_tls_with_generated_certificate(crm_sandbox_tls: SandboxClient) -> None:
    crm_sandbox_tls.seed("salesforce", "Contact", 3)
    sf = salesforce_client(
        crm_sandbox_tls.url, crm_sandbox_tls.salesforce_token, verify=str(crm_sandbox_tls.http.verify)
    )
    assert sf.query("SELECT Id FROM Contact")["totalSize"] == 3


def test_a_tls_sandbox_stops_cleanly_while_a_client_holds_a_connection(tmp_path: Path) -> None:
    """An idle TLS keep-alive connection used to hold the server until SandboxServer.stop killed it
    (10 s, and the state flush on shutdown skipped)."""
    server = SandboxServer.start(tmp_path / "state", tls=True)
    try:
        sbx = server.client()
        sbx.seed("salesforce", "Contact", 2)
        sf = salesforce_client(sbx.url, sbx.salesforce_token, verify=str(sbx.http.verify))
        assert sf.query("SELECT Id FROM Contact")["totalSize"] == 2  # its pooled connection stays open
        started = time.monotonic()
        server.stop()
        # uvicorn re-raises the SIGTERM once shut down; a kill would be -SIGKILL
        assert server.process.returncode == -signal.SIGTERM and time.monotonic() - started < 5
        server.restart()
        assert server.client().requests()["salesforce"]["api_usage"] == 1
    finally:
        server.stop()


def test_state_survives_restart(crm_sandbox_server: Any, crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.seed("salesforce", "Contact", 20)
    sf_client.query("SELECT Id FROM Contact")
    crm_sandbox_server.restart()
    assert crm_sandbox.count("salesforce", "Contact") == 20
    assert crm_sandbox.requests()["salesforce"]["api_usage"] == 1


def _tmp(text: str) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
    f.write(text)
    f.close()
    return f.name


def test_an_older_state_file_loses_its_modstamp_index(tmp_path: Any) -> None:
    """Writes no longer keep a modstamp index in step (see sandbox/store.py); a state file written
    by an older sandbox has one, and opening it drops it — its records and their order stay."""
    import sqlite3

    from sandbox.store import Store

    store = Store(tmp_path)
    store.con.execute("CREATE INDEX records_mod ON records(vendor, object, modstamp, rid)")
    store.con.execute(
        "INSERT INTO records(vendor, object, id, created, modstamp, deleted, data) "
        "VALUES ('salesforce', 'Contact', '003A', 1, 2, 0, '{\"LastName\": \"A\"}')"
    )
    store.close()
    reopened = Store(tmp_path)
    try:
        indexes = {r[0] for r in reopened.con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "records_mod" not in indexes and "records_id" in indexes
        assert [r.data for r in reopened.select("salesforce", "Contact", "AND modstamp > ?", (1,), "modstamp")] == [
            {"LastName": "A"}
        ]
    finally:
        reopened.close()
    assert sqlite3.connect(tmp_path / "sandbox.sqlite3").execute("SELECT count(*) FROM records").fetchone() == (1,)
