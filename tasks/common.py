"""Shared task plumbing: retry only transient errors, job labels from the Prefect run context."""

from __future__ import annotations

import functools
from typing import Any

from prefect import runtime
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from opsloop.errors import TransientError


def retry_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn``: retry a task only when it failed with a TransientError."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


# coarse tasks (per stage / source / partition) with retries on transient errors only
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_transient,
}


def flow_run_id() -> str:
    return str(runtime.flow_run.id or "local")


@functools.lru_cache(maxsize=512)
def _deployment_of(run_id: str) -> str:
    return str(runtime.deployment.name or "none")


def deployment_name() -> str:
    """The current flow run's deployment name ("none" for a direct call). Outside a deployment,
    ``runtime.deployment.name`` reads the flow run from the API on every access; a run's deployment
    never changes, so it is read once per flow run."""
    rid = flow_run_id()
    return _deployment_of(rid) if rid != "local" else str(runtime.deployment.name or "none")


def run_labels(pipeline: str, task: str) -> dict[str, str]:
    """Labels every warehouse job of this task carries (BigQuery job labels, cost ledger keys)."""
    return {
        "pipeline": pipeline,
        "flow": str(runtime.flow_run.flow_name or "adhoc"),
        "flow_run_id": flow_run_id(),
        "deployment": deployment_name(),
        "task": task,
    }
