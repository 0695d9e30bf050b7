"""Secrets and PII scan: after the whole loop ran with a sentinel value in every secret (see
``conftest.py``), after both deployment targets were deployed and after a run that fails on the
BigQuery block's credentials, nothing the loop wrote contains a sentinel secret, and nothing holds
raw PII the spec masks or hashes (e-mail, phone). Names, which the spec stores as they are, may
appear only in the warehouse tables that land them.

Scanned: every Prefect log line, flow/task run (parameters, state messages), artifact, event,
deployment (all stored fields), work pool (base job template values), variable and block document
as the API shows it without secrets; the worker's, Prefect server's and MLflow server's output;
Prefect's local result storage; every warehouse table (all columns as text); MLflow params, tags,
metrics and every artifact (downloaded); the AI fields pushed into the CRM sandbox."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.security.conftest import (
    PEOPLE,
    SECRETS,
    TAG,
    SentinelStack,
    mlflow_text,
    prefect_artifacts_text,
    run_deployment,
    warehouse_text,
)
from tests.support.fixtures.core import TEST_HOME

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

IMAGE = "europe-west3-docker.pkg.dev/sentinel-project/opsloop/opsloop:scan"
# the spec masks / hashes no name: names may be stored where the rows they belong to land
NAME_TABLES = {"ops_ai.customers", "ops_ai.crm_contacts", "opsloop_meta._quarantine"}


def secret_needles() -> dict[str, str]:
    return dict(SECRETS)


def pii_needles() -> dict[str, str]:
    out: dict[str, str] = {}
    for p in PEOPLE:
        out.update({f"{p.email} {k}": v for k, v in p.raw_pii().items()})
    return out


def name_needles() -> dict[str, str]:
    return {f"name of {p.email}": p.last for p in PEOPLE}


def findings(texts: dict[str, str], needles: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for where, text in texts.items():
        low = text.lower()
        hits = sorted(kind for kind, v in needles.items() if v.lower() in low)
        if hits:
            out[where] = hits
    return out


# -- collectors --------------------------------------------------------------------------------


def _dump(obj: Any) -> str:
    return obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj, default=str)


def prefect_logs(since: datetime) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp

    lines: list[str] = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            page = client.read_logs(LogFilter(timestamp=LogFilterTimestamp(after_=since)), limit=200, offset=offset)
            lines += [f"{log.flow_run_id} {log.name} {log.message}" for log in page]
            if len(page) < 200:
                break
            offset += 200
    assert lines, "no Prefect log lines to scan"
    return {"prefect logs": "\n".join(lines)}


def prefect_runs(since: datetime) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, TaskRunFilter

    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        flt = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since))
        for fr in _pages(lambda o: client.read_flow_runs(flow_run_filter=flt, limit=200, offset=o)):
            out[f"flow run {fr.name} {fr.id}"] = _dump(fr)
        for tr in _pages(
            lambda o: client.read_task_runs(flow_run_filter=flt, task_run_filter=TaskRunFilter(), limit=200, offset=o)
        ):
            out[f"task run {tr.name} {tr.id}"] = _dump(tr)
    assert out, "no flow runs to scan"
    return out


def _pages(read: Any) -> list[Any]:
    out: list[Any] = []
    while True:
        page = read(len(out))
        out += page
        if len(page) < 200:
            return out


def prefect_config() -> dict[str, str]:
    """Deployments, work pools, variables; block documents as read without secrets."""
    from prefect.client.orchestration import get_client

    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for d in client.read_deployments():
            out[f"deployment {d.name} ({d.id})"] = _dump(d)
        for wp in client.read_work_pools():
            out[f"work pool {wp.name}"] = json.dumps(wp.base_job_template, default=str)
        for v in client.read_variables():
            out[f"variable {v.name}"] = _dump(v)
        for b in client.read_block_documents(include_secrets=False):
            out[f"block document {b.name} (as shown without secrets)"] = json.dumps(b.data, default=str)
    return out


def prefect_events(since: datetime) -> dict[str, str]:
    import httpx

    api = os.environ["PREFECT_API_URL"].rstrip("/")
    body = {"filter": {"occurred": {"since": since.isoformat()}, "order": "ASC"}, "limit": 50}  # the API pages by ≤ 50
    texts: list[str] = []
    with httpx.Client(timeout=60) as http:
        resp = http.post(f"{api}/events/filter", json=body)
        resp.raise_for_status()
        page = resp.json()
        while True:
            texts += [json.dumps(e) for e in page.get("events", [])]
            nxt = page.get("next_page")
            if not nxt:
                break
            resp = http.get(nxt)
            resp.raise_for_status()
            page = resp.json()
    assert texts, "no events to scan"
    return {"prefect events": "\n".join(texts)}


def process_output(stack: SentinelStack) -> dict[str, str]:
    logs = {"worker": stack.worker_log, "prefect server": TEST_HOME / "run" / "prefect-server.log"}
    logs.update({f"mlflow server {p.name}": p for p in (TEST_HOME / "run").glob("mlflow-server-*.log")})
    out = {f"output of {k}": Path(p).read_text(errors="replace") for k, p in logs.items() if Path(p).exists()}
    out.update({f"output of {k}": v for k, v in stack.outputs.items()})
    storage = Path(os.environ["PREFECT_HOME"]) / "storage"
    if storage.exists():
        for f in storage.rglob("*"):
            if f.is_file():
                out[f"prefect result {f.name}"] = f.read_bytes().decode("latin-1")
    return out


def crm_ai_fields(stack: SentinelStack) -> dict[str, str]:
    sbx = stack.sandbox()
    sf = [{k: v for k, v in r.items() if k.startswith("AI_")} for r in sbx.records("salesforce", "Contact")]
    hs = [
        {k: v for k, v in r.get("properties", r).items() if k.startswith("ai_")}
        for r in sbx.records("hubspot", "contacts")
    ]
    assert any(r for r in sf) and any(r for r in hs), "nothing was pushed"
    return {"salesforce AI fields": json.dumps(sf, default=str), "hubspot AI properties": json.dumps(hs, default=str)}


# -- positive control ----------------------------------------------------------------------------

CANARY = "canary-Sntl-planted-5e1d07"


@contextmanager
def planted_canary(stack: SentinelStack) -> Iterator[list[str]]:
    """Plant :data:`CANARY` once in each kind of store the scan reads (a Prefect log line, an artifact,
    a variable, a deployment's parameters and job variables, a warehouse table, an MLflow run's tag and
    an artifact of that run); yields the location prefixes where :func:`findings` must report it. The
    Prefect objects are removed afterwards."""
    import duckdb
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate, LogCreate, VariableCreate

    con = duckdb.connect(str(stack.warehouse_file))
    try:
        con.execute("CREATE SCHEMA IF NOT EXISTS sentinel_canary")
        con.execute("CREATE OR REPLACE TABLE sentinel_canary.planted AS SELECT ? AS note", [f"x {CANARY} y"])
    finally:
        con.close()
    ml = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    exp = ml.get_experiment_by_name(stack.experiment)
    assert exp is not None, "no MLflow experiment to plant into"
    rid = ml.search_runs([exp.experiment_id], max_results=1)[0].info.run_id
    ml.set_tag(rid, "planted", CANARY)
    ml.log_text(rid, f"planted: {CANARY}\n", "canary/planted.txt")
    with get_client(sync_client=True) as client:
        now = datetime.now(UTC)
        client.create_logs([LogCreate(name="canary", level=20, message=f"a {CANARY}", timestamp=now,
                                      flow_run_id=stack.runs[0])])  # fmt: skip
        art = client.create_artifact(ArtifactCreate(key="sentinel-canary", type="markdown", data=f"# {CANARY}",
                                                    flow_run_id=stack.runs[0]))  # fmt: skip
        client.create_variable(VariableCreate(name="sentinel_canary", value={"v": CANARY}))
        dep = client.create_deployment(
            client.create_flow_from_name("forget-subject"),
            "sentinel-canary",
            parameters={"email": CANARY},
            job_variables={"env": {"CANARY": CANARY}},
        )
        try:
            yield [
                "prefect logs",
                f"artifact sentinel-canary:{art.id}",
                "variable sentinel_canary",
                f"deployment sentinel-canary ({dep})",
                "sentinel_canary.planted",
                f"run {rid} tags",
                f"run {rid} artifact canary/planted.txt",
            ]
        finally:
            client.delete_deployment(dep)
            client.delete_variable_by_name("sentinel_canary")
            client.delete_artifact(art.id)


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed_and_failed(sentinel_stack: SentinelStack) -> SentinelStack:
    """Both targets of prefect.yaml deployed (prod pool credentials: the sentinel GcpCredentials as
    a $ref) and one run that fails on the BigQuery block's sentinel service-account key."""
    from prefect.client.orchestration import get_client

    from deployments import cloud_run
    from deployments.deploy import deployment_names, load_config
    from tests.support.fixtures.operations import run_deploy

    stack = sentinel_stack
    cloud_run.ensure_pool(cloud_run.POOL, "cloud-run-v2", credentials_block=f"gcp-credentials/{TAG}")
    cloud_run.set_variables(
        {
            "opsloop_gcp_region": "europe-west3",
            "opsloop_runtime_service_account": "opsloop-runner@sentinel-project.iam.gserviceaccount.com",
            "opsloop_image_repository": IMAGE.rsplit(":", 1)[0],
        }
    )
    with get_client(sync_client=True) as client:
        have = {d.name for d in client.read_deployments()}
    if not set(deployment_names(load_config(), "prod")) <= have:
        res = run_deploy("prod", "--image", IMAGE)
        stack.outputs["prefect deploy prod"] = res.stdout + res.stderr
    failed = run_deployment(
        "ingest/ingest", {"spec_path": stack.spec_path, "warehouse": stack.bigquery, "sources": ["postgres_main"]}
    )
    assert failed.state.is_failed(), f"the BigQuery run should fail on its credentials: {failed.state}"
    assert "BigQuery" in (failed.state.message or "") or "invalid_grant" in (failed.state.message or "")
    stack.runs.append(failed.id)
    return stack


def test_no_sentinel_secret_or_raw_pii_anywhere(deployed_and_failed: SentinelStack, tmp_path: Path) -> None:
    import psycopg
    from prefect.client.orchestration import get_client

    stack = deployed_and_failed
    # the sentinels are really in use: the role needs its password, the blocks hold the values
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(stack.source_dsn.replace(f":{SECRETS['postgres password']}@", "@"), connect_timeout=5)
    with get_client(sync_client=True) as client:
        held = json.dumps([b.data for b in client.read_block_documents(include_secrets=True)], default=str)
    # every sentinel but the Salesforce session id (the sandbox issues it on the OAuth refresh) is in a block
    assert [k for k, v in SECRETS.items() if v not in held] == ["salesforce session id"]

    with planted_canary(stack) as planted:
        prefect = {
            **prefect_logs(stack.started),
            **prefect_runs(stack.started),
            **prefect_artifacts_text(stack.started),
            **prefect_events(stack.started),
            **prefect_config(),
        }
        output = process_output(stack)
        warehouse = warehouse_text(stack.warehouse_file)
        ml = mlflow_text(stack.mlflow_url, stack.experiment, stack.model_name, tmp_path / "mlflow")
        crm = crm_ai_fields(stack)
    everything = {**prefect, **output, **warehouse, **ml, **crm}
    size = sum(len(v) for v in everything.values())
    print(f"sentinel scan: {len(everything)} texts, {size / 1e6:.1f} MB, {len(SECRETS)} secrets, {len(PEOPLE)} people")

    # positive control: a value planted in each kind of store is found where it was planted, by the
    # same matcher that looks for the sentinels
    seen = findings(everything, {**secret_needles(), "planted canary": CANARY})
    canary_at = sorted(k for k, kinds in seen.items() if "planted canary" in kinds)
    assert [p for p in planted if p not in canary_at] == [], canary_at

    # what we scan is what the loop wrote (positive controls)
    assert str(stack.runs[0]) in output["output of worker"]
    assert any(k.startswith("deployment forget-subject-prod") for k in prefect)
    assert any("input_example" in k for k in ml) and any("baseline.json" in k for k in ml)
    assert "z***@pii-probe.example" in warehouse["opsloop_meta._quarantine"].lower()  # masked, not raw
    assert "y***@pii-probe.example" in warehouse["ops_ai.crm_contacts"].lower()
    assert "quokkaberg" in warehouse["opsloop_meta._quarantine"].lower()  # the scan does see stored values

    assert findings(everything, secret_needles()) == {}
    assert findings(everything, pii_needles()) == {}
    outside = {k: v for k, v in everything.items() if k not in NAME_TABLES}
    assert findings(outside, name_needles()) == {}
