"""The nightly deployment on a real local Prefect server: deployed from prefect.yaml, picked up by a
process worker, triggered with custom parameters through the API the UI's "Custom run" uses, and a
second trigger held by the deployment's concurrency limit while the first runs."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import pytest

from opsloop.devstack.process import Service
from tests.support.fixtures.operations import OpsStack, wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NIGHTLY = "nightly/nightly"


def _table(artifact: Any) -> list[dict[str, Any]]:
    """A table artifact's rows (the API returns the table as JSON text)."""
    import json

    data = artifact.data
    return list(json.loads(data) if isinstance(data, str) else data)


def _artifacts(run_id: UUID) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key or f"{a.type}:{a.id}": a for a in arts}


def _subflow_runs(run_id: UUID) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
        )
        return {client.read_flow(r.flow_id).name: r for r in runs}


def test_deployments_match_prefect_yaml(local_deployments: dict[str, UUID]) -> None:
    from prefect.client.orchestration import get_client

    assert NIGHTLY in local_deployments
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(local_deployments[NIGHTLY])
        ingest = client.read_deployment_by_name("ingest/ingest")
    assert dep.work_pool_name == "opsloop-local"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    cron = [s.schedule for s in dep.schedules]
    assert [(c.cron, c.timezone) for c in cron] == [("0 2 * * *", "Europe/Berlin")]  # type: ignore[union-attr]
    assert {"opsloop", "env:local"} <= set(dep.tags)
    # the ingest cadences exist but are switched off until an operator turns them on
    assert {s.slug: s.active for s in ingest.schedules} == {"crm-every-2h": False, "postgres-every-10min": False}
    assert {s.slug: s.parameters for s in ingest.schedules}["crm-every-2h"] == {"sources": ["crm_contacts"]}
    assert ingest.concurrency_options is not None and ingest.concurrency_options.collision_strategy == "CANCEL_NEW"


def test_custom_run_completes_and_second_run_waits(
    local_deployments: dict[str, UUID], local_worker: Service, ops_stack: OpsStack
) -> None:
    from prefect.client.orchestration import get_client

    dep_id = local_deployments[NIGHTLY]
    custom = ops_stack.parameters(retrain="always", dry_run=True, sync_limit=50)
    with get_client(sync_client=True) as client:
        # what the UI's "Custom run" sends: POST /deployments/{id}/create_flow_run with parameters
        first = client.create_flow_run_from_deployment(dep_id, parameters=custom, name="ops-e2e-custom")
        deadline = time.monotonic() + 600
        while not (cur := client.read_flow_run(first.id)).state.is_running():  # type: ignore[union-attr]
            assert not cur.state.is_final() and time.monotonic() < deadline, cur.state  # type: ignore[union-attr]
            time.sleep(0.5)
        # a second trigger while the first runs: held by the deployment's concurrency limit
        second = client.create_flow_run_from_deployment(
            dep_id, parameters=ops_stack.parameters(retrain="never"), name="ops-e2e-queued"
        )
        held, overlapped = False, False
        while time.monotonic() < deadline + 600:
            a, b = client.read_flow_run(first.id), client.read_flow_run(second.id)
            if a.state.is_running() and b.state.name == "AwaitingConcurrencySlot":  # type: ignore[union-attr]
                held = True
            if a.state.is_running() and b.state.is_running():  # type: ignore[union-attr]
                overlapped = True
            if a.state.is_final() and b.state.is_final():  # type: ignore[union-attr]
                break
            time.sleep(0.5)
    done, queued = wait_for_run(first.id, timeout=60), wait_for_run(second.id, timeout=60)
    assert done.state.is_completed(), f"nightly ended {done.state.name}: {done.state.message}"
    assert queued.state.is_completed(), f"queued run ended {queued.state.name}: {queued.state.message}"
    assert done.parameters["retrain"] == "always" and done.parameters["spec_path"] == ops_stack.spec_path
    assert held, "the second run was never held by the deployment's concurrency limit"
    assert not overlapped, "two nightly runs of one deployment ran at the same time"
    assert queued.start_time >= done.end_time  # strictly one after the other

    arts = _artifacts(first.id)
    assert {"nightly-summary", "nightly-stages"} <= set(arts)
    summary = str(arts["nightly-summary"].data)  # type: ignore[attr-defined]
    assert "customer_ops_ai · completed" in summary
    assert any(k.startswith("progress:") for k in arts), sorted(arts)
    rows = {r["stage"]: r for r in _table(arts["nightly-stages"])}  # type: ignore[attr-defined]
    assert rows["ingest"]["status"] == "completed" and rows["train"]["status"] == "completed"
    assert "run-cost-ledger" in arts
    subs = _subflow_runs(first.id)
    assert {"ingest", "train"} <= set(subs), sorted(subs)
    assert all(r.state.is_completed() for r in subs.values())  # type: ignore[attr-defined]
    assert "ingest-report" in _artifacts(subs["ingest"].id)  # type: ignore[attr-defined]
