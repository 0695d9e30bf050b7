"""BigQuery job statistics → cost ledger, through the real google-cloud-bigquery client against the
loopback recorder (recorded job resources with bytes billed / slot ms, which no emulator returns):
the stage's jobs are found by the run's labels, priced, and the ledger row lands in BigQuery with
those labels; the reconciliation query runs through the client and is compared with the ledger."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from opsloop import costs, reconcile
from opsloop.spec.ops import CostSpec
from opsloop.warehouse.base import MergeSpec, TableRef, TableSchema, clean_labels
from opsloop.warehouse.bigquery import BigQueryAdapter, make_bigquery_client
from opsloop.warehouse.write import write_merge
from tests.support.bq_recorder import JOB_HISTORY_FIELDS, BigQueryRecorder

T0 = datetime(2026, 11, 5, 2, 0, tzinfo=UTC)
SCHEMA = pa.schema(
    [("event_id", pa.string()), ("amount", pa.decimal128(38, 9)), ("updated_at", pa.timestamp("us", tz="UTC"))]
)
TARGET = TableRef("ops_ai", "events")


def adapter(rec: BigQueryRecorder, labels: dict[str, str]) -> BigQueryAdapter:
    client = make_bigquery_client(rec.project, rec.location, api_endpoint=rec.url)
    return BigQueryAdapter(
        client, project=rec.project, location=rec.location, labels=labels, retry_deadline=0.5, upload_retries=0
    )


def labels(run: str, task: str) -> dict[str, str]:
    return {"pipeline": "customer_ops_ai", "flow": "ingest", "flow_run_id": run, "deployment": "nightly", "task": task}


def _params(job: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["parameterValue"].get("value") for p in job["configuration"]["query"]["queryParameters"]}


def test_recorded_job_statistics_land_in_the_ledger_with_the_run_labels(rec: BigQueryRecorder) -> None:
    run = str(uuid.uuid4()).upper()  # labels are lower-cased by the adapter; the ledger finds them anyway
    wh = adapter(rec, labels(run, "load_events"))
    data = pa.Table.from_pylist(
        [{"event_id": f"e{i}", "amount": Decimal(i), "updated_at": T0 + timedelta(minutes=i)} for i in range(5)],
        schema=SCHEMA,
    )
    spec = MergeSpec(TARGET, tuple(SCHEMA.names), ("event_id",), ("updated_at",))
    write_merge(wh, TARGET, TableSchema.from_arrow(SCHEMA), SCHEMA, data.to_batches(), spec, f"{run}_events")
    wh.query("SELECT COUNT(*) AS n FROM `opsloop-rec.ops_ai.events`")

    jobs = costs.stage_jobs(run, "ingest")
    recorded = rec.inserted_jobs()
    assert [j.job_id for j in jobs] == [j["jobReference"]["jobId"] for j in recorded]  # every job, none else
    assert {j.labels["flow_run_id"] for j in jobs} == {run.lower()}
    billed = sum(int(j["statistics"]["query"]["totalBytesBilled"]) for j in recorded if "query" in j["statistics"])
    processed = sum(
        int(j["statistics"]["query"]["totalBytesProcessed"]) for j in recorded if "query" in j["statistics"]
    )
    slot_ms = sum(int(j["statistics"].get("totalSlotMs", 0)) for j in recorded)  # loads use slots too (not billed)
    kinds = sorted({j.kind for j in jobs})
    assert "load" in kinds and "merge" in kinds and "query" in kinds
    assert billed == 74_448_896 + 10_485_760  # the recorded MERGE (71 MiB) + SELECT (10 MiB minimum)

    row = costs.build_row(
        costs.StageUsage(
            "customer_ops_ai",
            "ingest",
            run.lower(),
            "ingest",
            T0,
            T0 + timedelta(seconds=30),
            deployment="nightly",
            warehouse=wh.dialect,
            jobs=jobs,
            rows_ingested=5,
        ),
        CostSpec(),
    )
    assert row["bq_jobs"] == len(recorded) and row["bq_bytes_billed"] == billed
    assert row["bq_bytes_processed"] == processed and row["bq_slot_ms"] == slot_ms
    assert row["bq_usd"] == pytest.approx(billed / 1024**4 * 6.25, abs=1e-9)
    assert row["total_usd"] == pytest.approx(row["bq_usd"] + 30 * 0.000022, abs=2e-9)

    book = adapter(rec, labels(run, "record_stage_cost"))
    before = len(rec.inserted_jobs("query"))
    costs.write_ledger(book, [row])
    costs.claim_jobs(jobs, run, "ingest")
    ledger_jobs = [
        j for j in rec.inserted_jobs("query")[before:] if "MERGE INTO" in j["configuration"]["query"]["query"]
    ]
    assert len(ledger_jobs) == 1
    job = ledger_jobs[0]
    assert "`opsloop-rec.opsloop_meta.run_costs`" in job["configuration"]["query"]["query"]
    assert job["configuration"]["labels"] == clean_labels(labels(run, "record_stage_cost"))
    params = _params(job)
    assert params["p0_flow_run_id"] == run.lower() and params["p0_stage"] == "ingest"
    assert params["p0_bq_bytes_billed"] == str(billed) and params["p0_bq_jobs"] == str(len(recorded))
    assert params["p0_warehouse"] == "bigquery"
    assert "opsloop_meta.run_costs" in rec.tables  # created with the ledger schema
    cols = {f["name"]: f["type"] for f in rec.tables["opsloop_meta.run_costs"]["schema"]["fields"]}
    assert cols["bq_bytes_billed"] == "INT64" and cols["started_at"] == "TIMESTAMP"
    assert costs.stage_jobs(run, "score") == []  # ingest's jobs are claimed; the ledger's own are bookkeeping

    # reconciliation: the job-history query goes through the client; BigQuery's figures agree
    rec.results[r"INFORMATION_SCHEMA\.JOBS"] = (
        JOB_HISTORY_FIELDS,
        [
            [run.lower(), "load_events", len(recorded), processed, billed, slot_ms],
            [run.lower(), "record_stage_cost", 2, 0, 10_485_760, 5],
        ],
    )
    history = reconcile.job_history(book, T0 - timedelta(days=1), T0 + timedelta(days=1), [run.lower()])
    sent = [j for j in rec.inserted_jobs("query") if "INFORMATION_SCHEMA" in j["configuration"]["query"]["query"]][-1]
    assert "`opsloop-rec`.`region-eu`.INFORMATION_SCHEMA.JOBS" in sent["configuration"]["query"]["query"]
    arr = next(p for p in sent["configuration"]["query"]["queryParameters"] if p["name"] == "run_ids")
    assert [v["value"] for v in arr["parameterValue"]["arrayValues"]] == [run.lower()]
    (result,) = reconcile.reconcile([dict(row, started_at=T0)], history)
    assert result.status == "ok" and result.bq_bytes_billed == billed and result.overhead_jobs == 2
