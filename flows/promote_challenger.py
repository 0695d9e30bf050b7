"""Finish a shadow/canary rollout: promote the challenger, reject it, or wait for more labels."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from blocks import load_warehouse
from blocks.mlflow import load_registry
from opsloop.ml.rollout import evaluate_rollout
from opsloop.spec import load_spec
from tasks.common import run_labels


@task(name="evaluate_rollout")
def evaluate_challenger(spec_path: str, warehouse: str, mlflow: str) -> dict[str, Any]:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "rollout"))
    return evaluate_rollout(wh, load_registry(mlflow), spec)


@flow(name="promote-challenger", log_prints=True)
def promote_challenger(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    mlflow: str = "opsloop-mlflow/local",
) -> dict[str, Any]:
    out = evaluate_challenger(spec_path, warehouse, mlflow)
    create_markdown_artifact(f"# rollout · {out['decision']}\n\n{out['reason']}", key="promote-challenger")
    print(out)
    return out


if __name__ == "__main__":
    promote_challenger()
