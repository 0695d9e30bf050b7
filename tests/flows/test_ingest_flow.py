"""The ingest flow on a real Prefect server: demo data in Postgres → CDC → gates/PII → DuckDB, twice."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from opsloop import demodata

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def ingest_setup(prefect_api: str, pg_dsn: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    from prefect.blocks.system import Secret

    from blocks.postgres import PostgresConnector
    from blocks.warehouse import DuckDBConnector

    name = f"ingest-{uuid.uuid4().hex[:8]}"
    slot = f"opsloop_{uuid.uuid4().hex[:10]}"
    DuckDBConnector(path=str(tmp_path / "wh.duckdb")).save(name, overwrite=True)
    PostgresConnector(dsn=pg_dsn).save(name, overwrite=True)
    Secret(value="flow-test-salt").save(name, overwrite=True)
    spec = yaml.safe_load((REPO / "pipelines" / "customer_ops_ai.yaml").read_text())
    spec["cdc"].update(slotName=slot, publication=slot)
    spec["transform"]["pii"]["saltSecretRef"] = f"secret/{name}"
    for s in spec["sources"]:
        if s["id"] == "postgres_main":
            s["connection"] = f"opsloop-postgres/{name}"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    yield {"spec": str(path), "warehouse": f"opsloop-duckdb/{name}", "dsn": pg_dsn, "slot": slot}
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,))


def test_ingest_flow_two_nights(ingest_setup: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from blocks import load_warehouse
    from flows.ingest import ingest

    seeded = demodata.seed(ingest_setup["dsn"], customers=1000, seed=3)
    kwargs = {"spec_path": ingest_setup["spec"], "warehouse": ingest_setup["warehouse"], "sources": ["postgres_main"]}

    def event_ids() -> tuple[set[str], set[str]]:
        """Transactions in the warehouse and in Postgres."""
        wh = load_warehouse(ingest_setup["warehouse"])
        landed = {r["event_id"] for r in wh.query("SELECT event_id FROM ops_ai.transactions").to_pylist()}
        with psycopg.connect(ingest_setup["dsn"]) as c:
            return landed, {r[0] for r in c.execute("SELECT event_id FROM transactions").fetchall()}

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        first = ingest(**kwargs)
        changes = demodata.advance(ingest_setup["dsn"], seed=4)
        landed, source = event_ids()
        # a deleted transaction the first night quarantined never landed: nothing to delete for it
        gone = landed - source
        second_state = ingest(**kwargs, return_state=True)
    second = second_state.result()
    total = sum(seeded.values())
    assert first["rows_read"] == total
    assert 0 < first["rows_quarantined"] < 0.05 * total
    assert {"min:amount", "not_null:customer_id", "accepted_values:currency"} <= set(first["quarantined_by_rule"])
    assert first["rows_ingested"] == first["rows_read"] - first["rows_quarantined"]
    src = first["sources"]["postgres_main"]
    assert src["mode"] == "cdc" and src["streams"]["customers"]["kind"] == "snapshot"
    new_rows = changes["customers_new"] + changes["transactions_new"]
    assert second["inserted"] >= new_rows - second["rows_quarantined"]
    assert changes["transactions_deleted"] >= 1 and len(gone) <= changes["transactions_deleted"]
    assert second["deleted"] == len(gone)
    landed, source = event_ids()
    assert not landed - source and not landed & gone  # every deleted transaction left the warehouse
    assert second["updated"] >= changes["customers_updated"]
    assert second["sources"]["postgres_main"]["streams"]["transactions"]["kind"] == "incremental"
    assert "slot_lag_bytes" in second

    wh = load_warehouse(ingest_setup["warehouse"])
    with psycopg.connect(ingest_setup["dsn"]) as c:
        (n_customers,) = c.execute("SELECT count(*) FROM customers").fetchone()
    assert wh.query("SELECT count(*) AS n FROM ops_ai.customers").to_pylist() == [{"n": n_customers}]
    masked = wh.query("SELECT count(*) AS n FROM ops_ai.customers WHERE email LIKE '%***@%'").to_pylist()[0]["n"]
    assert masked > 0.9 * n_customers
    assert wh.query("SELECT count(DISTINCT email_hash) AS n FROM ops_ai.customers").to_pylist()[0]["n"] > 0

    run_id = second_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: a for a in arts}
    assert {"ingest-report", "ingest-streams"} <= set(by_key)
    assert "| postgres_main | transactions | incremental |" in str(by_key["ingest-report"].data)
    assert "→" in str(by_key["ingest-report"].data)


def test_ingest_flow_rejects_unknown_sources(ingest_setup: dict[str, Any]) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.ingest import ingest

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        state = ingest(
            spec_path=ingest_setup["spec"], warehouse=ingest_setup["warehouse"], sources=["nope"], return_state=True
        )
    assert state.is_failed() and "['nope'] are not sources" in str(state.result(raise_on_failure=False))
