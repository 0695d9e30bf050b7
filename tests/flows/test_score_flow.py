"""The score flow against a real ``mlflow server`` and a real Prefect server: it follows
``@champion``, falls back champion → previous → rules, names the tracking URI when MLflow is
down, holds high-risk rows until an approval through the Prefect API, routes exactly the canary
share to the challenger, and fans out over K partitions on a process work pool (K=4 == K=1;
one failed partition rerun alone completes the set)."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from blocks.mlflow import MLflowConnector
from blocks.warehouse import DuckDBConnector
from flows.promote_challenger import promote_challenger
from flows.score import score_customers
from opsloop.devstack.postgres import free_port
from opsloop.devstack.process import Service
from opsloop.devstack.stack import _bin
from opsloop.ml import monitor
from opsloop.ml.features import build_features, stable_bucket
from opsloop.ml.lifecycle import train_and_register
from opsloop.ml.registry import MLflowAdapter
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.support.fixtures.core import REPO, TEST_HOME
from tests.support.ml_data import SCORE_AS_OF, TRAIN_AS_OF, load_demo_warehouse
from tests.support.ml_spec import spec_dict, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_flows")]
SMALL = {"params": {"n_estimators": 40, "max_depth": 6, "random_state": 1, "class_weight": "balanced_subsample"}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, Any]:
    """Warehouse template with both snapshots; on the MLflow server v1 (weak) then v2 (strong, champion)."""
    d = tmp_path_factory.mktemp("score-flow")
    wh = DuckDBAdapter(d / "template.duckdb")
    load_demo_warehouse(wh, n=2000)
    base = spec_dict(model=SMALL)
    name = base["model"]["name"]
    weak = spec_dict(model={"name": name, "kind": "logistic_regression", "params": {}})
    weak["model"]["features"].update({"numeric": ["mrr", "tenure_days"], "categorical": ["plan"]})
    _, weak_spec = write_spec(d, weak)
    _, spec = write_spec(d, base)
    build_features(wh, spec.model.features, TRAIN_AS_OF)
    build_features(wh, spec.model.features, SCORE_AS_OF)
    reg = MLflowAdapter(mlflow_server, experiment=f"score-{uuid.uuid4().hex[:6]}")
    v1 = train_and_register(wh, reg, weak_spec.model, TRAIN_AS_OF, "manual", spec.name)
    v2 = train_and_register(wh, reg, spec.model, TRAIN_AS_OF, "manual", spec.name)
    assert (v1["decision"], v2["decision"]) == ("promoted", "promoted"), v2["reason"]
    return {"dir": d, "template": d / "template.duckdb", "reg": reg, "base": base, "name": name}


@pytest.fixture
def env(served: dict[str, Any], prefect_api: str, tmp_path: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    shutil.copy(served["template"], tmp_path / "w.duckdb")
    DuckDBConnector(path=str(tmp_path / "w.duckdb")).save(f"score-{tag}", overwrite=True)
    MLflowConnector(tracking_uri=served["reg"].tracking_uri, experiment="score").save(f"score-{tag}", overwrite=True)
    return {
        "wh": DuckDBAdapter(tmp_path / "w.duckdb"),
        "warehouse": f"opsloop-duckdb/score-{tag}",
        "mlflow": f"opsloop-mlflow/score-{tag}",
        "tag": tag,
    }


def _spec(served: dict[str, Any], tmp_path: Path, promotion: dict | None = None, **scoring: Any) -> str:
    sc = served["base"]["scoring"]
    data = {**served["base"], "scoring": {**sc, **scoring, "drift": {**sc["drift"], **scoring.get("drift", {})}}}
    if promotion:
        data["model"] = {**data["model"], "promotion": {**data["model"]["promotion"], **promotion}}
    return str(write_spec(tmp_path, data)[0])


def _preds(wh: DuckDBAdapter) -> dict[str, dict[str, Any]]:
    return {r["customer_id"]: r for r in wh.query("SELECT * FROM ops_ai.predictions").to_pylist()}


def _versions(wh: DuckDBAdapter) -> set[tuple[str, str, bool]]:
    return {(r["model_version"], r["model_alias"], r["is_fallback"]) for r in _preds(wh).values()}


def test_follows_champion_then_previous_then_rules(served: dict, env: dict, tmp_path: Path) -> None:
    reg: MLflowAdapter = served["reg"]
    name = served["name"]
    spec_path = _spec(served, tmp_path)
    kw = {"spec_path": spec_path, "warehouse": env["warehouse"], "mlflow": env["mlflow"], "as_of": str(SCORE_AS_OF)}
    out = score_customers(**kw)
    assert _versions(env["wh"]) == {("2", "champion", False)} and out["drift"]["rows"] > 1000
    try:
        reg.set_alias(name, "champion", "1")  # move the alias: scoring follows it
        score_customers(**kw)
        assert _versions(env["wh"]) == {("1", "champion", False)}
        reg.delete_alias(name, "champion")  # champion missing → previous
        score_customers(**kw)
        assert _versions(env["wh"]) == {("1", "previous", False)}
        reg.delete_alias(name, "previous")  # none → rules, clearly marked
        out = score_customers(**kw)
        assert _versions(env["wh"]) == {("rules", "rules", True)}
        assert {r["model_name"] for r in _preds(env["wh"]).values()} == {"rules"}
        assert out["partitions"][0]["is_fallback"] and "@previous unavailable" in " ".join(
            out["partitions"][0]["notes"]
        )
    finally:
        reg.set_alias(name, "champion", "2")
        reg.set_alias(name, "previous", "1")
    dead = f"http://127.0.0.1:{free_port()}"
    MLflowConnector(tracking_uri=dead).save(f"dead-{env['tag']}", overwrite=True)
    with pytest.raises(Exception, match=rf"MLflow tracking server {dead} is unreachable"):
        score_customers(**{**kw, "mlflow": f"opsloop-mlflow/dead-{env['tag']}"})


def test_canary_share_goes_to_the_challenger_then_rollout_decides(served: dict, env: dict, tmp_path: Path) -> None:
    reg: MLflowAdapter = served["reg"]
    name = served["name"]
    reg.set_alias(name, "challenger", "1")
    try:
        # a permissive distribution bound, so the realised outcomes decide
        spec_path = _spec(served, tmp_path, promotion={"maxScorePsi": 5.0}, canaryShare=0.3, drift={"minSample": 50})
        # score the labelled snapshot, so the rollout has realised outcomes to compare
        score_customers(spec_path=spec_path, warehouse=env["warehouse"], mlflow=env["mlflow"], as_of=str(TRAIN_AS_OF))
        rows = _preds(env["wh"])
        keys = sorted(rows)
        canary = {k for k, b in zip(keys, stable_bucket(keys), strict=True) if b < 0.3}
        sent_by_challenger = {k for k, r in rows.items() if r["served_by"] == "challenger"}
        assert sent_by_challenger == canary
        assert all(rows[k]["predicted_churn_risk"] == rows[k]["challenger_score"] for k in canary)
        assert all(rows[k]["model_version"] == ("1" if k in canary else "2") for k in keys)
        out = promote_challenger(spec_path=spec_path, warehouse=env["warehouse"], mlflow=env["mlflow"])
        assert out["decision"] == "rejected" and "realised AUC challenger" in out["reason"], out
        assert reg.version(name, "challenger") is None and reg.version(name, "champion").version == "2"
        assert reg.get_version(name, "1").tags["opsloop.decision"] == "rejected"
    finally:
        reg.delete_alias(name, "challenger")
        reg.set_alias(name, "champion", "2")


def test_review_queue_released_through_the_prefect_api(served: dict, env: dict, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.flow_runs import resume_flow_run

    spec_path = _spec(
        served,
        tmp_path,
        review={
            "enabled": True,
            "minScore": 0.6,
            "column": "mrr",
            "minValue": 150,
            "timeout": 300,
            "default": "reject",
        },
    )
    run_name = f"review-{env['tag']}"
    result: dict[str, Any] = {}

    def _run() -> None:
        try:
            result["out"] = score_customers.with_options(flow_run_name=run_name)(
                spec_path=spec_path, warehouse=env["warehouse"], mlflow=env["mlflow"], as_of=str(SCORE_AS_OF)
            )
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    t = threading.Thread(target=_run, daemon=True)
    t.start()
    flow_run = None
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "error" not in result:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
            if runs and runs[0].state is not None and runs[0].state.is_paused():
                flow_run = runs[0]
                break
            time.sleep(1)
    assert flow_run is not None, result.get("error")
    # held while paused: nothing released yet
    wh = env["wh"]
    held = {r["customer_id"] for r in wh.query("SELECT customer_id FROM ops_ai.review_queue").to_pylist()}
    feats = {
        r["customer_id"]: r["mrr"]
        for r in wh.query(
            "SELECT customer_id, mrr FROM ops_ai.customer_features WHERE as_of = $d", {"d": SCORE_AS_OF}
        ).to_pylist()
    }
    rows = _preds(wh)
    expected = {k for k, r in rows.items() if r["predicted_churn_risk"] >= 0.6 and (feats[k] or -1) >= 150}
    assert held == expected and expected
    assert {rows[k]["review_status"] for k in expected} == {"pending"}
    resume_flow_run(flow_run.id, run_input={"approve": True, "reject_ids": [], "note": "checked by ops"})
    t.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["out"]["review"]["released"] == len(expected)
    statuses = {r["customer_id"]: r["status"] for r in wh.query("SELECT * FROM ops_ai.review_queue").to_pylist()}
    assert set(statuses) == expected and set(statuses.values()) == {"released"}
    after = _preds(wh)
    assert {k for k, r in after.items() if r["review_status"] == "released"} == expected
    assert {r["review_status"] for k, r in after.items() if k not in expected} == {"not_required"}


@pytest.fixture
def score_worker(prefect_api: str) -> Any:
    """A process work pool + worker on the test server, and a deployment of the score flow from source."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"score-pool-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    worker = Service(
        f"score-worker-{pool}",
        [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "4"],
        TEST_HOME / "run",
        env={"PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    worker.start()
    with get_client(sync_client=True) as client:  # wait until the worker polls the pool
        deadline = time.monotonic() + 120
        while not client.read_workers_for_work_pool(pool):
            assert worker.pid() is not None, worker.logfile.read_text()[-2000:]
            assert time.monotonic() < deadline, "worker did not come up"
            time.sleep(1)
    flow = score_customers.from_source(source=str(REPO), entrypoint="flows/score.py:score_customers")
    name = f"score-{pool}"
    flow.deploy(name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False)
    yield f"score/{name}"
    worker.stop()


def _wait(runs: dict[int, Any], timeout: float = 600) -> dict[int, str]:
    from prefect.client.orchestration import get_client

    states: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while len(states) < len(runs) and time.monotonic() < deadline:
            for p, fid in runs.items():
                st = client.read_flow_run(fid).state
                if p not in states and st is not None and st.is_final():
                    states[p] = st.type.value
            time.sleep(1)
    return states


def _keyed(wh: DuckDBAdapter) -> dict[str, tuple[Any, ...]]:
    return {
        k: (r["predicted_churn_risk"], r["risk_bucket"], r["next_best_action"], r["model_version"])
        for k, r in _preds(wh).items()
    }


def test_fan_out_k4_equals_k1_and_failed_partition_rerun(
    served: dict, env: dict, tmp_path: Path, score_worker: str
) -> None:
    from prefect.deployments import run_deployment

    spec_path = _spec(served, tmp_path)
    wh = env["wh"]
    kw = {"spec_path": spec_path, "warehouse": env["warehouse"], "mlflow": env["mlflow"], "as_of": str(SCORE_AS_OF)}
    score_customers(**kw)
    reference = _keyed(wh)
    wh.execute("DELETE FROM ops_ai.predictions WHERE TRUE")
    out = score_customers(**kw, partitions=4, deployment=score_worker, build=False, fan_out_timeout=600)
    assert [p["state"] for p in out["partitions"]] == ["COMPLETED"] * 4
    assert _keyed(wh) == reference
    assert sorted({r["partition"] for r in _preds(wh).values()}) == [0, 1, 2, 3]
    # one partition fails (injected after scoring, before its MERGE); the other three land
    wh.execute("DELETE FROM ops_ai.predictions WHERE TRUE")
    batch = f"manual-{env['tag']}"
    child = {**kw, "partitions": 4, "batch": batch, "build": False}
    runs = {}
    for p in range(4):  # all four at once on the pool, partition 2 with an injected fault
        jv = {"env": {"OPSLOOP_FAULT": "after_scoring_before_merge"}} if p == 2 else {}
        runs[p] = run_deployment(score_worker, parameters={**child, "partition": p}, job_variables=jv, timeout=0).id
    states = _wait(runs)
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED", 3: "COMPLETED"}
    partial = _keyed(wh)
    assert 0 < len(partial) < len(reference) and all(reference[k] == v for k, v in partial.items())
    with pytest.raises(Exception, match=r"partition\(s\) \[2\] of 4"):
        monitor.check_complete(monitor.read_parts(wh, batch), 4, batch)
    rerun = run_deployment(score_worker, parameters={**child, "partition": 2}, timeout=0).id
    assert _wait({2: rerun}) == {2: "COMPLETED"}
    assert _keyed(wh) == reference
    monitor.check_complete(monitor.read_parts(wh, batch), 4, batch)
