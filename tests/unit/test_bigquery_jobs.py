"""The BigQuery adapter through the real google-cloud-bigquery client against a loopback recorder:
what the emulator cannot show (labels, bytes cap, load config, job ids, job statistics) and the
error translation (Terminal vs Transient, with identifiers)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from opsloop.errors import TerminalError, TransientError
from opsloop.warehouse.base import MergeSpec, StateUpdate, TableRef, TableSchema, clean_labels
from opsloop.warehouse.bigquery import BigQueryAdapter, make_bigquery_client
from opsloop.warehouse.bigquery_support import job_id_for
from opsloop.warehouse.write import write_merge
from tests.support.bq_recorder import BigQueryRecorder

CAP = 5_000_000_000
LABELS = {
    "pipeline": "customer_ops_ai",
    "flow": "nightly",
    "flow_run_id": "3F2C9A1E-5B7D-4C2A-9E61-0D4B8F7A1C22",
    "task": "load_transactions",
}
T0 = datetime(2026, 11, 1, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("amount", pa.decimal128(38, 9)),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("_deleted", pa.bool_()),
    ]
)
TARGET = TableRef("ops_ai", "events")
SPEC = MergeSpec(
    TARGET,
    ("event_id", "amount", "updated_at"),
    ("event_id",),
    ("updated_at",),
    delete_flag="_deleted",
    partition_column="updated_at",
)


def data(n: int = 6) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"event_id": f"e{i}", "amount": Decimal(i) / 4, "updated_at": T0 + timedelta(hours=i), "_deleted": False}
            for i in range(n)
        ],
        schema=SCHEMA,
    )


def adapter(rec: BigQueryRecorder, **kw: Any) -> BigQueryAdapter:
    client = make_bigquery_client(rec.project, rec.location, api_endpoint=rec.url)
    return BigQueryAdapter(
        client,
        project=rec.project,
        location=rec.location,
        labels=LABELS,
        maximum_bytes_billed=CAP,
        retry_deadline=0.5,
        upload_retries=0,
        **kw,
    )


def _micros(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


def _bounds_result(rec: BigQueryRecorder, lo: datetime, hi: datetime) -> None:
    fields = [{"name": "lo", "type": "TIMESTAMP", "mode": "NULLABLE"}, {"name": "hi", "type": "TIMESTAMP"}]
    rec.results[r"^SELECT MIN\(`updated_at`\)"] = (fields, [[_micros(lo), _micros(hi)]])


def test_write_merge_jobs_carry_labels_cap_config_and_recorded_stats(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    _bounds_result(rec, T0, T0 + timedelta(hours=5))
    table_schema = TableSchema.from_arrow(SCHEMA.remove(3), partition_by="updated_at", cluster_by=("event_id",))
    state = StateUpdate("customer_ops_ai", "pg.transactions", "run-42", watermark=T0 + timedelta(hours=5))
    result = write_merge(
        wh, TARGET, table_schema, SCHEMA, data().to_batches(max_chunksize=2), SPEC, "run-42_transactions", state
    )

    jobs = rec.inserted_jobs()
    kinds = [j["jobReference"]["jobId"].split("_")[1] for j in jobs]
    assert kinds == ["ddl", "load", "merge", "merge", "ddl", "state"]  # merge_bounds, merge, state table, state
    expected_labels = clean_labels(LABELS)
    assert expected_labels["flow_run_id"] == "3f2c9a1e-5b7d-4c2a-9e61-0d4b8f7a1c22"
    for job in jobs:
        assert job["configuration"]["labels"] == expected_labels, job["jobReference"]
    for job in (j for j in jobs if "query" in j["configuration"]):
        assert job["configuration"]["query"]["maximumBytesBilled"] == str(CAP)
        assert job["configuration"]["query"]["useLegacySql"] is False

    ddl = jobs[0]["configuration"]["query"]["query"]
    assert "PARTITION BY DATE(`updated_at`)" in ddl and "CLUSTER BY `event_id`" in ddl

    load = jobs[1]
    cfg = load["configuration"]["load"]
    assert cfg["sourceFormat"] == "PARQUET"
    assert cfg["writeDisposition"] == "WRITE_TRUNCATE"
    assert cfg["decimalTargetTypes"] == ["NUMERIC", "BIGNUMERIC"]
    assert cfg["destinationTable"] == {"projectId": rec.project, "datasetId": "ops_ai", "tableId": "_stg_events"}
    assert [(f["name"], f["type"]) for f in cfg["schema"]["fields"]] == [
        ("event_id", "STRING"),
        ("amount", "NUMERIC"),
        ("updated_at", "TIMESTAMP"),
        ("_deleted", "BOOL"),
    ]
    job_id = load["jobReference"]["jobId"]
    assert job_id == job_id_for("load", f"{rec.project}.ops_ai._stg_events", "run-42_transactions_load")
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,1024}", job_id)
    upload = next(r for r in rec.requests if r.path.startswith("/upload/"))
    assert upload.params["uploadType"] == ["multipart"] and upload.data_bytes > 0

    merge = jobs[3]["configuration"]["query"]
    assert merge["query"].startswith("MERGE INTO `opsloop-rec.ops_ai.events` AS t")
    # pruned to the partition range present in staging (from the MIN/MAX job)
    assert "BETWEEN TIMESTAMP '2026-11-01 00:00:00+00:00' AND TIMESTAMP '2026-11-01 05:00:00+00:00'" in merge["query"]
    state_q = jobs[5]["configuration"]["query"]
    assert state_q["parameterMode"] == "NAMED"
    params = {
        p["name"]: (p["parameterType"]["type"], p["parameterValue"].get("value")) for p in state_q["queryParameters"]
    }
    assert params["pipeline"] == ("STRING", "customer_ops_ai")
    assert params["last_run_id"] == ("STRING", "run-42")
    assert params["watermark"][0] == "TIMESTAMP" and params["watermark"][1].startswith("2026-11-01 05:00:00")

    # staging: expires in a day, dropped after the MERGE
    patch = next(r for r in rec.requests if r.method == "PATCH")
    assert patch.path.endswith("/datasets/ops_ai/tables/_stg_events")
    expires = datetime.fromtimestamp(int(patch.body["expirationTime"]) / 1000, UTC)
    assert timedelta(hours=23) < expires - datetime.now(UTC) <= timedelta(days=1)
    assert rec.requests[-1].method == "DELETE" and rec.requests[-1].path.endswith("/tables/_stg_events")

    # statistics: what the recorded job resources say, per job
    assert (result.inserted, result.updated, result.deleted) == (1000, 400, 100)
    m = result.jobs[1]
    assert (m.kind, m.bytes_processed, m.bytes_billed, m.slot_ms, m.rows) == ("merge", 73400320, 74448896, 18542, 1500)
    assert m.job_id == jobs[3]["jobReference"]["jobId"] and m.labels == expected_labels and m.cache_hit is False
    assert result.jobs[0].kind == "load" and result.jobs[0].rows == 6 and result.jobs[0].slot_ms == 1375
    by_kind = {j.kind: j for j in wh.jobs}
    assert set(by_kind) == {"ddl", "load", "merge_bounds", "merge", "state"}
    assert by_kind["merge_bounds"].bytes_billed == 10485760 and by_kind["merge_bounds"].slot_ms == 611
    assert by_kind["state"].bytes_billed == 74448896 and by_kind["state"].started is not None
    assert all(j.labels == expected_labels for j in wh.jobs)


def test_merge_without_staging_rows_in_range_merges_unbounded(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    rec.results[r"^SELECT MIN"] = (
        [{"name": "lo", "type": "TIMESTAMP"}, {"name": "hi", "type": "TIMESTAMP"}],
        [[None, None]],
    )
    wh.merge(SPEC, TableRef("ops_ai", "_stg_events"))
    merge = rec.inserted_jobs()[-1]["configuration"]["query"]["query"]
    assert merge.startswith("MERGE") and "BETWEEN" not in merge


@pytest.mark.parametrize("upload", ["multipart", "resumable"])
def test_retried_load_resumes_the_same_job_instead_of_loading_twice(
    rec: BigQueryRecorder, monkeypatch: pytest.MonkeyPatch, upload: str
) -> None:
    if upload == "resumable":
        monkeypatch.setattr("google.cloud.bigquery.client._MAX_MULTIPART_SIZE", 1)
    stg = TableRef("ops_ai", "_stg_events")
    first = adapter(rec).load_staging(stg, data(), SCHEMA, job_key="flowrun-7/load:transactions")
    retry = adapter(rec).load_staging(stg, data(), SCHEMA, job_key="flowrun-7/load:transactions")

    assert len(rec.inserted_jobs("load")) == 1
    assert retry.job_id == first.job_id and retry.rows == first.rows == 6
    assert first.job_id is not None and re.fullmatch(
        r"opsloop_load_ops_ai__stg_events_flowrun-7_load_transactions_\w+", first.job_id
    )
    statuses = [r.status for r in rec.requests if r.path.startswith("/upload/")]
    assert 409 in statuses, statuses
    gets = [r for r in rec.requests if r.method == "GET" and r.path.endswith(f"/jobs/{first.job_id}")]
    assert gets, "after the 409 the adapter fetches the existing job"
    if upload == "resumable":
        assert {r.params["uploadType"][0] for r in rec.requests if r.path.startswith("/upload/")} == {"resumable"}


def test_same_key_for_another_table_is_another_job(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    a = wh.load_staging(TableRef("ops_ai", "_stg_a"), data(), SCHEMA, job_key="k")
    b = wh.load_staging(TableRef("ops_ai", "_stg_b"), data(), SCHEMA, job_key="k")
    assert a.job_id != b.job_id and len(rec.inserted_jobs("load")) == 2


def test_retry_after_a_failed_load_job_loads_under_the_next_id(rec: BigQueryRecorder) -> None:
    stg = TableRef("ops_ai", "_stg_events")
    first = adapter(rec).load_staging(stg, data(), SCHEMA, job_key="k1")
    assert first.job_id is not None
    rec.jobs[first.job_id]["status"]["errorResult"] = {"reason": "backendError", "message": "Backend error"}
    again = adapter(rec).load_staging(stg, data(), SCHEMA, job_key="k1")
    assert again.job_id == job_id_for("load", f"{rec.project}.ops_ai._stg_events", "k1", attempt=1)
    assert len(rec.inserted_jobs("load")) == 2


def test_resumed_load_whose_table_was_dropped_loads_again(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    stg = TableRef("ops_ai", "_stg_events")
    first = wh.load_staging(stg, data(), SCHEMA, job_key="k1")
    wh.drop_table(stg)  # the earlier attempt went on to MERGE and drop staging, then the task failed
    again = adapter(rec).load_staging(stg, data(), SCHEMA, job_key="k1")
    assert again.job_id != first.job_id and len(rec.inserted_jobs("load")) == 2
    assert wh.table_schema(stg) is not None


def test_with_labels_shares_jobs_and_overrides_labels(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    scoped = wh.with_labels(task="Score Customers")
    scoped.execute("DELETE FROM `opsloop-rec.ops_ai.events` WHERE TRUE", kind="cleanup")
    assert wh.jobs is scoped.jobs and wh.jobs[-1].kind == "cleanup"
    assert rec.inserted_jobs()[-1]["configuration"]["labels"]["task"] == "score_customers"
    assert wh.labels["task"] == "load_transactions"


def test_query_parameter_types_are_inferred(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    values = {
        "s": "x",
        "i": 3,
        "f": 1.5,
        "b": True,
        "ts": T0,
        "d": date(2026, 11, 1),
        "n": Decimal("12.5"),
        "big": Decimal("1" * 35),
        "none": None,
        "ids": ["a", "b"],
    }
    wh.query("SELECT 1", values)
    sent = rec.inserted_jobs()[-1]["configuration"]["query"]["queryParameters"]
    types = {p["name"]: p["parameterType"].get("type") for p in sent}
    assert types == {
        "s": "STRING",
        "i": "INT64",
        "f": "FLOAT64",
        "b": "BOOL",
        "ts": "TIMESTAMP",
        "d": "DATE",
        "n": "NUMERIC",
        "big": "BIGNUMERIC",
        "none": "STRING",
        "ids": "ARRAY",
    }
    arr = next(p for p in sent if p["name"] == "ids")
    assert arr["parameterType"]["arrayType"]["type"] == "STRING"


# -- error translation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("tooManyRequests", TransientError),  # 429
        ("backendError", TransientError),  # 503
        ("rateLimitExceeded", TransientError),  # 403 with a rate-limit reason
        ("invalidQuery", TerminalError),  # 400
        ("accessDenied", TerminalError),  # 403
        ("notFound", TerminalError),  # 404
    ],
)
def test_query_api_errors_are_translated_with_identifiers(
    rec: BigQueryRecorder, reason: str, expected: type[Exception]
) -> None:
    wh = adapter(rec)
    rec.fail("POST", r"/jobs$", reason, times=None)
    with pytest.raises(expected) as info:
        wh.merge(SPEC.__class__(**{**SPEC.__dict__, "partition_column": None}), TableRef("ops_ai", "_stg_events"))
    msg = str(info.value)
    assert "merge job" in msg and "ops_ai.events" in msg
    assert isinstance(info.value.__cause__, Exception)  # raise … from exc
    assert not isinstance(info.value, TerminalError if expected is TransientError else TransientError)


@pytest.mark.parametrize(("reason", "expected"), [("backendError", TransientError), ("invalid", TerminalError)])
def test_load_upload_errors_are_translated_with_the_table(
    rec: BigQueryRecorder, reason: str, expected: type[Exception]
) -> None:
    wh = adapter(rec)
    rec.fail("POST", r"^/upload/", reason, times=None)
    with pytest.raises(expected, match=r"load job opsloop_load_\S+ into opsloop-rec\.ops_ai\._stg_events"):
        wh.load_staging(TableRef("ops_ai", "_stg_events"), data(), SCHEMA, job_key="k9")


def test_failed_job_is_terminal_and_names_the_job(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    rec.job_errors[r"^MERGE"] = "invalidQuery"
    with pytest.raises(
        TerminalError, match=r"merge job opsloop_merge_[0-9a-f-]+ on ops_ai\.events .*Unrecognized name"
    ):
        wh.merge(SPEC, TableRef("ops_ai", "_stg_events"))


def test_bytes_billed_cap_exceeded_is_terminal_and_says_cap_and_query(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    rec.cap_in_error = CAP
    rec.job_errors[r"^MERGE"] = "bytesBilledLimitExceeded"
    with pytest.raises(TerminalError) as info:
        wh.merge(SPEC, TableRef("ops_ai", "_stg_events"))
    msg = str(info.value)
    assert "maximum_bytes_billed=5,000,000,000" in msg
    assert re.search(r"merge job opsloop_merge_[0-9a-f-]+ on ops_ai\.events \[MERGE INTO `opsloop-rec", msg), msg


def test_connection_refused_is_transient(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    rec.stop()
    with pytest.raises(TransientError, match=r"table opsloop-rec\.ops_ai\.events"):
        wh.table_schema(TARGET)


def test_batch_that_does_not_fit_the_schema_is_terminal_before_any_upload(rec: BigQueryRecorder) -> None:
    wh = adapter(rec)
    bad = pa.RecordBatch.from_pydict({"event_id": ["a"], "amount": ["12,50"], "updated_at": [T0], "_deleted": [False]})
    with pytest.raises(TerminalError, match=r"staging opsloop-rec\.ops_ai\._stg_events: batch at row 0 does not fit"):
        wh.load_staging(TableRef("ops_ai", "_stg_events"), [bad], SCHEMA, job_key="k")
    assert not [r for r in rec.requests if r.path.startswith("/upload/")]
