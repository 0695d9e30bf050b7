"""The HubSpot sink's batch bodies go out as orjson bytes through the client's own pool, and every
answer the library would turn into an exception still raises the library's exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hubspot.crm.objects import exceptions as hs_errors
from hubspot.crm.objects import rest as hs_rest

from opsloop.crm.base import FieldSpec
from opsloop.crm.clients import hubspot_client
from opsloop.crm.hubspot import HubSpotSink, _JsonReady
from opsloop.errors import TerminalError
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient
from tests.crm.helpers import actual_hs, expected_hs, push, staged


class _LibraryJson:
    """Stands in for the library's module-level ``json``: counts the bodies it encodes."""

    encoded: list[Any] = []

    @classmethod
    def dumps(cls, obj: Any, **kw: Any) -> str:
        cls.encoded.append(obj)
        return json.dumps(obj, **kw)


@pytest.fixture
def library_json(monkeypatch: pytest.MonkeyPatch) -> type[_LibraryJson]:
    _LibraryJson.encoded = []
    monkeypatch.setattr(hs_rest, "json", _LibraryJson)
    return _LibraryJson


def _sink(sbx: SandboxClient) -> HubSpotSink:
    return HubSpotSink(hubspot_client(sbx.hubspot_token, sbx.url, timeout=(5, 30)), "blk", "contacts", "customer_id")


def _body(*ids: str, risk: Any = 0.5) -> _JsonReady:
    return _JsonReady(
        inputs=[{"idProperty": "customer_id", "id": i, "properties": {"ai_churn_risk": risk}} for i in ids]
    )


def _table(n: int) -> pa.Table:
    return pa.table({"external_id": [f"C{i}" for i in range(1, n + 1)]})


def test_a_push_encodes_its_batches_without_the_librarys_json(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient, library_json: type[_LibraryJson]
) -> None:
    spec, rows = staged(wh, tmp_path, 250)
    rep = push(wh, spec, "hubspot", crm_sandbox)
    assert rep["created"] == 250 and rep["failed"] == 0
    assert crm_sandbox.requests()["hubspot"]["routes"]["hs.batch_upsert"] == 3
    assert actual_hs(crm_sandbox) == expected_hs(rows)
    batches = [b for b in library_json.encoded if isinstance(b, dict) and "inputs" in b]
    assert batches == []  # the three batch bodies went out as orjson bytes


def test_a_body_orjson_refuses_takes_the_librarys_path(
    crm_sandbox: SandboxClient, library_json: type[_LibraryJson]
) -> None:
    sink = _sink(crm_sandbox)
    sink.ensure_schema([FieldSpec("risk", "ai_churn_risk", "number")], {}, create=True)
    library_json.encoded.clear()
    huge = 2**70  # beyond 64 bits: orjson refuses it, json.dumps writes it
    with pytest.raises(TypeError):
        orjson.dumps(huge)
    data, status, _ = sink._raw(sink.batch_api.upsert, "contacts", _body("C1", risk=huge))
    assert status == 200 and float(data["results"][0]["properties"]["ai_churn_risk"]) == float(huge)
    assert library_json.encoded == [_body("C1", risk=huge)]


def test_non_ascii_text_arrives_as_sent(crm_sandbox: SandboxClient, library_json: type[_LibraryJson]) -> None:
    """orjson writes UTF-8 where json.dumps wrote \\u escapes: the same JSON text to a parser."""
    sink = _sink(crm_sandbox)
    sink.ensure_schema([FieldSpec("note", "ai_note", "string")], {}, create=True)
    texts = {"C1": "Relancer Zoë — ligne 2 ✓", "C2": "客户流失风险高 🚨", "C3": 'quote " and \\ backslash'}
    body = _JsonReady(
        inputs=[{"idProperty": "customer_id", "id": k, "properties": {"ai_note": v}} for k, v in texts.items()]
    )
    assert b"\\u" not in orjson.dumps(body)  # raw UTF-8 on the wire
    sink._send(_table(3), body)
    assert library_json.encoded == []
    held = crm_sandbox.by_key("hubspot", "contacts", "customer_id")
    assert {k: held[k]["ai_note"] for k in texts} == texts


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, hs_errors.UnauthorizedException),
        (403, hs_errors.ForbiddenException),
        (404, hs_errors.NotFoundException),
        (429, hs_errors.ApiException),
        (503, hs_errors.ServiceException),
    ],
)
def test_an_error_answer_raises_the_librarys_exception(
    crm_sandbox: SandboxClient, status: int, error: type[Exception]
) -> None:
    sink = _sink(crm_sandbox)
    body = {"status": "error", "category": "TEST", "message": f"injected {status}"}
    crm_sandbox.fault(r"/batch/upsert", method="POST", status=status, body=body, headers={"X-Test": "1"})
    with pytest.raises(error) as caught:
        sink._raw(sink.batch_api.upsert, "contacts", _body("C1"))
    exc: Any = caught.value
    assert type(exc) is error and exc.status == status
    assert json.loads(exc.body)["message"] == f"injected {status}" and exc.headers["X-Test"] == "1"


def test_the_encoded_bodies_use_the_clients_tls_settings(crm_sandbox_tls: SandboxClient) -> None:
    trusted = HubSpotSink(
        hubspot_client(crm_sandbox_tls.hubspot_token, crm_sandbox_tls.url, verify=str(crm_sandbox_tls.http.verify)),
        "blk",
        "contacts",
        "customer_id",
    )
    trusted.ensure_schema([FieldSpec("risk", "ai_churn_risk", "number")], {}, create=True)
    data = trusted._send(_table(3), _body("C1", "C2", "C3"))
    assert [r["properties"]["customer_id"] for r in data["results"]] == ["C1", "C2", "C3"]
    # a client that does not trust the sandbox's certificate: the same pool refuses the handshake
    untrusted = HubSpotSink(hubspot_client(crm_sandbox_tls.hubspot_token, crm_sandbox_tls.url), "blk", "contacts", "id")
    with pytest.raises(TerminalError, match="TLS_ERROR"):
        untrusted._send(_table(1), _body("C4"))
    assert crm_sandbox_tls.requests()["hubspot"]["routes"]["hs.batch_upsert"] == 1
