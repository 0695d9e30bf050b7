"""KPIs and SLOs: built-in KPIs from real tables on DuckDB, absent tables reported (never a crash),
the spec's KPI map with SQL KPIs, SLO arithmetic and loud failures with runbook links."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from opsloop import costs, kpis
from opsloop.errors import SpecError
from opsloop.kpi_sources import p95
from opsloop.spec import PipelineSpec, load_spec, parse_spec
from opsloop.spec.ops import SloSpec
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter

EXAMPLE = Path(__file__).resolve().parents[2] / "pipelines" / "customer_ops_ai.yaml"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def spec() -> PipelineSpec:
    return load_spec(EXAMPLE)


def ledger_row(spec: PipelineSpec, root: str, stage: str, seconds: float, ago_h: float, **kw: Any) -> dict[str, Any]:
    start = NOW - timedelta(hours=ago_h)
    usage = costs.StageUsage(
        spec.name,
        stage,
        f"{root}-{stage}",
        stage,
        start,
        start + timedelta(seconds=seconds),
        root_flow_run_id=root,
        **kw,
    )
    return costs.build_row(usage, spec.costs)


def test_p95_nearest_rank() -> None:
    assert p95(list(range(1, 21))) == 19  # ceil(0.95 × 20) = 19th value
    assert p95([7.0]) == 7.0 and p95([]) is None
    assert p95([1, 100, 2, 3]) == 100


def test_builtin_kpis_from_real_tables(tmp_path: Path, spec: PipelineSpec) -> None:
    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    root = "run-now"
    costs.write_ledger(
        wh,
        [
            ledger_row(spec, root, "ingest", 30, 0.2, rows_ingested=4),
            ledger_row(spec, root, "score", 10, 0.1, rows_scored=4),
            ledger_row(spec, root, "sync", 5, 0.05, rows_pushed=3, api_calls={"hubspot": 2}),
        ],
    )
    wh.append(
        TableRef("ops_ai", "customers"),
        pa.table(
            {
                "customer_id": ["C1", "C2", "C3", "C4"],
                "email": ["a@x", None, None, "d@x"],
                "updated_at": [NOW - timedelta(minutes=m) for m in (50, 40, 30, 20)],
            }
        ),
    )
    wh.append(
        TableRef("ops_ai", "predictions"),
        pa.table(
            {
                "customer_id": ["C1", "C2", "C3", "C4"],
                "predicted_churn_risk": [0.1, 0.5, 0.9, 0.95],
                "risk_bucket": ["low", "medium", "high", "high"],
                "next_best_action": ["none", "check_in_email", "executive_call", "none"],
            }
        ),
    )
    wh.append(
        TableRef("opsloop_meta", "_quarantine"),
        pa.table({"run_id": [f"{root}-ingest", "older-run"], "rule": ["min", "min"]}),
    )
    wh.append(
        TableRef("opsloop_meta", "_sync_log"),
        pa.table({"run_id": [f"{root}-sync"] * 4, "status": ["ok", "ERROR", "held", "ok"]}),
    )
    ev = kpis.evaluate_run(wh, spec, kpis.RunFacts(spec.name, root, now=NOW, metrics={"model.auc": 0.81}))
    got = {k.kpi: k for k in ev.kpis}
    assert got["data.missing_rate.customers.email"].value == pytest.approx(0.5)
    assert got["data.missing_rate.customers.customer_id"].value == 0.0
    assert got["data.freshness_minutes.customers"].value == pytest.approx(20, abs=0.1)
    assert got["data.quarantine_rate"].value == pytest.approx(1 / 5)  # 1 quarantined of 4 + 1 rows
    assert got["data.rows_ingested"].value == 4
    assert got["model.score_mean"].value == pytest.approx(0.6125)
    assert got["model.bucket_share.high"].value == pytest.approx(0.5)
    assert got["business.crm_errors"].value == 1 and got["business.held_for_review"].value == 1
    assert got["business.predictions_pushed"].value == 3
    assert got["service.duration_seconds"].value == pytest.approx(0.15 * 3600 + 5, abs=1)
    assert got["cost.total_usd"].value == pytest.approx(45 * (0.000018 + 2 * 0.000002) + 2 * 0.000005, abs=1e-8)
    # absent tables: reported, not fatal
    assert got["data.missing_rate.transactions"].status == "missing"
    assert "ops_ai.transactions does not exist" in got["data.missing_rate.transactions"].detail
    assert got["model.psi"].status == "missing" and "drift" in got["model.psi"].detail
    assert got["service.failed_tasks"].status == "missing"
    # the KPI map: SQL KPI, built-in KPI with target, baseline and owner
    assert got["kpi.at_risk_customers_with_action"].value == 1  # C3: high and an action
    assert got["kpi.at_risk_customers_with_action"].owner == "head-of-customer-success@example.com"
    assert got["kpi.model_auc"].value == 0.81 and got["kpi.model_auc"].status == "on_target"
    assert got["kpi.crm_push_errors"].status == "off_target"  # 1 error, target 0, lower is better
    assert got["kpi.quarantine_rate"].baseline == 0.05 and got["kpi.quarantine_rate"].status == "off_target"
    stored = {r["kpi"]: r for r in kpis.read_kpis(wh, root)}
    assert stored["data.missing_rate.customers.email"]["value"] == pytest.approx(0.5)
    assert stored["kpi.model_auc"]["target"] == 0.75 and stored["kpi.model_auc"]["step"] == "model"
    assert stored["slo.weekly_retrain"]["status"] == "no_data"
    assert stored["data.schema_changes"]["status"] == "missing"  # first run: baseline recorded
    n = len(stored)
    kpis.evaluate_run(wh, spec, kpis.RunFacts(spec.name, root, now=NOW))  # evaluating again replaces
    assert len(kpis.read_kpis(wh, root)) == n
    wh.execute("ALTER TABLE ops_ai.customers ADD COLUMN phone VARCHAR")
    ev2 = kpis.evaluate_run(wh, spec, kpis.RunFacts(spec.name, "run-next", now=NOW))
    change = {k.kpi: k for k in ev2.kpis}["data.schema_changes"]
    assert change.value == 1 and "customers: +['phone:STRING']" in change.detail


def test_model_kpis_do_not_depend_on_the_order_rows_were_written_in(tmp_path: Path, spec: PipelineSpec) -> None:
    """A rerun that writes the same predictions in another order must report the same KPIs, to the
    last bit: a float sum of 0.1, 0.2, 0.3 is 0.6000000000000001 one way and 0.6 the other."""
    from opsloop.kpi_sources import model_kpis

    scores = [0.1, 0.2, 0.3] * 7 + [0.7, 1e-9, 0.123456789]
    values = []
    for i, order in enumerate((scores, scores[::-1])):
        wh = DuckDBAdapter(tmp_path / f"w{i}.duckdb")
        ids = [f"C{n}" for n in range(len(order))]
        wh.append(TableRef("ops_ai", "predictions"), pa.table({"customer_id": ids, "predicted_churn_risk": order}))
        values.append({k.kpi: k.value for k in model_kpis(wh, spec, []) if k.kpi.startswith("model.score")})
    assert sum(scores) != sum(scores[::-1])  # the float sums do differ by order
    assert values[0] == values[1]
    assert values[0]["model.score_mean"] == pytest.approx(sum(scores) / len(scores), rel=1e-9)


def test_nothing_written_yet_is_reported_not_raised(tmp_path: Path, spec: PipelineSpec) -> None:
    wh = DuckDBAdapter(tmp_path / "empty.duckdb")
    ev = kpis.evaluate_run(wh, spec, kpis.RunFacts(spec.name, "no-such-run", now=NOW))
    got = {k.kpi: k for k in ev.kpis}
    assert got["service.duration_seconds"].status == "missing"
    assert got["kpi.at_risk_customers_with_action"].status == "missing"
    assert "SQL failed" in got["kpi.at_risk_customers_with_action"].detail
    assert {s.status for s in ev.slos} == {"no_data"}
    kpis.raise_on_breach(spec, ev)  # no data is no breach


def _history(spec: PipelineSpec, seconds: list[float], failed_runs: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i, s in enumerate(seconds):
        status = "failed" if i < failed_runs else "completed"
        rows.append(ledger_row(spec, f"r{i:02d}", "ingest", s, len(seconds) - i, status=status))
    return rows


def test_slo_evaluation(spec: PipelineSpec) -> None:
    hist = _history(spec, [float(s) for s in range(1, 21)], failed_runs=3)
    p95_slo = SloSpec(name="ingest_p95", kind="p95_stage_seconds", stage="ingest", threshold=18, window_runs=20)
    res = kpis.evaluate_slo(p95_slo, hist, [], NOW)
    assert (res.value, res.status) == (19.0, "breach")
    assert "docs/runbooks.md#slow-stage" in res.message
    short = SloSpec(name="p", kind="p95_stage_seconds", stage="ingest", threshold=18, window_runs=5)
    assert kpis.evaluate_slo(short, hist, [], NOW).value == 20.0  # only the last 5 runs count
    few = SloSpec(name="few", kind="p95_stage_seconds", stage="ingest", threshold=1, min_runs=21)
    assert kpis.evaluate_slo(few, hist, [], NOW).status == "no_data"  # 20 runs < minRuns 21: no verdict
    fail = SloSpec(name="f", kind="failure_rate", threshold=0.1, window_runs=20)
    r = kpis.evaluate_slo(fail, hist, [], NOW)
    assert r.value == pytest.approx(3 / 20) and r.status == "breach"
    assert (
        kpis.evaluate_slo(SloSpec(name="f2", kind="failure_rate", threshold=0.1, window_runs=10), hist, [], NOW).value
        == 0
    )
    train = [ledger_row(spec, "t1", "train", 60, 24 * 10)]
    retrain = SloSpec(name="r", kind="retrain_days", threshold=8)
    got = kpis.evaluate_slo(retrain, train, [], NOW)
    assert got.value == pytest.approx(10 - 60 / 86400, abs=1e-3) and got.status == "breach"
    fresh = SloSpec(name="fr", kind="freshness_minutes", table="ops_ai.customers", threshold=30)
    builtin = [kpis.Kpi("data.freshness_minutes.customers", 45.0), kpis.Kpi("data.freshness_minutes.transactions", 5.0)]
    assert kpis.evaluate_slo(fresh, [], builtin, NOW).value == 45.0


def test_breached_slo_fails_loudly_with_runbook(tmp_path: Path, spec: PipelineSpec) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["slos"] = [
        {"name": "ingest_fast", "kind": "p95_stage_seconds", "stage": "ingest", "threshold": 10, "minRuns": 1}
    ]
    data["costs"]["budgetPerRunUsd"] = 0.0001
    tight = parse_spec(data)
    wh = DuckDBAdapter(tmp_path / "w.duckdb")
    costs.write_ledger(wh, [ledger_row(tight, "slow", "ingest", 120, 0.1)])
    ev = kpis.evaluate_run(wh, tight, kpis.RunFacts(tight.name, "slow", now=NOW))
    with pytest.raises(kpis.SloBreachedError) as err:
        kpis.raise_on_breach(tight, ev)
    msg = str(err.value)
    assert "SLO ingest_fast" in msg and "= 120" in msg and "threshold 10" in msg
    assert "docs/runbooks.md#slow-stage" in msg and "docs/runbooks.md#cost-overrun" in msg
    assert {r["kpi"]: r["status"] for r in kpis.read_kpis(wh, "slow")}["slo.ingest_fast"] == "breach"
    data["slos"] = []
    only_cost = parse_spec(data)
    with pytest.raises(kpis.CostBudgetExceededError, match="budgetPerRunUsd"):
        kpis.raise_on_breach(only_cost, kpis.evaluate_run(wh, only_cost, kpis.RunFacts(tight.name, "slow", now=NOW)))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"kpis": [{"name": "k", "step": "s", "metric": "x", "source": "sql", "owner": "o"}]}, "kpis[0].sql: required"),
        (
            {
                "kpis": [
                    {"name": "k", "step": "s", "metric": "x", "source": "sql", "owner": "o", "sql": "DELETE FROM t"}
                ]
            },
            "read-only SELECT",
        ),
        ({"kpis": [{"name": "k", "step": "s", "metric": "speed.x", "owner": "o"}]}, "built-in metrics start with"),
        ({"slos": [{"name": "s", "kind": "p95_stage_seconds", "threshold": 1}]}, "slos[0].stage: required"),
        ({"slos": [{"name": "s", "kind": "failure_rate", "threshold": 2}]}, "between 0 and 1"),
        ({"costs": {"apiUsdPerCall": {"salesforce": -1}}}, "apiUsdPerCall.salesforce"),
    ],
)
def test_bad_kpi_slo_cost_specs_name_the_field(patch: dict[str, Any], message: str) -> None:
    data = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    data.update(patch)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(data)
