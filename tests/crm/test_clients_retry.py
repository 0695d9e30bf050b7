"""The client factories and the one retry policy, through the real clients against the sandbox."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from blocks.crm import HubSpotCredentials, SalesforceCredentials, local_crm_documents
from opsloop.crm.clients import classify_hubspot, classify_salesforce, hubspot_timeout
from opsloop.crm.retry import CrmBudgetExhausted, RetryPolicy, RetryStats, call_with_retry
from opsloop.errors import ConfigError, TerminalError, TransientError
from sandbox.client import SandboxClient

FAST = RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.05, retry_after_cap=0.2)


def _sf_query(sf: Any, stats: RetryStats, policy: RetryPolicy = FAST) -> Any:
    return call_with_retry(
        lambda: sf.query("SELECT Id FROM Contact"),
        classify_salesforce(sf.session),
        what="query Contact",
        block="opsloop-salesforce/test",
        vendor="Salesforce",
        policy=policy,
        stats=stats,
    )


def test_salesforce_5xx_and_429_are_retried(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.seed("salesforce", "Contact", 3)
    crm_sandbox.fault(r"/query", status=503, count=2)
    crm_sandbox.fault(r"/query", status=429, headers={"Retry-After": "0"}, count=1)
    stats = RetryStats()
    assert _sf_query(sf_client, stats)["totalSize"] == 3
    assert stats.calls == 4 and stats.retries == 3


def test_salesforce_retries_give_up_as_transient(crm_sandbox: SandboxClient, sf_client: Any) -> None:
    crm_sandbox.fault(r"/query", status=500, count=-1)
    with pytest.raises(TransientError, match=r"opsloop-salesforce/test: Salesforce query Contact still failing"):
        _sf_query(sf_client, RetryStats())


def test_salesforce_401_and_budget_are_terminal(crm_sandbox: SandboxClient) -> None:
    block = SalesforceCredentials(instance_url=crm_sandbox.url, session_id=SecretStr("expired"))
    sf = block.get_client()
    stats = RetryStats()
    with pytest.raises(TerminalError, match="HTTP 401 INVALID_SESSION_ID"):
        _sf_query(sf, stats)
    assert stats.calls == 1
    crm_sandbox.budget("salesforce", daily_limit=1, used=1)
    with pytest.raises(CrmBudgetExhausted, match="REQUEST_LIMIT_EXCEEDED"):
        _sf_query(local_crm_documents(crm_sandbox.url)["opsloop-salesforce/sandbox"].get_client(), RetryStats())


def test_hubspot_post_429_storm_is_retried_honouring_retry_after(crm_sandbox: SandboxClient) -> None:
    hs = HubSpotCredentials(access_token=SecretStr(crm_sandbox.hubspot_token), base_url=crm_sandbox.url).get_client()
    search = hs.crm.contacts.search_api
    crm_sandbox.seed("hubspot", "contacts", 5)
    crm_sandbox.fault(r"/search", method="POST", status=429, headers={"Retry-After": "0"}, count=3)
    crm_sandbox.fault(r"/search", method="POST", status=502, count=1)
    stats = RetryStats()
    res = call_with_retry(
        lambda: search.do_search(public_object_search_request={"limit": 10}, _request_timeout=hubspot_timeout(hs)),
        classify_hubspot,
        what="search contacts",
        block="opsloop-hubspot/test",
        vendor="HubSpot",
        policy=FAST,
        stats=stats,
    )
    assert res.total == 5 and stats.retries == 4


def test_hubspot_validation_error_is_terminal_with_message(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    batch = hs_client.crm.objects.batch_api
    with pytest.raises(
        TerminalError,
        match=r"opsloop-hubspot/test: HubSpot upsert contacts failed: HTTP 400 "
        r"VALIDATION_ERROR: .*idProperty",
    ):
        call_with_retry(
            lambda: batch.upsert("contacts", {"inputs": [{"idProperty": "nope", "id": "1", "properties": {}}]}),
            classify_hubspot,
            what="upsert contacts",
            block="opsloop-hubspot/test",
            vendor="HubSpot",
            policy=FAST,
        )


def test_hubspot_connection_refused_is_transient() -> None:
    from opsloop.crm.clients import hubspot_client
    from opsloop.devstack.postgres import free_port

    hs = hubspot_client("pat-x", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError, match="CONNECTION_ERROR"):
        call_with_retry(
            lambda: hs.crm.contacts.basic_api.get_page(limit=1, _request_timeout=(1, 1)),
            classify_hubspot,
            what="get_page",
            block="b",
            vendor="HubSpot",
            policy=RetryPolicy(max_attempts=2, base_delay=0.01),
        )


def test_block_validation_names_the_block() -> None:
    with pytest.raises(ConfigError, match="opsloop-salesforce/<unsaved>: set session_id"):
        SalesforceCredentials().get_client()


def test_salesforce_oauth_refresh_against_sandbox(crm_sandbox: SandboxClient) -> None:
    crm_sandbox.seed("salesforce", "Contact", 2)
    block = SalesforceCredentials(
        client_id=SecretStr("cid"),
        client_secret=SecretStr("sec"),
        refresh_token=SecretStr("r1"),
        base_url=crm_sandbox.url,
    )
    assert block.get_client().query("SELECT Id FROM Contact")["totalSize"] == 2
    crm_sandbox.settings(oauth_refresh_tokens=["other"])
    with pytest.raises(ConfigError, match="invalid_grant"):
        block.get_client()
