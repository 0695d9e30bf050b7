"""The pipeline lease for flows: put ``@pipeline_lease()`` *under* ``@flow`` of every stage flow.

The flow then runs only while it holds its pipeline's lease (``opsloop.lease``): the root flow run
id is the holder, so the stage subflows of a nightly run re-enter it, while a manual run of a stage
started during the nightly waits up to ``warehouse.leaseWait`` and then fails with a message naming
the run that holds the pipeline (and its UI link)::

    @flow(name="ingest")
    @pipeline_lease()
    def ingest(spec_path: str = ..., warehouse: str = ..., ...) -> dict: ...
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import runtime

from blocks import load_warehouse
from opsloop.lease import PipelineLease
from opsloop.spec import load_spec
from tasks.common import run_labels
from tasks.stages import logger

F = TypeVar("F", bound=Callable[..., Any])


def _root_run_id(run_id: str) -> str:
    try:
        return str(runtime.flow_run.root_flow_run_id or run_id)
    except Exception:  # no API reachable: the run is its own root (it can still take the lease)
        return run_id


def _ui_link(run_id: str) -> str:
    try:
        from prefect.utilities.urls import url_for

        return url_for("flow-run", obj_id=run_id) or ""
    except Exception:
        return ""


def hold_pipeline(spec_path: str, warehouse: str) -> PipelineLease:
    """The lease of the spec's pipeline for the current flow run (enter it with ``with``)."""
    spec = load_spec(spec_path)
    run_id = str(runtime.flow_run.id or "local")
    log = logger()
    return PipelineLease(
        load_warehouse(warehouse, **run_labels(spec.name, "pipeline_lease")),
        spec.name,
        _root_run_id(run_id),
        flow=str(runtime.flow_run.flow_name or ""),
        run_id=run_id,
        ttl=spec.warehouse.lease_ttl.total_seconds(),
        wait=spec.warehouse.lease_wait.total_seconds(),
        log=log.warning,
        link=_ui_link,
    )


def pipeline_lease(spec_arg: str = "spec_path", warehouse_arg: str = "warehouse") -> Callable[[F], F]:
    """Run the decorated flow function inside its pipeline's lease (see the module docstring)."""

    def wrap(fn: F) -> F:
        # resolved annotations: Prefect builds its parameter model from the wrapper, whose module
        # globals do not hold the flow module's names (``datetime`` …)
        sig = inspect.signature(fn, eval_str=True)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with hold_pipeline(bound.arguments[spec_arg], bound.arguments[warehouse_arg]):
                return fn(*args, **kwargs)

        inner.__signature__ = sig  # type: ignore[attr-defined]
        inner.__annotations__ = typing.get_type_hints(fn)
        return inner  # type: ignore[return-value]

    return wrap
