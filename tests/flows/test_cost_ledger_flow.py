"""A demo-like multi-stage run on a real Prefect server: every stage gets a ledger row with real
compute and API figures (API calls counted by the CRM sandbox itself), the run's ledger is a table
artifact, KPIs are stored, the cost report renders, and a blown budget fails the report loudly."""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from blocks import load_warehouse
from opsloop import costs, kpis
from opsloop.crm.clients import salesforce_client
from opsloop.warehouse.base import MergeSpec, TableRef, TableSchema
from opsloop.warehouse.write import write_merge
from tasks.common import flow_run_id, run_labels
from tasks.costs import costed_stage, record_stage_cost, stage_cost
from tasks.kpis import evaluate_run_kpis

REPO = Path(__file__).resolve().parents[2]
SPEC = str(REPO / "pipelines" / "customer_ops_ai.yaml")
PIPE = "customer_ops_ai"
SCHEMA = pa.schema([("customer_id", pa.string()), ("mrr", pa.float64()), ("updated_at", pa.timestamp("us", tz="UTC"))])
pytestmark = pytest.mark.slow


@task
def load_customers(warehouse: str, n: int) -> int:
    wh = load_warehouse(warehouse, **run_labels(PIPE, "load_customers"))
    now = datetime.now(UTC)
    data = pa.table(
        {"customer_id": [f"C{i:07d}" for i in range(n)], "mrr": [float(i) for i in range(n)], "updated_at": [now] * n},
        schema=SCHEMA,
    )
    target = TableRef("ops_ai", "customers")
    res = write_merge(
        wh,
        target,
        TableSchema.from_arrow(SCHEMA),
        SCHEMA,
        data.to_batches(max_chunksize=100),
        MergeSpec(target, tuple(SCHEMA.names), ("customer_id",), ("updated_at",)),
        f"{flow_run_id()}_customers",
    )
    return res.inserted + res.updated


@task
def score_customers(warehouse: str) -> int:
    wh = load_warehouse(warehouse, **run_labels(PIPE, "score_customers"))
    wh.execute(
        "CREATE OR REPLACE TABLE ops_ai.predictions AS SELECT customer_id, "
        "LEAST(mrr / 100.0, 1.0) AS predicted_churn_risk, "
        "CASE WHEN mrr >= 70 THEN 'high' ELSE 'low' END AS risk_bucket, "
        "CASE WHEN mrr >= 70 THEN 'retention_offer' ELSE 'none' END AS next_best_action FROM ops_ai.customers"
    )
    return int(wh.query("SELECT COUNT(*) AS n FROM ops_ai.predictions").column(0)[0].as_py())


@task
def push_to_salesforce(url: str, token: str, n: int) -> tuple[int, int]:
    """Upsert ``n`` contacts with the real simple-salesforce client; returns (records, calls left)."""
    sf = salesforce_client(url, token)
    for i in range(n):
        sf.Contact.upsert(f"Customer_Id__c/C{i:07d}", {"LastName": f"L{i}", "AI_Churn_Risk__c": i / n})
    usage = sf.query("SELECT Id FROM Contact LIMIT 1") and sf.api_usage["api-usage"]
    return n, int(usage.total) - int(usage.used)


@flow(name="ingest-stage-test")
@costed_stage("ingest")
def ingest_stage(spec_path: str, warehouse: str, n: int = 80) -> dict[str, Any]:
    return {"rows_ingested": load_customers(warehouse, n)}


@flow(name="costed-nightly-test")
def costed_nightly(spec_path: str, warehouse: str, crm_url: str, sf_token: str, sandbox_url: str) -> dict[str, Any]:
    from sandbox.client import SandboxClient

    sandbox = SandboxClient(sandbox_url)
    started = datetime.now(UTC)
    sub = ingest_stage(spec_path, warehouse, return_state=True)  # a stage that prices itself, as a subflow
    sub_id = str(sub.state_details.flow_run_id)
    # …and the parent records it again the way nightly's _record_costs does: no duplicate, nothing lost
    record_stage_cost(spec_path, warehouse, "ingest", started, flow_run_id=sub_id, rows={"ingested": 0})
    with stage_cost("score", spec_path, warehouse) as rec:
        rec.rows_scored = score_customers(warehouse)
        rec.model_name, rec.model_version = "customer_churn", "7"
    with stage_cost("sync", spec_path, warehouse) as rec:
        before = sandbox.requests()["salesforce"]["api_usage"]
        pushed, left = push_to_salesforce(crm_url, sf_token, 12)
        rec.rows_pushed = pushed
        rec.add_api_calls("salesforce", sandbox.requests()["salesforce"]["api_usage"] - before, left=left)
    kpi = evaluate_run_kpis(spec_path, warehouse, metrics={"model.auc": 0.8})
    return {"line": rec.line, "sub_id": sub_id, "run_id": flow_run_id(), "kpi": kpi}


@pytest.fixture(scope="module")
def nightly_run(
    prefect_api: str, crm_sandbox_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from blocks.warehouse import DuckDBConnector

    sandbox = crm_sandbox_server.client()
    sandbox.reset()
    path = tmp_path_factory.mktemp("costs") / "warehouse.duckdb"
    name = f"costs-{uuid.uuid4().hex[:8]}"
    DuckDBConnector(path=str(path)).save(name, overwrite=True)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        state = costed_nightly(
            SPEC, f"opsloop-duckdb/{name}", sandbox.url, sandbox.salesforce_token, sandbox.url, return_state=True
        )
        assert state.is_completed(), state.message
        result = state.result()
        yield {**result, "warehouse": f"opsloop-duckdb/{name}", "path": path, "sandbox": sandbox, "state": state}


def test_every_stage_has_a_ledger_row_with_real_figures(nightly_run: dict[str, Any]) -> None:
    from opsloop.warehouse.duckdb import DuckDBAdapter

    wh = DuckDBAdapter(nightly_run["path"])
    rows = {r["stage"]: r for r in costs.read_ledger(wh, run_ids=[nightly_run["run_id"]])}
    assert set(rows) == {"ingest", "score", "sync"}
    assert len(costs.read_ledger(wh)) == 3  # the second ingest record replaced, never duplicated
    for stage, r in rows.items():
        assert r["root_flow_run_id"] == nightly_run["run_id"], stage
        assert r["pipeline"] == PIPE and r["status"] == "completed"
        assert r["wall_seconds"] > 0 and r["compute_usd"] > 0, stage
        assert r["compute_usd"] == pytest.approx(r["wall_seconds"] * (0.000018 + 2 * 0.000002), abs=2e-9)
        assert (r["bq_jobs"], r["bq_bytes_billed"], r["bq_usd"]) == (0, 0, 0.0)  # DuckDB
    ing = rows["ingest"]
    assert ing["flow_run_id"] == nightly_run["sub_id"] and ing["flow"] == "ingest-stage-test"
    assert ing["rows_ingested"] == 80 and ing["warehouse_jobs"] >= 2  # stage load + MERGE, at least
    assert ing["usd_per_1k_ingested"] == pytest.approx(ing["total_usd"] / 80 * 1000, rel=1e-5)
    assert rows["score"]["rows_scored"] == 80 and rows["score"]["model_version"] == "7"
    assert rows["score"]["warehouse_jobs"] >= 2
    sync = rows["sync"]
    counted = nightly_run["sandbox"].requests()["salesforce"]
    assert sync["api_calls"] == 13 == counted["api_usage"]  # 12 upserts + 1 query, as the sandbox counted them
    assert sync["api_calls_left"] == counted["daily_limit"] - counted["api_usage"]
    assert sync["api_usd"] == pytest.approx(13 * 0.00001)
    assert sync["usd_per_1k_pushed"] == pytest.approx(sync["total_usd"] / 12 * 1000, rel=1e-5)
    assert nightly_run["line"].startswith("cost $") and "3 stage(s)" in nightly_run["line"]
    assert "13 CRM call(s)" in nightly_run["line"]


def test_run_ledger_artifact_and_kpis(nightly_run: dict[str, Any]) -> None:
    from opsloop.warehouse.duckdb import DuckDBAdapter

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["run-cost-ledger", "run-kpi-map"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(nightly_run["run_id"])])),
        )
    tables = {a.key: a for a in arts if a.type == "table"}
    assert {"run-cost-ledger", "run-kpi-map"} <= set(tables)
    ledger_art = [a for a in arts if a.key == "run-cost-ledger"]
    assert any('"sync"' in str(a.data) and '"ingest"' in str(a.data) for a in ledger_art)
    stored = {r["kpi"]: r for r in kpis.read_kpis(DuckDBAdapter(nightly_run["path"]), nightly_run["run_id"])}
    assert stored["business.predictions_pushed"]["value"] == 12
    assert stored["kpi.model_auc"]["status"] == "on_target"
    assert stored["kpi.at_risk_customers_with_action"]["value"] == 10  # mrr 70..79
    assert stored["service.failed_tasks"]["value"] == 0
    assert stored["cost.api_calls_left.salesforce"]["value"] > 0
    assert nightly_run["kpi"]["slos"]["ingest_p95"] == "no_data"  # one run < minRuns 5
    assert nightly_run["kpi"]["budget"] == "ok"


def test_cost_report_flow_writes_csv_html_and_alerts_on_budget(nightly_run: dict[str, Any], tmp_path: Path) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.cost_report import cost_report
    from opsloop.warehouse.duckdb import DuckDBAdapter

    today = datetime.now(UTC).date()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        res = cost_report(SPEC, nightly_run["warehouse"], start=today, end=today, output_dir=str(tmp_path / "ok"))
        assert res["runs"] == 1 and res["over_budget"] == []
        with open(res["csv"]) as fh:
            csv_total = sum(float(r["total_usd"]) for r in csv.DictReader(fh))
        ledger_total = sum(r["total_usd"] for r in costs.read_ledger(DuckDBAdapter(nightly_run["path"])))
        assert csv_total == pytest.approx(ledger_total, abs=1e-12) and res["total_usd"] == pytest.approx(ledger_total)
        html = Path(res["html"]).read_text()
        assert f"/runs/flow-run/{nightly_run['run_id']}" in html

        data = yaml.safe_load(Path(SPEC).read_text())
        data["costs"]["budgetPerRunUsd"] = 0.0000001
        tight = tmp_path / "tight.yaml"
        tight.write_text(yaml.safe_dump(data))
        state = cost_report(
            str(tight),
            nightly_run["warehouse"],
            start=today,
            end=today,
            output_dir=str(tmp_path / "over"),
            return_state=True,
        )
    assert state.is_failed()
    with pytest.raises(kpis.CostBudgetExceededError) as err:
        state.result()
    assert "docs/runbooks.md#cost-overrun" in str(err.value) and nightly_run["run_id"] in str(err.value)
    assert (tmp_path / "over" / f"cost-report-{today}_{today}.html").exists()  # the report is still written
