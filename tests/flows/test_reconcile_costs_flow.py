"""The ``reconcile-costs`` flow on a real Prefect server: BigQuery mode through an ``opsloop-bigquery``
block pointed at the loopback recorder (ledger read + INFORMATION_SCHEMA.JOBS query through the real
client), and DuckDB mode, which has nothing to reconcile."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from opsloop import costs
from opsloop.spec.ops import CostSpec
from opsloop.warehouse.base import JobStats
from opsloop.warehouse.bigquery import BigQueryAdapter, make_bigquery_client
from tests.support.bq_recorder import JOB_HISTORY_FIELDS, BigQueryRecorder

REPO = Path(__file__).resolve().parents[2]
SPEC = str(REPO / "pipelines" / "customer_ops_ai.yaml")
T0 = datetime(2026, 11, 5, 2, 0, tzinfo=UTC)
BQ_TYPES = {"STRING": "STRING", "INT64": "INTEGER", "FLOAT64": "FLOAT", "TIMESTAMP": "TIMESTAMP"}
pytestmark = pytest.mark.slow


def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    return value


def test_reconcile_flow_in_bigquery_mode(prefect_api: str, rec: BigQueryRecorder) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect_gcp import GcpCredentials

    from blocks.warehouse import BigQueryConnector
    from flows.reconcile_costs import reconcile_costs

    run = str(uuid.uuid4())
    billed = 74_448_896 + 10_485_760
    jobs = [
        JobStats("merge", "m1", bytes_processed=73_400_320, bytes_billed=74_448_896),
        JobStats("query", "q1", bytes_processed=524_288, bytes_billed=10_485_760),
    ]
    usage = costs.StageUsage(
        "customer_ops_ai", "ingest", run, "ingest", T0, T0 + timedelta(seconds=20), warehouse="bigquery", jobs=jobs
    )
    row = costs.build_row(usage, CostSpec())
    wh = BigQueryAdapter(
        make_bigquery_client(rec.project, rec.location, api_endpoint=rec.url),
        project=rec.project,
        location=rec.location,
        retry_deadline=0.5,
    )
    costs.write_ledger(wh, [row])  # creates opsloop_meta.run_costs in the recorder's table registry
    fields = [{"name": c.name, "type": BQ_TYPES[c.type], "mode": "NULLABLE"} for c in costs.LEDGER_SCHEMA.columns]
    rec.results[r"FROM `opsloop-rec\.opsloop_meta\.run_costs`"] = (
        fields,
        [[_cell(row[c]) for c in costs.LEDGER_COLUMNS]],
    )
    history = [[run, "load_events", 2, 73_924_608, billed, 19_153]]
    rec.results[r"INFORMATION_SCHEMA\.JOBS"] = (JOB_HISTORY_FIELDS, history)

    name = f"rec-{uuid.uuid4().hex[:8]}"
    BigQueryConnector(
        gcp_credentials=GcpCredentials(
            service_account_info={
                "type": "service_account",
                "project_id": rec.project,
                "private_key_id": "k1",
                "private_key": _pem(),
                "client_email": "opsloop@opsloop-rec.iam.gserviceaccount.com",
                "token_uri": "http://127.0.0.1:9/token",
            }
        ),
        project=rec.project,
        location=rec.location,
        api_endpoint=rec.url,
    ).save(name, overwrite=True)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        state = reconcile_costs(SPEC, f"opsloop-bigquery/{name}", month="2026-11", return_state=True)
    assert state.is_completed(), state.message
    res = state.result()
    assert res["mode"] == "bigquery" and res["by_status"] == {"ok": 1}
    (got,) = res["rows"]
    assert got["flow_run_id"] == run and got["ledger_bytes_billed"] == got["bq_bytes_billed"] == billed
    sent = [j for j in rec.inserted_jobs("query") if "INFORMATION_SCHEMA" in j["configuration"]["query"]["query"]]
    assert len(sent) == 1 and sent[0]["configuration"]["labels"]["task"] == "reconcile_run_costs"
    params = {p["name"]: p["parameterValue"] for p in sent[0]["configuration"]["query"]["queryParameters"]}
    assert [v["value"] for v in params["run_ids"]["arrayValues"]] == [run]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cost-reconciliation"]))
        )
    assert any(run in str(a.data) for a in arts)


def test_reconcile_flow_on_duckdb_has_nothing_to_do(prefect_api: str, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from blocks.warehouse import DuckDBConnector
    from flows.reconcile_costs import reconcile_costs

    name = f"rec-{uuid.uuid4().hex[:8]}"
    DuckDBConnector(path=str(tmp_path / "w.duckdb")).save(name, overwrite=True)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        res = reconcile_costs(SPEC, f"opsloop-duckdb/{name}", month="2026-11")
    assert res["mode"] == "duckdb" and "no BigQuery jobs to reconcile" in res["message"]
