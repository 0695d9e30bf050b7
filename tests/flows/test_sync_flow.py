"""The sync flow on a real Prefect server: pushes both CRMs through the blocks, writes artifacts,
dry-runs, and fails fast (no task retries) on rejected credentials, naming the block."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from sandbox.client import SandboxClient
from tests.crm.helpers import actual_hs, actual_sf, expected_hs, expected_sf, predictions, write_predictions, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def sync_setup(prefect_api: str, crm_sandbox: SandboxClient, tmp_path: Path) -> Iterator[dict[str, Any]]:
    from blocks import DuckDBConnector, HubSpotCredentials, SalesforceCredentials

    name = f"sync-{uuid.uuid4().hex[:8]}"
    DuckDBConnector(path=str(tmp_path / "wh.duckdb")).save(name, overwrite=True)
    SalesforceCredentials(instance_url=crm_sandbox.url, session_id=SecretStr(crm_sandbox.salesforce_token)).save(
        name, overwrite=True
    )
    HubSpotCredentials(access_token=SecretStr(crm_sandbox.hubspot_token), base_url=crm_sandbox.url).save(
        name, overwrite=True
    )
    write_spec(tmp_path)
    spec = yaml.safe_load((tmp_path / "crm_test.yaml").read_text())
    for d in spec["destinations"]:
        d["connection"] = f"opsloop-{d['crm']}/{name}"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    from opsloop.warehouse.duckdb import DuckDBAdapter

    yield {
        "spec": str(path),
        "warehouse": f"opsloop-duckdb/{name}",
        "name": name,
        "wh": DuckDBAdapter(tmp_path / "wh.duckdb"),
    }


def _run(**kwargs: Any) -> Any:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.sync import sync_predictions

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return sync_predictions(**kwargs, return_state=True)


def _artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(arts, key=lambda a: a.created)[-1]


def test_sync_flow_pushes_both_crms_with_artifacts(sync_setup: dict[str, Any], crm_sandbox: SandboxClient) -> None:
    rows = predictions(2500)
    write_predictions(sync_setup["wh"], rows)
    crm_sandbox.seed("salesforce", "Contact", 2500)
    dry = _run(spec_path=sync_setup["spec"], warehouse=sync_setup["warehouse"], dry_run=True).result()
    assert dry["rows_pushed"] == 0 and crm_sandbox.requests()["hubspot"]["writes"] == 0
    assert "would create 2500" in _artifact("sync-summary").data
    out = _run(spec_path=sync_setup["spec"], warehouse=sync_setup["warehouse"]).result()
    assert out["rows_pushed"] == 5000
    assert (
        out["api_calls"]["salesforce.Contact"] <= 8 and out["api_calls"]["hubspot.contacts"] == 1 + 5 + 25
    )  # probe, 5 properties, 25 batches
    assert set(out["api_left"]) == {"salesforce.Contact", "hubspot.contacts"}
    assert actual_sf(crm_sandbox) == expected_sf(rows) and actual_hs(crm_sandbox) == expected_hs(rows)
    md = _artifact("sync-summary").data
    assert "| salesforce.Contact | completed | 2500 | 2500 |" in md
    assert md.splitlines()[2].endswith("| api_calls | api_left | api_paced_s |")  # 31 calls: nothing to wait for
    assert [d["api_paced_s"] for d in out["destinations"]] == [0.0, 0.0]
    table = _artifact("sync-destinations")
    assert "hubspot.contacts" in str(table.data)
    again = _run(spec_path=sync_setup["spec"], warehouse=sync_setup["warehouse"], destination="hubspot").result()
    assert again["rows_pushed"] == 0 and [d["destination"] for d in again["destinations"]] == ["hubspot.contacts"]


def test_sync_flow_401_fails_fast_naming_the_block(sync_setup: dict[str, Any], crm_sandbox: SandboxClient) -> None:
    from blocks import HubSpotCredentials

    HubSpotCredentials(access_token=SecretStr("pat-revoked"), base_url=crm_sandbox.url).save(
        sync_setup["name"], overwrite=True
    )
    write_predictions(sync_setup["wh"], predictions(10))
    state = _run(spec_path=sync_setup["spec"], warehouse=sync_setup["warehouse"], destination="hubspot.contacts")
    assert state.is_failed()
    with pytest.raises(Exception, match=rf"opsloop-hubspot/{sync_setup['name']}: HubSpot .* HTTP 401"):
        state.result()
    assert crm_sandbox.requests()["hubspot"]["requests"] == 1  # no retries of a terminal error
