"""Rollback flow: move the ``champion`` alias back to the ``previous`` version in one run."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.ml import rollback_champion


@flow(name="rollback-model", log_prints=True)
def rollback_model(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    mlflow: str = "opsloop-mlflow/local",
    reason: str = "manual rollback",
) -> dict[str, Any]:
    out = rollback_champion(spec_path, mlflow, reason)
    md = (
        f"# rollback · {out['model']}\n\n champion → v{out['champion']} (was v{out['rolled_back']}); "
        f"previous → {out['previous'] or '(none)'}\n\nReason: {reason}"
    )
    create_markdown_artifact(md, key="rollback-model", description=f"rollback of {out['model']}")
    print(md)
    return out


if __name__ == "__main__":
    rollback_model()
