"""Bad conditions for the model stages: MLflow unreachable, no champion in the registry, a drifted
scoring batch. Real MLflow (an unreachable HTTP URI, an empty sqlite registry), the real feature SQL,
the real scoring path (population → predict → MERGE → drift → gate) and the real CRM push gate."""

from __future__ import annotations

import copy
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from opsloop.devstack.postgres import free_port
from opsloop.errors import TerminalError
from opsloop.ml import monitor
from opsloop.ml.features import build_features
from opsloop.ml.lifecycle import train_and_register
from opsloop.ml.models import ResolvedModels, ScoringModel, resolve_models
from opsloop.ml.registry import MLflowAdapter, MLflowUnavailableError
from opsloop.ml.score import score_partition
from opsloop.ml.train import load_training_data, train
from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient
from tests.crm.helpers import push
from tests.support.ml_data import SCORE_AS_OF, TRAIN_AS_OF
from tests.support.ml_spec import spec_dict, write_spec

pytestmark = pytest.mark.slow  # the module fixture builds features and trains a model (~10–20 s)
LOGREG = {"kind": "logistic_regression", "params": {}}


@pytest.fixture(scope="module")
def ml_template(demo_warehouse_template: Path) -> dict[str, Any]:
    """Demo warehouse with features as of the training and the scoring date, and a logistic
    regression trained on it by the real training code (no registry: drift needs only its baseline)."""
    d = Path(tempfile.mkdtemp(prefix="opsloop-bi-ml-", dir="/tmp"))
    path = d / "template.duckdb"
    shutil.copy(demo_warehouse_template, path)
    wh = DuckDBAdapter(path)
    data = spec_dict(model=LOGREG)
    _, spec = write_spec(d, data)
    assert spec.model is not None
    build_features(wh, spec.model.features, TRAIN_AS_OF)
    build_features(wh, spec.model.features, SCORE_AS_OF)
    result = train(load_training_data(wh, spec.model, TRAIN_AS_OF), spec.model, d)
    return {"path": path, "data": data, "result": result}


def _setup(ml: dict[str, Any], tmp_path: Path, **scoring: Any) -> tuple[DuckDBAdapter, PipelineSpec]:
    shutil.copy(ml["path"], tmp_path / "wh.duckdb")
    data = {**ml["data"], "scoring": {**ml["data"]["scoring"], **scoring}}
    return DuckDBAdapter(tmp_path / "wh.duckdb"), write_spec(tmp_path, data)[1]


def _score(wh: DuckDBAdapter, spec: PipelineSpec, models: ResolvedModels, batch: str = "b1") -> dict[str, Any]:
    """What the score flow's tasks do for one partition: score + MERGE, record it, then drift + gate."""
    res = score_partition(
        wh, spec, models, as_of=SCORE_AS_OF, run_id=f"run-{batch}", batch_id=batch, scored_at=datetime.now(UTC)
    )
    champ = models.champion
    summary = {
        "rows": res.rows,
        "model_name": champ.name,
        "model_version": champ.version,
        "is_fallback": champ.is_fallback,
        "served": res.served,
        "review_pending": res.review_pending,
        "baseline": champ.baseline,
        "drift": res.drift,
    }
    monitor.record_partition(wh, batch, 0, 1, f"run-{batch}", summary)
    results, status, action = monitor.apply_drift(wh, spec, monitor.read_parts(wh, batch), batch)
    return {"rows": res.rows, "drift": {r.feature: r for r in results}, "status": status, "action": action}


def _population(wh: DuckDBAdapter) -> int:
    q = "SELECT count(*) AS n FROM ops_ai.customer_features WHERE as_of = $d"
    return int(wh.query(q, {"d": SCORE_AS_OF}).to_pylist()[0]["n"])


def _predictions(wh: DuckDBAdapter) -> list[dict[str, Any]]:
    return wh.query(
        "SELECT model_name, model_alias, is_fallback, count(*) AS n FROM ops_ai.predictions GROUP BY ALL"
    ).to_pylist()


def test_mlflow_unreachable_names_the_tracking_uri(ml_template: dict[str, Any], tmp_path: Path) -> None:
    """BI-27: scoring and training against a tracking server nobody listens on fail with
    MLflowUnavailableError naming the URI (nothing scored); with ``scoring.fallbackOnMlflowDown`` the
    rules score instead and the note names the URI."""
    wh, spec = _setup(ml_template, tmp_path)
    assert spec.model is not None
    uri = f"http://127.0.0.1:{free_port()}"
    down = MLflowAdapter(uri)
    prefix = rf"^MLflow tracking server {uri} is unreachable: <urlopen error \[Errno 111\] Connection refused>$"
    with pytest.raises(MLflowUnavailableError, match=prefix):
        resolve_models(down, spec)
    with pytest.raises(MLflowUnavailableError, match=prefix):
        train_and_register(wh, down, spec.model, TRAIN_AS_OF, "manual", spec.name)
    assert wh.table_schema(TableRef("ops_ai", "predictions")) is None
    _, tolerant = _setup(ml_template, tmp_path, fallbackOnMlflowDown=True)
    models = resolve_models(down, tolerant)
    assert models.champion.is_fallback and models.notes[0].startswith(f"MLflow tracking server {uri} is unreachable")
    out = _score(wh, tolerant, models)
    assert out["rows"] == _population(wh) > 0
    assert _predictions(wh) == [{"model_name": "rules", "model_alias": "rules", "is_fallback": True, "n": out["rows"]}]


def test_no_champion_falls_back_to_the_rules_or_fails_naming_why(ml_template: dict[str, Any], tmp_path: Path) -> None:
    """BI-28: an empty registry (real MLflow, sqlite store): @champion and @previous are missing →
    every customer is scored by the spec's rules (is_fallback, drift skipped with the reason); a spec
    without fallback rules fails naming the model and both aliases."""
    wh, spec = _setup(ml_template, tmp_path)
    assert spec.model is not None
    empty = MLflowAdapter(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "artifacts"))
    models = resolve_models(empty, spec)
    name = spec.model.name
    assert models.champion.is_fallback and models.notes[-1] == "scoring with the rules fallback (scoring.fallback)"
    assert [n.split(":")[0] for n in models.notes[:2]] == ["@champion unavailable", "@previous unavailable"]
    out = _score(wh, spec, models)
    assert out["rows"] == _population(wh) > 0
    assert _predictions(wh) == [{"model_name": "rules", "model_alias": "rules", "is_fallback": True, "n": out["rows"]}]
    assert out["status"] == "ok" and out["drift"]["__all__"].note == "rules fallback"
    no_rules = copy.deepcopy(ml_template["data"])
    no_rules["scoring"].pop("fallback")
    _, bare = write_spec(tmp_path, no_rules)
    with pytest.raises(
        TerminalError,
        match=rf"^model {name!r}: @champion unavailable: .*; @previous unavailable: .*; "
        r"and the spec has no scoring.fallback rules to score with$",
    ):
        resolve_models(empty, bare)


@pytest.mark.parametrize("policy", ["block_push", "warn"])
def test_drifted_batch_follows_the_policy_and_the_push_gate(
    ml_template: dict[str, Any], tmp_path: Path, crm_sandbox: SandboxClient, policy: str
) -> None:
    """BI-29: the scoring snapshot drifts (mrr × 8, every plan 'enterprise'): PSI alerts on exactly those
    features; ``block_push`` records a blocking drift gate and the CRM push sends nothing, naming the
    features; ``warn`` lets the push through."""
    wh, spec = _setup(ml_template, tmp_path, drift={"policy": policy})
    wh.execute(
        "UPDATE ops_ai.customer_features SET mrr = mrr * 8, plan = 'enterprise' WHERE as_of = $d", {"d": SCORE_AS_OF}
    )
    result = ml_template["result"]
    assert spec.model is not None
    model = ScoringModel(spec.model.name, "1", "champion", result.pipeline, baseline=result.baseline)
    out = _score(wh, spec, ResolvedModels(model))
    alerts = sorted(f for f, r in out["drift"].items() if r.status == "alert")
    assert {"mrr", "plan"} <= set(alerts) and out["drift"]["tenure_days"].status == "ok"
    assert (out["status"], out["action"]) == ("alert", policy)
    rep = push(wh, spec, "hubspot", crm_sandbox, limit=20)
    if policy == "block_push":
        assert rep["status"] == "blocked" and rep["candidates"] == 0
        assert rep["note"].startswith(
            "push blocked for customer_ops_ai: drift gate is block: drift alert (policy block_push): "
        )
        assert "mrr PSI" in rep["note"] and "plan PSI" in rep["note"]
        assert crm_sandbox.requests()["hubspot"]["requests"] == 0
    else:
        assert rep["status"] == "completed" and rep["created"] == 20
