"""Cost ledger arithmetic against hand-computed figures, job attribution, idempotent ledger writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlglot

from opsloop import costs
from opsloop.spec.ops import CostSpec
from opsloop.upsert import upsert_rows_sql
from opsloop.warehouse.base import JobStats, TableRef, record_job
from opsloop.warehouse.duckdb import DuckDBAdapter
from opsloop.warehouse.merge import Dialect

MIB = 1024 * 1024
T0 = datetime(2026, 11, 3, 2, 0, tzinfo=UTC)


def q(processed: int, billed: int = 0, kind: str = "query", cache: bool = False) -> JobStats:
    return JobStats(
        kind, f"j{processed}_{billed}_{kind}", bytes_processed=processed, bytes_billed=billed, cache_hit=cache
    )


@pytest.mark.parametrize(
    ("processed", "reported", "expected"),
    [
        (0, 0, 0),  # nothing scanned (DDL, SELECT 1): nothing billed
        (1, 0, 10 * MIB),  # the 10 MiB per-query minimum
        (10 * MIB - 1, 0, 10 * MIB),
        (10 * MIB, 0, 10 * MIB),
        (10 * MIB + 1, 0, 11 * MIB),  # rounded up to the next whole MiB
        (123_456_789, 0, 118 * MIB),  # 117.74 MiB → 118 MiB = 123,731,968 bytes
        (73_400_320, 74_448_896, 74_448_896),  # BigQuery's own figure (per-table minimums) is kept
        (5 * MIB, 20 * MIB, 20 * MIB),  # two tables referenced: 2 × 10 MiB as BigQuery reported
    ],
)
def test_billed_bytes_rounding_and_minimum(processed: int, reported: int, expected: int) -> None:
    assert costs.billed_bytes(q(processed, reported)) == expected


def test_free_jobs_bill_nothing() -> None:
    assert costs.billed_bytes(q(5 * 10**9, kind="load")) == 0
    assert costs.billed_bytes(q(5 * 10**9, kind="append")) == 0
    assert costs.billed_bytes(q(5 * 10**9, 5 * 10**9, cache=True)) == 0
    assert costs.billed_bytes(q(1, kind="merge")) == 10 * MIB  # DML is a query job


def test_dollar_arithmetic() -> None:
    assert costs.bq_usd(1024**4, 6.25) == pytest.approx(6.25)
    assert costs.bq_usd(10 * MIB, 6.25) == pytest.approx(0.0000596046447753906, rel=1e-12)  # 10/1048576 × 6.25
    # 100 s × (1 vCPU × $0.000018 + 2 GiB × $0.000002) = $0.0018 + $0.0004
    assert costs.compute_usd(100, 1.0, 2.0, CostSpec()) == pytest.approx(0.0022, rel=1e-12)
    assert costs.per_1k(0.5, 2000) == pytest.approx(0.25)
    assert costs.per_1k(0.5, 0) is None


def test_pool_resources_from_job_variables() -> None:
    assert costs.parse_cpu("1000m") == 1.0 and costs.parse_cpu("2") == 2.0 and costs.parse_cpu(4) == 4.0
    assert costs.parse_memory_gib("512Mi") == 0.5 and costs.parse_memory_gib("2Gi") == 2.0
    assert costs.parse_memory_gib("1G") == pytest.approx(10**9 / 1024**3)
    assert costs.parse_cpu("lots") is None and costs.parse_memory_gib(None) is None
    spec = CostSpec(vcpu=1, memory_gib=2)
    assert costs.pool_resources({"cpu": "2000m", "memory": "4Gi"}, spec) == (2.0, 4.0)
    assert costs.pool_resources({"image": "x"}, spec) == (1.0, 2.0)


def _usage(**kw: object) -> costs.StageUsage:
    base: dict[str, object] = {
        "pipeline": "customer_ops_ai",
        "flow": "score",
        "flow_run_id": "run-1",
        "stage": "score",
        "started_at": T0,
        "ended_at": T0 + timedelta(seconds=60),
    }
    base.update(kw)
    return costs.StageUsage(**base)  # type: ignore[arg-type]


def test_bigquery_row_against_hand_computed_values() -> None:
    spec = CostSpec(api_usd_per_call={"salesforce": 0.00001, "hubspot": 0.000005})
    jobs = [q(73_400_320, 74_448_896, "merge"), q(1000), q(10**9, kind="load")]
    row = costs.build_row(
        _usage(
            warehouse="bigquery",
            jobs=jobs,
            rows_ingested=5000,
            rows_pushed=400,
            api_calls={"salesforce": 100, "hubspot": 40},
            api_left={"hubspot": 9960},
        ),
        spec,
    )
    billed = 74_448_896 + 10 * MIB  # MERGE as reported + SELECT at the 10 MiB minimum + free load
    bq = billed / 1024**4 * 6.25  # 81 MiB = 81/1048576 TiB × $6.25 = $0.00048279762268…
    compute = 60 * (1 * 0.000018 + 2 * 0.000002)  # = 0.00132
    api = 100 * 0.00001 + 40 * 0.000005  # = 0.0012
    total = bq + compute + api
    assert row["bq_jobs"] == 3 and row["warehouse_jobs"] == 3
    assert row["bq_bytes_processed"] == 73_400_320 + 1000 + 10**9
    assert row["bq_bytes_billed"] == billed == 84_934_656
    assert row["bq_usd"] == pytest.approx(81 * 6.25 / 1048576, abs=1e-9)  # stored to the nano-dollar
    assert row["bq_usd"] == pytest.approx(0.000482798, abs=1e-12)
    assert row["compute_usd"] == pytest.approx(0.00132, rel=1e-12)
    assert row["api_usd"] == pytest.approx(0.0012, rel=1e-12)
    assert row["total_usd"] == pytest.approx(total, abs=1e-9)
    assert row["usd_per_1k_ingested"] == pytest.approx(total / 5, abs=1e-9)  # total / 5000 rows × 1000
    assert row["usd_per_1k_pushed"] == pytest.approx(total / 0.4, abs=1e-9)
    assert row["api_calls"] == 140 and row["api_calls_left"] == 9960
    assert json.loads(row["api_detail"]) == {
        "hubspot": {"calls": 40, "left": 9960},
        "salesforce": {"calls": 100, "left": None},
    }
    assert row["wall_seconds"] == 60.0 and row["root_flow_run_id"] == "run-1"


def test_duckdb_row_has_zero_bigquery_columns_but_real_compute() -> None:
    row = costs.build_row(_usage(warehouse="duckdb", jobs=[q(10**9, 10**9)], rows_ingested=10), CostSpec())
    assert (row["bq_jobs"], row["bq_bytes_billed"], row["bq_usd"], row["bq_slot_ms"]) == (0, 0, 0.0, 0)
    assert row["warehouse_jobs"] == 1
    assert row["compute_usd"] == pytest.approx(0.00132) and row["total_usd"] == pytest.approx(0.00132)


def test_calls_left_from_the_daily_budget() -> None:
    spec = CostSpec(api_daily_budget={"salesforce": 50_000})
    row = costs.build_row(_usage(api_calls={"salesforce": 100}), spec, {"salesforce": 1000})
    assert row["api_calls_left"] == 50_000 - 1000 - 100
    reported = costs.build_row(_usage(api_calls={"salesforce": 100}, api_left={"salesforce": 7}), spec, {})
    assert reported["api_calls_left"] == 7  # what the CRM said wins over the budget arithmetic


def _job(run: str, task: str, i: int) -> JobStats:
    return JobStats("query", f"att_{run}_{task}_{i}", labels={"flow_run_id": run, "task": task})


def test_jobs_are_split_between_consecutive_stages_of_a_run() -> None:
    run = "7d0b6c1e-0000-4000-8000-00000000a001"
    for i in range(2):
        record_job(_job(run, "load_x", i))
    record_job(_job(run, "record_stage_cost", 9))  # bookkeeping: never part of a stage
    first = costs.stage_jobs(run, "ingest")
    assert [j.job_id for j in first] == [f"att_{run}_load_x_0", f"att_{run}_load_x_1"]
    costs.claim_jobs(first, run, "ingest")
    record_job(_job(run, "score_x", 0))
    second = costs.stage_jobs(run, "score")
    assert [j.job_id for j in second] == [f"att_{run}_score_x_0"]
    assert len(costs.stage_jobs(run, "ingest")) == 3  # re-recording ingest sees its own + unclaimed
    assert [j.job_id for j in costs.stage_jobs(run, "score", tasks=["score_x"])] == [f"att_{run}_score_x_0"]
    assert costs.stage_jobs("another-run", "ingest") == []


def test_fill_from_existing_keeps_what_the_first_write_knew() -> None:
    first = costs.build_row(_usage(api_calls={"hubspot": 5}, rows_scored=70, model_version="3"), CostSpec())
    again = costs.fill_from_existing(_usage(started_at=T0 + timedelta(seconds=5), status="completed"), first)
    assert again.api_calls == {"hubspot": 5} and again.rows_scored == 70 and again.model_version == "3"
    assert again.started_at == T0


def test_ledger_merge_is_idempotent_and_readable(tmp_path: Path) -> None:
    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    spec = CostSpec(api_daily_budget={"salesforce": 100})
    rows = [
        costs.build_row(
            _usage(stage=s, flow_run_id=f"r-{s}", root_flow_run_id="root", api_calls={"salesforce": 3}), spec
        )
        for s in ("ingest", "sync")
    ]
    assert costs.write_ledger(wh, rows) == 2
    costs.write_ledger(wh, rows)  # a rerun of the cost write
    changed = dict(rows[1], rows_pushed=42, usd_per_1k_pushed=None)
    costs.write_ledger(wh, [changed])
    got = costs.read_ledger(wh, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    assert [(r["flow_run_id"], r["stage"]) for r in got] == [("r-ingest", "ingest"), ("r-sync", "sync")]
    assert got[1]["rows_pushed"] == 42 and got[1]["usd_per_1k_pushed"] is None
    assert got[0]["started_at"] == T0 and got[0]["total_usd"] == pytest.approx(rows[0]["total_usd"])
    assert len(costs.read_ledger(wh, run_ids=["root"])) == 2
    assert costs.read_ledger(wh, T0 + timedelta(days=1), T0 + timedelta(days=2)) == []
    assert costs.api_calls_today(wh, "customer_ops_ai", T0) == {"salesforce": 6}
    assert costs.api_calls_today(wh, "customer_ops_ai", T0, exclude=("r-sync", "sync")) == {"salesforce": 3}
    n = wh.query("SELECT COUNT(*) AS n FROM opsloop_meta.run_costs").column(0)[0].as_py()
    assert n == 2


def test_ledger_upsert_sql_is_valid_bigquery() -> None:
    row = costs.build_row(_usage(warehouse="bigquery"), CostSpec())
    sql, params = upsert_rows_sql(
        Dialect("bigquery", project="proj"),
        TableRef("opsloop_meta", "run_costs"),
        costs.LEDGER_SCHEMA,
        ("flow_run_id", "stage"),
        [row],
    )
    assert sql.startswith("MERGE INTO `proj.opsloop_meta.run_costs` AS t")
    assert "CAST(@p0_started_at AS TIMESTAMP) AS `started_at`" in sql
    assert "CAST(NULL AS FLOAT64) AS `usd_per_1k_pushed`" in sql  # no rows pushed → NULL unit cost
    assert "ON t.`flow_run_id` = s.`flow_run_id` AND t.`stage` = s.`stage`" in sql
    assert params["p0_flow_run_id"] == "run-1" and "p0_usd_per_1k_pushed" not in params
    parsed = sqlglot.parse_one(sql, read="bigquery")
    assert isinstance(parsed, sqlglot.exp.Merge)


def test_fault_point_during_cost_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opsloop.errors import InjectedFault

    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    row = costs.build_row(_usage(), CostSpec())
    monkeypatch.setenv("OPSLOOP_FAULT", "during_cost_write")
    with pytest.raises(InjectedFault):
        costs.write_ledger(wh, [row])
    monkeypatch.delenv("OPSLOOP_FAULT")
    costs.write_ledger(wh, [row])  # the rerun converges: exactly one row
    assert len(costs.read_ledger(wh)) == 1
