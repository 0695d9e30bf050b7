"""The reverse-ETL round trip a data team runs against its own CRM before going live.

One test, three targets: the local CRM sandbox (always), and — marked ``remote`` — a real
Salesforce org and a real HubSpot portal when their credentials are in the environment. The client
comes from the credentials *block* (built, not saved), as a flow run gets it. The test creates its own
records (ids ``opsloop-live-<random>-<n>``), touches nothing else, and deletes them at the end.

Salesforce (``OPSLOOP_SF_INSTANCE_URL`` + ``OPSLOOP_SF_SESSION_ID``, or ``OPSLOOP_SF_CLIENT_ID`` +
``OPSLOOP_SF_CLIENT_SECRET`` + ``OPSLOOP_SF_REFRESH_TOKEN`` [+ ``OPSLOOP_SF_LOGIN_URL``, e.g.
https://test.salesforce.com]): Contact needs the fields the demo pipeline maps — ``Customer_Id__c``
(text, external id, unique), ``AI_Churn_Risk__c`` (number, 6 decimals), ``AI_Next_Action__c``,
``AI_Risk_Bucket__c`` (text) and ``AI_Scored_At__c`` (date/time); the test fails naming any that is
missing. HubSpot (``OPSLOOP_HS_TOKEN``, a private app with contacts read/write and schema
read/write; [+ ``OPSLOOP_HS_BASE_URL``]): the push creates the properties it lacks.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.crm import HubSpotCredentials, SalesforceCredentials, local_crm_documents
from opsloop.crm.retry import RetryPolicy
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient
from tests.crm.helpers import expected, log_counts, predictions, push, write_predictions, write_spec

SF_FIELDS = ("AI_Churn_Risk__c", "AI_Next_Action__c", "AI_Risk_Bucket__c", "AI_Scored_At__c")
HS_PROPS = ("ai_churn_risk", "ai_next_action", "ai_risk_bucket", "ai_scored_at")
N = 6


def _env(*names: str) -> dict[str, str] | None:
    values = {n: os.environ.get(n, "") for n in names}
    return values if all(values.values()) else None


def _salesforce_block() -> SalesforceCredentials | None:
    session = _env("OPSLOOP_SF_INSTANCE_URL", "OPSLOOP_SF_SESSION_ID")
    if session:
        return SalesforceCredentials(
            instance_url=session["OPSLOOP_SF_INSTANCE_URL"], session_id=SecretStr(session["OPSLOOP_SF_SESSION_ID"])
        )
    oauth = _env("OPSLOOP_SF_CLIENT_ID", "OPSLOOP_SF_CLIENT_SECRET", "OPSLOOP_SF_REFRESH_TOKEN")
    if oauth:
        return SalesforceCredentials(
            client_id=SecretStr(oauth["OPSLOOP_SF_CLIENT_ID"]),
            client_secret=SecretStr(oauth["OPSLOOP_SF_CLIENT_SECRET"]),
            refresh_token=SecretStr(oauth["OPSLOOP_SF_REFRESH_TOKEN"]),
            login_url=os.environ.get("OPSLOOP_SF_LOGIN_URL", "https://login.salesforce.com"),
        )
    return None


def _hubspot_block() -> HubSpotCredentials | None:
    token = os.environ.get("OPSLOOP_HS_TOKEN")
    if not token:
        return None
    return HubSpotCredentials(
        access_token=SecretStr(token), base_url=os.environ.get("OPSLOOP_HS_BASE_URL", "https://api.hubapi.com")
    )


@dataclass
class LiveCrm:
    """One CRM to run the round trip against: its block's client and the record-level calls the
    test makes itself (to set up, read back and clean up — never through opsloop's code)."""

    crm: str
    client: Any
    remote: bool

    def prepare(self, ids: list[str]) -> None:
        """Salesforce: the Contacts exist before the push, as CRM users' records do (LastName is
        required to create one). HubSpot: nothing — the upsert creates them."""
        if self.crm == "salesforce":
            for i in ids:
                self.client.Contact.upsert(f"Customer_Id__c/{i}", {"LastName": f"opsloop live test {i}"})

    def _found(self, ids: list[str]) -> list[dict[str, Any]]:
        """The test's records the CRM holds, looked up by the external id: ``id`` (the CRM's), ``key``
        (ours) and the four AI fields in the order of :data:`SF_FIELDS` / :data:`HS_PROPS`."""
        if self.crm == "salesforce":
            quoted = ", ".join(f"'{i}'" for i in ids)
            soql = f"SELECT Id, Customer_Id__c, {', '.join(SF_FIELDS)} FROM Contact WHERE Customer_Id__c IN ({quoted})"
            return [
                {"id": r["Id"], "key": r["Customer_Id__c"], "values": [r[f] for f in SF_FIELDS]}
                for r in self.client.query_all(soql)["records"]
            ]
        from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId

        batch = self.client.crm.contacts.batch_api.read(
            BatchReadInputSimplePublicObjectId(
                id_property="customer_id", inputs=[{"id": i} for i in ids], properties=["customer_id", *HS_PROPS]
            )
        )
        return [
            {"id": r.id, "key": r.properties["customer_id"], "values": [r.properties.get(p) for p in HS_PROPS]}
            for r in batch.results
        ]

    def read(self, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """(churn risk, next action, bucket, scored-at epoch seconds) per id found."""
        return {r["key"]: _values(*r["values"]) for r in self._found(ids)}

    def cleanup(self, ids: list[str]) -> None:
        delete = self.client.Contact.delete if self.crm == "salesforce" else self.client.crm.contacts.basic_api.archive
        for r in self._found(ids):
            delete(r["id"])


def _values(risk: Any, action: Any, bucket: Any, scored: Any) -> tuple[Any, ...]:
    """Both CRMs' answers in one form: HubSpot gives numbers as text, each its own timestamp format."""
    at = None
    if scored:
        text = str(scored).replace("Z", "+00:00")
        text = text[:-2] + ":" + text[-2:] if text[-5] in "+-" and ":" not in text[-5:] else text
        at = datetime.fromisoformat(text).timestamp()
    return (None if risk in (None, "") else round(float(risk), 6), action, bucket, at)


def _apis(wh: DuckDBAdapter, run_id: str) -> set[str]:
    rows = wh.query("SELECT DISTINCT api FROM opsloop_meta._sync_log WHERE run_id = $r", {"r": run_id}).to_pylist()
    return {r["api"] for r in rows}


@pytest.fixture(
    params=[
        "salesforce-sandbox",
        "hubspot-sandbox",
        pytest.param("salesforce-remote", marks=pytest.mark.remote),
        pytest.param("hubspot-remote", marks=pytest.mark.remote),
    ]
)
def live(request: pytest.FixtureRequest) -> Iterator[LiveCrm]:
    crm, where = request.param.split("-")
    block: SalesforceCredentials | HubSpotCredentials | None
    if where == "sandbox":
        sbx: SandboxClient = request.getfixturevalue("crm_sandbox")
        doc = local_crm_documents(sbx.url)[f"opsloop-{crm}/sandbox"]
        assert isinstance(doc, SalesforceCredentials | HubSpotCredentials)
        block = doc
    else:
        block = _salesforce_block() if crm == "salesforce" else _hubspot_block()
        if block is None:
            need = "OPSLOOP_SF_* (see the module docstring)" if crm == "salesforce" else "OPSLOOP_HS_TOKEN"
            vendor = "Salesforce org" if crm == "salesforce" else "HubSpot portal"
            pytest.skip(f"remote: set {need} to run the round trip against a real {vendor}")
    yield LiveCrm(crm, block.get_client(), remote=where == "remote")


def test_round_trip_lands_exactly_reruns_idle_and_cleans_up(live: LiveCrm, tmp_path: Path) -> None:
    """Push 6 new predictions (Salesforce: one Bulk 2.0 job), read them back from the CRM, rerun
    with no change (nothing sent but the schema read), change 2 (Salesforce: sObject Collections),
    read again; the test's records are deleted at the end, and found gone."""
    ids = [f"opsloop-live-{uuid.uuid4().hex[:10]}-{i}" for i in range(N)]
    rows = predictions(N)
    for r, i in zip(rows, ids, strict=True):
        r["customer_id"] = i
    wh = DuckDBAdapter(tmp_path / "wh.duckdb")
    spec = write_spec(tmp_path, share=1.0, bulk=N)  # 6 records go by Bulk 2.0, 2 by Collections
    policy = RetryPolicy() if live.remote else RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.05)
    destination = "salesforce.Contact" if live.crm == "salesforce" else "hubspot.contacts"
    try:
        live.prepare(ids)
        write_predictions(wh, rows)
        rep = push(wh, spec, live.crm, None, client=live.client, policy=policy)
        missing = rep.get("schema", {}).get("missing")
        assert not missing or live.crm == "hubspot", f"create these Contact fields first: {missing}"
        assert rep["status"] == "completed", rep.get("note")
        assert (rep["pushed"], rep["failed"], rep["rejected"]) == (N, 0, 0), rep.get("failed_by_code")
        if live.crm == "salesforce":  # describe + one Bulk 2.0 job (create, upload, close, polls, results)
            assert rep["updated"] == N and _apis(wh, "run-1") == {"bulk"}
            assert rep["api_calls"] <= (30 if live.remote else 9)  # a real org's job takes a few polls
        else:
            assert rep["created"] == N and _apis(wh, "run-1") == {"batch"}
        assert live.read(ids) == expected(rows, datetime.timestamp)

        again = push(wh, spec, live.crm, None, client=live.client, policy=policy, run_id="run-2")
        assert again["candidates"] == 0 and again["api_calls"] == 1  # the schema read, nothing written
        assert log_counts(wh, "run-2") == {}

        changed = [dict(r) for r in rows]
        for r in changed[:2]:
            r["next_best_action"] = "executive_call" if r["next_best_action"] != "executive_call" else "none"
        write_predictions(wh, changed)
        third = push(wh, spec, live.crm, None, client=live.client, policy=policy, run_id="run-3")
        assert (third["candidates"], third["updated"], third["failed"]) == (2, 2, 0)
        assert third["api_calls"] == 2  # the schema read and one batch of 2
        assert _apis(wh, "run-3") == {"collections" if live.crm == "salesforce" else "batch"}
        assert live.read(ids) == expected(changed, datetime.timestamp)
        state = wh.query(
            "SELECT count(*) AS n FROM opsloop_meta._sync_state WHERE destination = $d", {"d": destination}
        ).to_pylist()
        assert state[0]["n"] == N
    finally:
        live.cleanup(ids)
    assert live.read(ids) == {}
