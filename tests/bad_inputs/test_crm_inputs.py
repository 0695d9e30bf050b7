"""Bad answers from the CRMs, through the real vendor clients against the sandbox: an expired token on
the source side, a 429 storm that never ends, a 5xx burst mid-pagination, a Bulk 2.0 job that ends
``Failed``. (The push-side 401, the recovering 429/5xx storms and the 207 partial failure are proven
in tests/crm and tests/flows — see docs/reliability.md.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from opsloop.crm.clients import hubspot_client, salesforce_client
from opsloop.crm.retry import RetryPolicy
from opsloop.errors import TerminalError, TransientError
from opsloop.ingest import ingest_source
from opsloop.sources.hubspot import HubSpotSource
from opsloop.sources.salesforce import SalesforceSource
from opsloop.spec import PipelineSpec, parse_spec
from opsloop.warehouse.base import TableRef
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
    sync_state,
    write_predictions,
    write_spec,
)

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, retry_after_cap=0.1)
CONTACTS = TableRef("crm", "contacts")


def _crm_spec(vendor: str) -> PipelineSpec:
    obj = "Contact" if vendor == "salesforce" else "contacts"
    return parse_spec(
        {
            "name": "bi_crm",
            "sources": [
                {
                    "id": "crm",
                    "type": "crm",
                    "vendor": vendor,
                    "connection": f"opsloop-{vendor}/sandbox",
                    "objects": [
                        {
                            "name": obj,
                            "primaryKey": ["contact_id"],
                            "columns": ["Email"] if vendor == "salesforce" else ["email"],
                        }
                    ],
                    "sync": {"strategy": "watermark", "watermarkField": "updated_at"},
                }
            ],
            "destinations": [
                {
                    "type": "warehouse",
                    "stream": f"crm.{obj}",
                    "dataset": "crm",
                    "table": "contacts",
                    "mergeKeys": ["contact_id"],
                    "orderBy": "updated_at",
                }
            ],
        }
    )


def _reader(vendor: str, spec: PipelineSpec, sbx: SandboxClient, token: str) -> Any:
    block = f"opsloop-{vendor}/sandbox"
    if vendor == "salesforce":
        return SalesforceSource(spec, spec.sources[0], salesforce_client(sbx.url, token, timeout=(5, 30)), block, FAST)
    client = hubspot_client(token, sbx.url, timeout=(5, 30))
    return HubSpotSource(spec, spec.sources[0], client, block, FAST, searches_per_second=100)


@pytest.mark.parametrize("vendor", ["salesforce", "hubspot"])
def test_expired_token_on_the_source_fails_fast_naming_the_block(
    wh: DuckDBAdapter, crm_sandbox: SandboxClient, vendor: str
) -> None:
    """BI-23: a revoked token on ingest → TerminalError naming the block and HTTP 401 after exactly one
    request (no retries), nothing written."""
    obj = "Contact" if vendor == "salesforce" else "contacts"
    crm_sandbox.seed(vendor, obj, 5)
    spec = _crm_spec(vendor)
    with pytest.raises(TerminalError) as err:
        ingest_source(wh, spec, spec.sources[0], _reader(vendor, spec, crm_sandbox, "expired-token"), "r1")
    name = "Salesforce" if vendor == "salesforce" else "HubSpot"
    assert str(err.value).startswith(f"opsloop-{vendor}/sandbox: {name} ") and " failed: HTTP 401 " in str(err.value)
    assert crm_sandbox.requests()[vendor]["requests"] == 1
    assert wh.table_schema(CONTACTS) is None


def test_salesforce_5xx_burst_mid_pagination_lands_every_row_once(
    wh: DuckDBAdapter, crm_sandbox: SandboxClient
) -> None:
    """BI-25: three 503s on the second page of a paged query: retried per call, every record lands
    exactly once (no page twice, none skipped)."""
    crm_sandbox.settings(query_batch_size=200)
    crm_sandbox.seed("salesforce", "Contact", 700, modstamp="2026-10-01T00:00:00Z", step_ms=10)
    crm_sandbox.fault(r"/queryAll/01g", method="GET", status=503, count=3, skip=1)
    spec = _crm_spec("salesforce")
    out = ingest_source(
        wh, spec, spec.sources[0], _reader("salesforce", spec, crm_sandbox, crm_sandbox.salesforce_token), "r1"
    )
    assert (out["rows_read"], out["inserted"], out["api_retries"]) == (700, 700, 3)
    assert wh.query("SELECT count(DISTINCT contact_id) AS n FROM crm.contacts").to_pylist() == [{"n": 700}]
    assert crm_sandbox.requests()["salesforce"]["status"]["503"] == 3


def test_429_storm_that_never_ends_fails_transient_then_the_rerun_is_exact(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    """BI-24: HubSpot answers every batch upsert with 429: the push gives up as a TransientError naming
    the block and the call (so the task may retry later), marks nothing as pushed; once the storm is
    over the rerun pushes every record exactly once."""
    spec = write_spec(tmp_path)
    rows = predictions(250)
    write_predictions(wh, rows)
    storm = {"status": "error", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING", "message": "slow down"}
    crm_sandbox.fault("/batch/upsert", method="POST", status=429, body=storm, headers={"Retry-After": "0"}, count=-1)
    with pytest.raises(TransientError) as err:
        push(wh, spec, "hubspot", crm_sandbox)
    assert str(err.value) == (
        "opsloop-hubspot/sandbox: HubSpot batch upsert contacts (100 records) still failing after 8 attempt(s): "
        "HTTP 429 TEN_SECONDLY_ROLLING: slow down"
    )
    assert sync_state(wh, "hubspot.contacts") == {} and log_counts(wh) == {}
    runs = wh.query("SELECT status, note FROM opsloop_meta._sync_runs").to_pylist()
    assert runs[0]["status"] == "failed" and "still failing after 8 attempt(s)" in runs[0]["note"]
    assert actual_hs(crm_sandbox) == {}
    crm_sandbox.clear_faults()
    rep = push(wh, spec, "hubspot", crm_sandbox, run_id="run-2")
    assert (rep["created"], rep["failed"]) == (250, 0) and actual_hs(crm_sandbox) == expected_hs(rows)
    assert log_counts(wh) == {"created": 250}


def test_bulk_job_that_ends_failed_records_every_row_and_is_retried(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    """BI-26: a field is deleted between the schema check and the Bulk 2.0 job, so the job ends
    ``Failed`` (InvalidBatch): every record is logged failed with the job's message naming the field,
    nothing enters the sync state, no value changed; after the field is back the rerun lands all."""
    spec = write_spec(tmp_path, bulk=100)
    rows = predictions(150)
    write_predictions(wh, rows)
    crm_sandbox.seed("salesforce", "Contact", 150)
    sf = salesforce_client(crm_sandbox.url, crm_sandbox.salesforce_token)
    describe = sf.restful("sobjects/Contact/describe/")  # what the sink reads … just before an admin
    crm_sandbox.drop_fields("salesforce", "Contact", ["AI_Risk_Bucket__c"])  # … deletes a field
    crm_sandbox.fault(r"/sobjects/Contact/describe", method="GET", status=200, body=describe, count=1)
    rep = push(wh, spec, "salesforce", crm_sandbox)
    (job,) = crm_sandbox.jobs()
    assert job["state"] == "Failed" and job["errorMessage"] == "InvalidBatch : Field name not found : AI_Risk_Bucket__c"
    assert (rep["updated"], rep["failed"], rep["failed_by_code"]) == (0, 150, {"BULK_JOB_FAILED": 150})
    logged = wh.query(
        "SELECT error_code, error_message, count(*) AS n FROM opsloop_meta._sync_log GROUP BY ALL"
    ).to_pylist()
    assert logged == [
        {
            "error_code": "BULK_JOB_FAILED",
            "error_message": "InvalidBatch : Field name not found : AI_Risk_Bucket__c",
            "n": 150,
        }
    ]
    assert sync_state(wh, "salesforce.Contact") == {}
    assert {v[0] for v in actual_sf(crm_sandbox).values()} == {None}  # nothing half-written
    crm_sandbox.add_fields("salesforce", "Contact", [{"name": "AI_Risk_Bucket__c", "type": "string"}])
    again = push(wh, spec, "salesforce", crm_sandbox, run_id="run-2")
    assert (again["candidates"], again["updated"], again["failed"]) == (150, 150, 0)
    assert actual_sf(crm_sandbox) == expected_sf(rows)


def test_salesforce_collections_partial_failure_records_each_and_retries_only_those(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    """BI-32: sObject Collections answers 200 with per-record errors (Salesforce's 207): the two rejected
    records are logged with the vendor's code and message and kept out of the sync state; the next
    run re-sends only those two."""
    spec = write_spec(tmp_path)
    rows = predictions(150)
    write_predictions(wh, rows)
    crm_sandbox.seed("salesforce", "Contact", 150)
    bad = [rows[3]["customer_id"], rows[120]["customer_id"]]
    crm_sandbox.fail_records(
        "salesforce",
        "Contact",
        "Customer_Id__c",
        values=bad,
        error_code="INVALID_FIELD",
        message="bad value for AI_Churn_Risk__c",
        count=2,
    )
    rep = push(wh, spec, "salesforce", crm_sandbox)
    assert (rep["updated"], rep["failed"], rep["failed_by_code"]) == (148, 2, {"INVALID_FIELD": 2})
    logged = wh.query(
        "SELECT entity, error_code, error_message FROM opsloop_meta._sync_log WHERE status = 'failed' ORDER BY entity"
    ).to_pylist()
    assert logged == [
        {"entity": e, "error_code": "INVALID_FIELD", "error_message": "bad value for AI_Churn_Risk__c"}
        for e in sorted(bad)
    ]
    assert set(sync_state(wh, "salesforce.Contact")) == {r["customer_id"] for r in rows} - set(bad)
    again = push(wh, spec, "salesforce", crm_sandbox, run_id="run-2")
    assert (again["candidates"], again["updated"], again["failed"]) == (2, 2, 0)
    assert actual_sf(crm_sandbox) == expected_sf(rows)
