"""Model lifecycle against a real ``mlflow server`` over HTTP and a real Prefect server:
first model → champion; worse challenger registered, not promoted (tag says why); better one
promoted, old one keeps ``previous``; rollback restores. Plus a differently shaped dataset
configured only through a spec, and ``mlflow models serve`` scoring one request."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from blocks.mlflow import load_registry
from flows.rollback_model import rollback_model
from flows.train import train_model
from opsloop.devstack.postgres import free_port
from opsloop.devstack.process import Service
from opsloop.devstack.stack import _bin
from opsloop.ml import triggers
from opsloop.ml.features import build_features
from opsloop.ml.lifecycle import train_and_register
from opsloop.spec import load_spec
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.support.fixtures.core import TEST_HOME
from tests.support.ml_data import TRAIN_AS_OF, subscriptions_table
from tests.support.ml_spec import spec_dict, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_flows")]


def _variant(base: dict, kind: str, numeric: list[str], categorical: list[str], params: dict) -> dict:
    d = json.loads(json.dumps(base))
    d["model"].update({"kind": kind, "params": params})
    d["model"]["features"].update({"numeric": numeric, "categorical": categorical})
    d["model"]["promotion"] = {"metric": "roc_auc", "minRocAuc": 0.55, "maxBrier": 0.3, "minMargin": 0.005}
    return d


def test_gate_promote_reject_rollback(tmp_path: Path, ml_blocks: dict[str, str], demo_wh: DuckDBAdapter) -> None:
    base = spec_dict()
    name = base["model"]["name"]
    medium = _variant(base, "logistic_regression", ["mrr", "tenure_days"], ["plan"], {})
    worse = _variant(base, "logistic_regression", ["mrr"], ["country"], {})
    better = _variant(
        base,
        "random_forest",
        base["model"]["features"]["numeric"],
        ["segment", "plan", "country"],
        {"n_estimators": 120, "max_depth": 8, "class_weight": "balanced_subsample", "random_state": 42},
    )
    paths = {k: write_spec(tmp_path, d)[0] for k, d in (("medium", medium), ("worse", worse), ("better", better))}
    kw = {"warehouse": ml_blocks["warehouse"], "mlflow": ml_blocks["mlflow"], "as_of": str(TRAIN_AS_OF)}
    reg = load_registry(ml_blocks["mlflow"])

    v1 = train_model(spec_path=str(paths["medium"]), reason="first", **kw)
    assert v1["decision"] == "promoted" and "first model" in v1["reason"]
    assert reg.version(name, "champion").version == v1["version"] == "1"

    v2 = train_model(spec_path=str(paths["worse"]), reason="drift", **kw)
    assert v2["decision"] == "rejected" and v2["version"] == "2"
    info2 = reg.get_version(name, "2")
    assert info2.tags["opsloop.decision"] == "rejected"
    assert "not better by minMargin" in info2.tags["opsloop.reason"] and "champion v1" in info2.tags["opsloop.reason"]
    assert info2.tags["opsloop.trigger"] == "drift"
    assert reg.version(name, "champion").version == "1"

    v3 = train_model(spec_path=str(paths["better"]), reason="schedule", **kw)
    assert v3["decision"] == "promoted", v3["reason"]
    assert v3["metrics"]["roc_auc"] >= v3["champion_metrics"]["roc_auc"] + 0.005
    assert reg.version(name, "champion").version == "3"
    assert reg.version(name, "previous").version == "1"
    assert reg.get_version(name, "3").tags["opsloop.previous_version"] == "1"
    # the train flow consumed no triggers but recorded three trainings
    spec = load_spec(paths["better"])
    assert triggers.should_retrain(demo_wh, spec).last_trained is not None

    out = rollback_model(spec_path=str(paths["better"]), mlflow=ml_blocks["mlflow"], reason="bad canary")
    assert out["champion"] == "1" and out["rolled_back"] == "3"
    assert reg.version(name, "champion").version == "1"
    assert reg.version(name, "previous") is None
    rolled = reg.get_version(name, "3").tags
    assert rolled["opsloop.decision"] == "rolled_back" and rolled["opsloop.reason"] == "bad canary"
    # artifacts: signature, input example, baseline, plots on the run
    import mlflow

    mlflow.set_tracking_uri(reg.tracking_uri)
    run_id = reg.get_version(name, "3").run_id
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "plots")}
    assert files == {"plots/calibration.png", "plots/feature_importance.png"}
    baseline = reg.load_json(run_id)
    assert baseline is not None and set(baseline["features"]) == {*spec.model.features.columns}
    info = mlflow.models.get_model_info(f"models:/{name}/3")
    assert info.signature is not None and {c.name for c in info.signature.inputs} == set(spec.model.features.columns)
    assert info.saved_input_example_info is not None


def test_differently_shaped_dataset_only_through_a_spec(
    tmp_path: Path, mlflow_sqlite, duckdb_wh: DuckDBAdapter
) -> None:
    duckdb_wh.append(TableRef("crm", "subscriptions_raw"), subscriptions_table())
    data = yaml.safe_load(Path("pipelines/customer_ops_ai.yaml").read_text())
    data["model"] = {
        "name": "subscription_cancel",
        "kind": "random_forest",
        "params": {"n_estimators": 100, "max_depth": 6, "random_state": 1},
        "features": {
            "dataset": "crm",
            "table": "sub_features",
            "entityKey": "account_ref",
            "asOf": "snapshot",
            "target": "cancelled",
            "numeric": ["age_months"],
            "categorical": ["region", "channel", "tier", "payment_method", "device"],
            "build": {
                "sql": "SELECT account_ref, DATE(@as_of) AS snapshot, age_months, region, channel, tier, "
                "payment_method, device, cancelled FROM {{ ref('crm.subscriptions_raw') }} "
                "WHERE snapshot <= DATE(@as_of)"
            },
        },
        "promotion": {"minRocAuc": 0.6},
        "fairness": {"groupColumn": "region"},
    }
    _, spec = write_spec(tmp_path, data)
    as_of = TRAIN_AS_OF.replace(month=10)
    built = build_features(duckdb_wh, spec.model.features, as_of)
    assert built.inserted == 2500
    out = train_and_register(duckdb_wh, mlflow_sqlite, spec.model, as_of, "manual", spec.name)
    assert out["decision"] == "promoted" and out["metrics"]["roc_auc"] > 0.65
    assert {n for n, _ in out["importance"]} == {"age_months", "region", "channel", "tier", "payment_method", "device"}
    model = mlflow_sqlite.load_model("subscription_cancel", out["version"])
    sample = {
        "age_months": [3.0],
        "region": ["atlantis"],
        "channel": ["web"],
        "tier": [None],
        "payment_method": ["card"],
        "device": ["ios"],
    }
    import pandas as pd

    p = model.predict_proba(pd.DataFrame(sample).astype({c: object for c in sample if c != "age_months"}))
    assert p.shape == (1, 2) and 0 < p[0, 1] < 1


def test_mlflow_models_serve_scores_one_request(tmp_path: Path, mlflow_server: str, demo_wh: DuckDBAdapter) -> None:
    from opsloop.ml.registry import MLflowAdapter

    _, spec = write_spec(tmp_path, model={"params": {"n_estimators": 40, "max_depth": 6, "random_state": 3}})
    build_features(demo_wh, spec.model.features, TRAIN_AS_OF)
    reg = MLflowAdapter(mlflow_server, experiment="serve-smoke")
    out = train_and_register(demo_wh, reg, spec.model, TRAIN_AS_OF, "manual", spec.name)
    assert out["decision"] == "promoted"
    port = free_port()
    svc = Service(
        f"mlflow-serve-{port}",
        [
            _bin("mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{spec.model.name}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        TEST_HOME / "run",
        health_url=f"http://127.0.0.1:{port}/ping",
        env={"MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{Path(_bin('mlflow')).parent}:{os.environ['PATH']}"},
        cwd=tmp_path,
        start_timeout=180,
    )
    svc.start()
    try:
        row = {
            "mrr": 49.0,
            "tenure_days": 40,
            "tx_count_90d": 0,
            "tx_amount_90d": 0.0,
            "tickets_90d": 6,
            "open_tickets": 3,
            "days_since_last_tx": 80,
            "segment": "smb",
            "plan": "basic",
            "country": "DE",
        }
        body = json.dumps({"dataframe_records": [row]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        started = time.monotonic()
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        preds = answer["predictions"]
        assert len(preds) == 1 and len(preds[0]) == 2 and abs(sum(preds[0]) - 1) < 1e-6
        assert preds[0][1] > 0.5, preds  # a fading, complaining basic-plan customer is high risk
        assert time.monotonic() - started < 30
    finally:
        svc.stop()
