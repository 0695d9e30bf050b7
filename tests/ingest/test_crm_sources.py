"""Salesforce and HubSpot sources through the real client libraries against the CRM sandbox."""

from __future__ import annotations

import time
from typing import Any

import pytest

from opsloop.crm.retry import RetryPolicy
from opsloop.ingest import ingest_source
from opsloop.sources.hubspot import HubSpotSource
from opsloop.sources.salesforce import SalesforceSource
from opsloop.spec import PipelineSpec, parse_spec
from opsloop.warehouse.base import TableRef

BASE = "2026-10-01T00:00:00Z"


def crm_spec(vendor: str, obj: str, columns: list[str] | None = None, pii: bool = False) -> PipelineSpec:
    o: dict[str, Any] = {"name": obj, "primaryKey": ["contact_id"]}
    if columns:
        o["columns"] = columns
    transform: dict[str, Any] = {}
    if pii:
        transform["pii"] = {"mask": ["email"], "hash": ["email"], "saltSecretRef": "secret/s"}
    return parse_spec(
        {
            "name": "crm",
            "sources": [
                {
                    "id": "crm",
                    "type": "crm",
                    "vendor": vendor,
                    "connection": f"opsloop-{vendor}/sandbox",
                    "objects": [o],
                    "sync": {"strategy": "watermark", "watermarkField": "updated_at", "lag": "1s"},
                }
            ],
            "transform": transform,
            "destinations": [
                {"type": "warehouse", "stream": f"crm.{obj}", "dataset": "crm", "table": "contacts",
                 "mergeKeys": ["contact_id"], "orderBy": "updated_at"}
            ],
        }
    )  # fmt: skip


FAST = RetryPolicy(base_delay=0.05, max_delay=0.2, retry_after_cap=5)


def _run(wh, spec, reader, run_id="r1", **kw):
    return ingest_source(wh, spec, spec.sources[0], reader, run_id, salt=b"s", **kw)


def _count(wh, where: str = "") -> int:
    return int(wh.query(f"SELECT count(*) AS n FROM crm.contacts {where}").to_pylist()[0]["n"])


def test_salesforce_pages_changes_and_deletes(wh, crm_sandbox, sf_client) -> None:
    crm_sandbox.settings(query_batch_size=1000)
    crm_sandbox.seed("salesforce", "Contact", 2500, modstamp=BASE, step_ms=10)
    spec = crm_spec("salesforce", "Contact", ["FirstName", "LastName", "Email", "Customer_Id__c"], pii=True)
    first = _run(wh, spec, SalesforceSource(spec, spec.sources[0], sf_client, "opsloop-salesforce/sandbox"))
    assert (first["rows_read"], first["inserted"]) == (2500, 2500)
    routes = crm_sandbox.requests(vendor="salesforce")["salesforce"]["routes"]
    assert routes.get("sf.query_more", 0) >= 2  # 2500 rows in pages of 1000
    row = wh.query("SELECT * FROM crm.contacts WHERE customer_id__c = 'C0000007'").to_pylist()[0]
    assert row["email"].count("***@") == 1 and len(row["email_hash"]) == 64 and row["contact_id"]
    wm = wh.get_state("crm", "crm.Contact")["watermark"]
    assert wm.isoformat().startswith("2026-10-01T00:00:24.99")

    ids = [r["Id"] for r in crm_sandbox.records("salesforce", "Contact", limit=5)]
    sf_client.Contact.update(ids[0], {"LastName": "Changed"})
    crm_sandbox.delete("salesforce", "Contact", ids[1:3])
    second = _run(wh, spec, SalesforceSource(spec, spec.sources[0], sf_client, "opsloop-salesforce/sandbox"), "r2")
    assert (second["updated"], second["deleted"], second["inserted"]) == (1, 2, 0)
    # the 3 changes + the 200 records stamped in the lag second before the watermark (SOQL floors to 1 s)
    assert second["rows_read"] == 3 + 200
    assert _count(wh) == 2498
    assert wh.query(f"SELECT lastname FROM crm.contacts WHERE contact_id = '{ids[0]}'").to_pylist() == [
        {"lastname": "Changed"}
    ]


def test_salesforce_429_with_retry_after_is_waited_out(wh, crm_sandbox, sf_client) -> None:
    crm_sandbox.seed("salesforce", "Contact", 30, modstamp=BASE, step_ms=10)
    crm_sandbox.fault(
        path="query", method="GET", status=429, headers={"Retry-After": "1"}, count=1, vendor="salesforce"
    )
    spec = crm_spec("salesforce", "Contact", ["LastName"])
    started = time.monotonic()
    out = _run(wh, spec, SalesforceSource(spec, spec.sources[0], sf_client, "opsloop-salesforce/sandbox", FAST))
    assert time.monotonic() - started >= 1.0
    assert out["inserted"] == 30 and out["api_retries"] == 1
    assert crm_sandbox.requests(vendor="salesforce")["salesforce"]["status"].get("429") == 1


def _hs(spec, client, rate: float = 100.0) -> HubSpotSource:
    return HubSpotSource(spec, spec.sources[0], client, "opsloop-hubspot/sandbox", FAST, searches_per_second=rate)


@pytest.mark.slow
def test_hubspot_search_rewindows_past_the_10k_cap(wh, crm_sandbox, hs_client) -> None:
    crm_sandbox.seed("hubspot", "contacts", 10_450, modstamp=BASE, step_ms=5)
    spec = crm_spec("hubspot", "contacts", ["email", "firstname", "lastname"])
    reader = _hs(spec, hs_client)
    out = _run(wh, spec, reader)
    assert out["inserted"] == 10_450 and _count(wh) == 10_450
    assert reader.windows == 2  # 10,000 in the first window, the rest from its last stamp on
    stats = crm_sandbox.requests(vendor="hubspot")["hubspot"]
    assert stats["status"].get("400", 0) == 0 and stats["routes"]["hs.search"] >= 53


def test_hubspot_incremental_changes_archives_and_429(wh, crm_sandbox, hs_client) -> None:
    crm_sandbox.seed("hubspot", "contacts", 450, modstamp=BASE, step_ms=5)
    spec = crm_spec("hubspot", "contacts", ["email", "firstname"])
    first = _run(wh, spec, _hs(spec, hs_client))
    assert first["inserted"] == 450
    assert crm_sandbox.requests(vendor="hubspot")["hubspot"]["routes"]["hs.search"] == 3  # 200 + 200 + 50
    recs = crm_sandbox.records("hubspot", "contacts", limit=3)
    ids = [r["id"] for r in recs]
    hs_client.crm.contacts.basic_api.update(ids[0], {"properties": {"firstname": "Renamed"}})
    crm_sandbox.delete("hubspot", "contacts", [ids[1]])
    crm_sandbox.fault(path="search", method="POST", status=429, headers={"Retry-After": "1"}, count=1, vendor="hubspot")
    started = time.monotonic()
    second = _run(wh, spec, _hs(spec, hs_client), "r2")
    assert time.monotonic() - started >= 1.0 and second["api_retries"] == 1
    assert (second["updated"], second["deleted"]) == (1, 1)
    assert _count(wh) == 449
    assert wh.query(f"SELECT firstname FROM crm.contacts WHERE contact_id = '{ids[0]}'").to_pylist() == [
        {"firstname": "Renamed"}
    ]


def test_hubspot_search_is_throttled(crm_sandbox, hs_client, wh) -> None:
    crm_sandbox.seed("hubspot", "contacts", 650, modstamp=BASE, step_ms=5)
    spec = crm_spec("hubspot", "contacts", ["email"])
    started = time.monotonic()
    _run(wh, spec, _hs(spec, hs_client, rate=5.0))  # 4 search pages at ≤ 5 per second
    assert time.monotonic() - started >= 0.6


def test_hubspot_source_keeps_under_the_rate_window(wh, crm_sandbox, hs_client) -> None:
    """Every call of an incremental read — the properties read, the search pages and the archived
    pages — is paced under the window HubSpot's answers announce (here 5 requests per rolling second,
    429s without Retry-After), so none is refused and nothing is retried."""
    crm_sandbox.seed("hubspot", "contacts", 450, modstamp=BASE, step_ms=5)
    spec = crm_spec("hubspot", "contacts", ["email"])
    assert _run(wh, spec, _hs(spec, hs_client))["inserted"] == 450
    gone = [r["id"] for r in crm_sandbox.records("hubspot", "contacts", limit=350)]
    crm_sandbox.delete("hubspot", "contacts", gone)  # four archived pages of 100
    crm_sandbox.rate_limit(5, window_ms=1000, retry_after=False)
    before = crm_sandbox.requests(vendor="hubspot")["hubspot"]["requests"]
    reader = _hs(spec, hs_client)
    started = time.monotonic()
    out = _run(wh, spec, reader, "r2")
    took = time.monotonic() - started
    stats = crm_sandbox.requests(vendor="hubspot")["hubspot"]
    calls = stats["requests"] - before  # the properties read, 1-2 search pages, 4 archived pages
    assert stats["status"].get("429", 0) == 0 and out["api_retries"] == 0
    assert out["deleted"] == 350 and _count(wh) == 100
    assert calls >= 6 and reader.pacer.paced > 0 and took >= calls / 5 - 1  # waited, not refused


def test_shipped_spec_crm_contacts_source_loads_all_properties(wh, crm_sandbox, hs_client) -> None:
    from pathlib import Path

    from opsloop.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "customer_ops_ai.yaml")
    src = spec.source("crm_contacts")
    crm_sandbox.seed("hubspot", "contacts", 25, modstamp=BASE, step_ms=1000)
    reader = HubSpotSource(spec, src, hs_client, "opsloop-hubspot/sandbox", FAST, searches_per_second=100)
    out = ingest_source(wh, spec, src, reader, "r1", salt=b"s")
    assert out["inserted"] == 25
    cols = wh.table_schema(TableRef("ops_ai", "crm_contacts"))
    names = cols.names if cols else []
    assert {"contact_id", "updated_at", "email", "email_hash", "firstname"} <= set(names)
    emails = [r["email"] for r in wh.query("SELECT email FROM ops_ai.crm_contacts").to_pylist()]
    assert all(e.startswith("c***@") for e in emails)  # the spec's pii section masks CRM e-mails too
