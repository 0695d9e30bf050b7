"""Thin tasks of the model lifecycle: build features, train + register + gate, rollback, triggers."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from prefect import task

from blocks import load_warehouse
from blocks.mlflow import load_registry
from opsloop.errors import SpecError
from opsloop.ml import lifecycle, triggers
from opsloop.ml.features import build_features, latest_as_of
from opsloop.spec import PipelineSpec, load_spec
from opsloop.spec.ml import ModelSpec
from tasks.common import TRANSIENT_RETRIES, flow_run_id, run_labels


def model_spec(spec: PipelineSpec, source: str) -> ModelSpec:
    if spec.model is None:
        raise SpecError(source, [("model", "required to train or score (no model section)")])
    return spec.model


@task(name="build_features", **TRANSIENT_RETRIES)
def build_feature_snapshot(spec_path: str, warehouse: str, as_of: date) -> dict[str, Any]:
    spec = load_spec(spec_path)
    ms = model_spec(spec, spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "build_features"))
    res = build_features(wh, ms.features, as_of)
    return {"as_of": str(as_of), "rows": res.rows_staged, "inserted": res.inserted, "updated": res.updated}


@task(name="train_register_model", **TRANSIENT_RETRIES)
def train_register_model(
    spec_path: str, warehouse: str, mlflow: str, as_of: date | None, reason: str
) -> dict[str, Any]:
    spec = load_spec(spec_path)
    ms = model_spec(spec, spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "train"))
    if as_of is None and ms.features.as_of:  # no build step: train on the latest snapshot there is
        as_of = latest_as_of(wh, ms.features)
    reg = load_registry(mlflow)
    out = lifecycle.train_and_register(wh, reg, ms, as_of, reason, spec.name, flow_run_id())
    out["run_url"] = reg.run_url(out["run_id"])
    return out


@task(name="consume_retrain_triggers", **TRANSIENT_RETRIES)
def consume_retrain_triggers(spec_path: str, warehouse: str, started: datetime, outcome: str) -> int:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "triggers"))
    return triggers.consume_triggers(wh, spec, flow_run_id(), started, outcome)


@task(name="rollback_champion")
def rollback_champion(spec_path: str, mlflow: str, reason: str) -> dict[str, Any]:
    spec = load_spec(spec_path)
    ms = model_spec(spec, spec_path)
    return lifecycle.rollback(load_registry(mlflow), ms.name, reason)
