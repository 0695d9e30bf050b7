"""The sandbox's HubSpot side, driven through the real hubspot-api-client."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hubspot.crm.contacts import PublicObjectSearchRequest
from hubspot.crm.objects.exceptions import ApiException as ObjectsApiException
from hubspot.crm.properties import PropertyCreate
from hubspot.crm.properties.exceptions import ApiException as PropertiesApiException

from sandbox.client import SandboxClient


def _unique_prop(hs: Any) -> None:
    hs.crm.properties.core_api.create(
        "contacts",
        PropertyCreate(
            name="customer_id",
            label="Customer id",
            type="string",
            field_type="text",
            group_name="contactinformation",
            has_unique_value=True,
        ),
    )


def test_properties_create_conflict_and_read(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    _unique_prop(hs_client)
    with pytest.raises(PropertiesApiException) as info:
        _unique_prop(hs_client)
    assert info.value.status == 409
    prop = hs_client.crm.properties.core_api.get_by_name("contacts", "customer_id")
    assert prop.has_unique_value is True


def test_batch_upsert_200_207_and_validation(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    _unique_prop(hs_client)
    batch = hs_client.crm.objects.batch_api
    inputs = [{"idProperty": "customer_id", "id": f"C{i}", "properties": {"email": f"c{i}@x.io"}} for i in range(100)]
    first = batch.upsert("contacts", {"inputs": inputs})
    assert len(first.results) == 100 and all(r.new for r in first.results)
    crm_sandbox.fail_records(
        "hubspot", "contacts", "customer_id", values=["C3", "C7"], error_code="INVALID_EMAIL", count=2
    )
    again = batch.upsert("contacts", {"inputs": inputs})
    assert again.num_errors == 2 and sorted(e.context["ids"][0] for e in again.errors) == ["C3", "C7"]
    assert not any(r.new for r in again.results) and len(again.results) == 98
    with pytest.raises(ObjectsApiException) as info:
        batch.upsert("contacts", {"inputs": [{"idProperty": "customer_id", "id": "Z", "properties": {"nope": 1}}]})
    assert info.value.status == 400 and "VALIDATION_ERROR" in info.value.body and "nope" in info.value.body
    with pytest.raises(ObjectsApiException) as info:
        batch.upsert("contacts", {"inputs": inputs + inputs[:1]})
    assert info.value.status == 400


def test_batch_upsert_keeps_the_unique_value_index(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    """A batch that writes no unique property leaves the index alone; one that changes a unique
    property (email) moves it: the record is then found by the new value only."""
    _unique_prop(hs_client)
    batch = hs_client.crm.objects.batch_api
    made = batch.upsert(
        "contacts", {"inputs": [{"idProperty": "customer_id", "id": "K1", "properties": {"email": "old@x.io"}}]}
    )
    hs_id = made.results[0].id
    again = batch.upsert(
        "contacts", {"inputs": [{"idProperty": "customer_id", "id": "k1", "properties": {"firstname": "Ann"}}]}
    )
    assert again.results[0].id == hs_id and not again.results[0].new
    batch.upsert(
        "contacts", {"inputs": [{"idProperty": "customer_id", "id": "K1", "properties": {"email": "new@x.io"}}]}
    )
    by_email = batch.upsert(
        "contacts", {"inputs": [{"idProperty": "email", "id": "NEW@x.io", "properties": {"lastname": "B"}}]}
    )
    assert by_email.results[0].id == hs_id and not by_email.results[0].new
    other = batch.upsert(
        "contacts", {"inputs": [{"idProperty": "email", "id": "old@x.io", "properties": {"lastname": "C"}}]}
    )
    assert other.results[0].id != hs_id and other.results[0].new
    rec = crm_sandbox.by_key("hubspot", "contacts", "customer_id")["K1"]
    assert rec["email"] == "new@x.io" and rec["firstname"] == "Ann" and rec["lastname"] == "B"


def test_get_page_and_search_with_10k_cap(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    crm_sandbox.seed("hubspot", "contacts", 10_050, modstamp="2026-01-01T00:00:00Z", step_ms=10)
    page = hs_client.crm.contacts.basic_api.get_page(limit=100, properties=["email"])
    assert len(page.results) == 100 and page.paging.next.after
    page2 = hs_client.crm.contacts.basic_api.get_page(limit=100, after=page.paging.next.after, properties=["email"])
    assert page2.results[0].id != page.results[-1].id
    search = hs_client.crm.contacts.search_api
    flt = {"filters": [{"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": "1767225600000"}]}
    req = PublicObjectSearchRequest(
        filter_groups=[flt],
        sorts=[{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
        properties=["email"],
        limit=200,
        after="9800",
    )
    res = search.do_search(public_object_search_request=req)
    assert res.total == 10_050 and len(res.results) == 200 and res.paging.next.after == "10000"
    req.after = "10000"
    with pytest.raises(Exception) as info:
        search.do_search(public_object_search_request=req)
    assert info.value.status == 400
    lte = {"filters": [{"propertyName": "hs_lastmodifieddate", "operator": "LT", "value": "2026-01-01T00:00:00.050Z"}]}
    few = search.do_search(public_object_search_request=PublicObjectSearchRequest(filter_groups=[lte], limit=200))
    assert few.total == 5


def test_ten_secondly_rate_limit_429(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    crm_sandbox.rate_limit(3)
    api = hs_client.crm.contacts.basic_api
    started = time.monotonic()
    for _ in range(3):
        api.get_page(limit=1)
    with pytest.raises(Exception) as info:
        api.get_page(limit=1)
    assert time.monotonic() - started < 5
    assert info.value.status == 429
    assert '"policyName":"TEN_SECONDLY_ROLLING"' in info.value.body and int(info.value.headers["Retry-After"]) >= 1
    counts = crm_sandbox.requests()["hubspot"]
    assert counts["status"]["429"] == 1


def test_rate_window_length_and_429_without_retry_after(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    crm_sandbox.rate_limit(2, window_ms=500, retry_after=False)
    api = hs_client.crm.contacts.basic_api
    _data, _status, headers = api.get_page_with_http_info(limit=1)
    assert headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "500"
    assert (headers["X-HubSpot-RateLimit-Max"], headers["X-HubSpot-RateLimit-Remaining"]) == ("2", "1")
    api.get_page(limit=1)
    with pytest.raises(Exception) as info:
        api.get_page(limit=1)
    assert info.value.status == 429 and "Retry-After" not in info.value.headers
    time.sleep(0.55)  # the window rolled on
    assert api.get_page_with_http_info(limit=1)[1] == 200


def test_daily_limit_and_headers(crm_sandbox: SandboxClient, hs_client: Any) -> None:
    _data, status, headers = hs_client.crm.contacts.basic_api.get_page_with_http_info(limit=1)
    assert status == 200 and int(headers["X-HubSpot-RateLimit-Daily-Remaining"]) == 250_000 - 1
    crm_sandbox.budget("hubspot", daily_limit=5, used=5)
    with pytest.raises(Exception) as info:
        hs_client.crm.contacts.basic_api.get_page(limit=1)
    assert info.value.status == 429 and '"policyName":"DAILY"' in info.value.body


def test_bad_token_401(crm_sandbox: SandboxClient) -> None:
    from opsloop.crm.clients import hubspot_client

    bad = hubspot_client("pat-wrong", crm_sandbox.url)
    with pytest.raises(Exception) as info:
        bad.crm.contacts.basic_api.get_page(limit=1)
    assert info.value.status == 401
