"""Run labels read the run's deployment from the Prefect API once per flow run, not once per task."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from tasks.common import _deployment_of, run_labels
from tasks.costs import _root_of, current_run_info


@task
def labels_in_task(name: str) -> dict[str, str]:
    return run_labels("pipe", name)


@flow
def child_flow() -> str:
    return current_run_info().root_flow_run_id


@flow
def labels_flow() -> dict[str, Any]:
    first = labels_in_task("a")
    again = labels_in_task("b")
    misses = _deployment_of.cache_info().misses
    root = child_flow()
    return {"first": first, "again": again, "child_root": root, "misses": misses}


def test_run_labels_read_the_deployment_once_per_flow_run(prefect_api: str) -> None:
    _deployment_of.cache_clear()
    _root_of.cache_clear()
    out = labels_flow()
    assert out["first"]["deployment"] == "none"
    assert out["first"]["flow_run_id"] == out["again"]["flow_run_id"] != "local"
    assert out["first"]["task"] == "a" and out["again"]["task"] == "b"
    assert out["misses"] == 1  # the second task's labels came from the cache
    assert out["child_root"] == out["first"]["flow_run_id"]  # the subflow's root is the parent run
