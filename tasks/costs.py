"""Cost ledger tasks: price a stage at its end, write its ledger row, publish the run's cost.

Drop-in for any flow (see ``docs/costs.md``)::

    with stage_cost("ingest", spec_path, warehouse) as rec:
        result = ingest_everything(...)
        rec.rows_ingested = result["rows"]          # and rec.add_api_calls("salesforce", n, left=m)
    summary_lines.append(rec.line)                  # one-line cost for the markdown summary

or, after a stage ran as a subflow: ``record_stage_cost(spec_path, warehouse, "score", started_at,
flow_run_id=str(state.state_details.flow_run_id), rows={"scored": n})``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

from prefect import runtime, task
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client

from blocks import load_warehouse
from opsloop import costs
from opsloop.reports.ledger import summary_line
from opsloop.spec import load_spec
from opsloop.upsert import held_open
from tasks.common import TRANSIENT_RETRIES, deployment_name, flow_run_id, run_labels

log = logging.getLogger("opsloop.costs")
F = TypeVar("F", bound=Callable[..., Any])

ARTIFACT_COLUMNS = (
    "stage",
    "flow",
    "status",
    "wall_seconds",
    "warehouse_jobs",
    "bq_bytes_billed",
    "bq_usd",
    "compute_usd",
    "api_calls",
    "api_calls_left",
    "api_usd",
    "rows_ingested",
    "rows_scored",
    "rows_pushed",
    "total_usd",
    "usd_per_1k_ingested",
    "usd_per_1k_pushed",
    "flow_run_id",
)


@dataclass
class RunInfo:
    flow_run_id: str
    flow: str
    deployment: str
    root_flow_run_id: str
    job_variables: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=512)
def _root_of(run_id: str) -> str:
    # runtime.flow_run.root_flow_run_id walks the parents through the API on every access
    return str(runtime.flow_run.root_flow_run_id or run_id)


def current_run_info() -> RunInfo:
    """Who is running: flow, deployment, run id, root run id (the nightly run a stage belongs to)."""
    rid = flow_run_id()
    try:
        root = _root_of(rid) if rid != "local" else rid
    except Exception:  # no API (plain call outside Prefect): the run is its own root
        root = rid
    return RunInfo(
        rid,
        str(runtime.flow_run.flow_name or "adhoc"),
        deployment_name(),
        root,
        dict(runtime.flow_run.job_variables or {}),
    )


def run_info(run_id: str) -> RunInfo:
    """The same facts for another flow run (a subflow that already finished), from the Prefect API."""
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(UUID(run_id))
        flow = client.read_flow(fr.flow_id).name
        dep = client.read_deployment(fr.deployment_id).name if fr.deployment_id else "none"
        root, cur = str(fr.id), fr
        while cur.parent_task_run_id is not None:
            parent = client.read_task_run(cur.parent_task_run_id).flow_run_id
            if parent is None:
                break
            cur = client.read_flow_run(parent)
            root = str(cur.id)
    return RunInfo(str(fr.id), flow, dep, root, dict(fr.job_variables or {}))


@task(name="record_stage_cost", **TRANSIENT_RETRIES)
def record_stage_cost(
    spec_path: str,
    warehouse: str,
    stage: str,
    started_at: datetime,
    ended_at: datetime | None = None,
    status: str = "completed",
    rows: Mapping[str, int] | None = None,
    api_calls: Mapping[str, int] | None = None,
    api_left: Mapping[str, int] | None = None,
    model_name: str = "",
    model_version: str = "",
    flow_run_id: str | None = None,
    tasks: list[str] | None = None,
) -> str:
    """Price ``stage`` of a flow run, upsert its ledger row, publish the run's ledger as a table artifact.

    ``rows``: ``{"ingested": n, "scored": n, "pushed": n}``; ``api_calls`` / ``api_left``: CRM calls
    used and calls left today, per destination (``salesforce``, ``hubspot``); ``flow_run_id``: the
    run whose jobs to price (default: the current flow run; pass a finished subflow's id from the
    parent); ``tasks``: only jobs labelled with these task names. Returns a one-line cost summary.
    """
    spec = load_spec(spec_path)
    here = current_run_info()
    info = here if flow_run_id in (None, here.flow_run_id) else run_info(str(flow_run_id))
    wh = load_warehouse(warehouse, **run_labels(spec.name, "record_stage_cost"))
    jobs = costs.stage_jobs(info.flow_run_id, stage, tasks)
    rows = rows or {}
    usage = costs.StageUsage(
        pipeline=spec.name,
        flow=info.flow,
        flow_run_id=info.flow_run_id,
        stage=stage,
        started_at=started_at.astimezone(UTC),
        ended_at=(ended_at or datetime.now(UTC)).astimezone(UTC),
        deployment=info.deployment,
        root_flow_run_id=info.root_flow_run_id,
        status=status,
        warehouse=wh.dialect,
        jobs=jobs,
        rows_ingested=int(rows.get("ingested", 0)),
        rows_scored=int(rows.get("scored", 0)),
        rows_pushed=int(rows.get("pushed", 0)),
        api_calls=dict(api_calls or {}),
        api_left=dict(api_left or {}),
        model_name=model_name,
        model_version=model_version,
        job_variables=info.job_variables,
    )
    with held_open(wh):
        mine = [r for r in costs.read_ledger(wh, run_ids=[info.flow_run_id]) if r["flow_run_id"] == info.flow_run_id]
        costs.fill_from_existing(usage, next((r for r in mine if r["stage"] == stage), None))
        if not usage.api_calls and not usage.api_left:
            usage.api_calls, usage.api_left = costs.api_usage_from_sync_runs(wh, info.flow_run_id)
        used_today: dict[str, int] = {}
        if usage.api_calls and spec.costs.api_daily_budget:
            used_today = costs.api_calls_today(wh, spec.name, usage.ended_at, exclude=(info.flow_run_id, stage))
        row = costs.build_row(usage, spec.costs, used_today)
        costs.write_ledger(wh, [row])
        costs.claim_jobs(jobs, info.flow_run_id, stage)
        run_rows = costs.read_ledger(wh, run_ids=[info.root_flow_run_id]) or [row]
    publish_ledger_artifact(run_rows, f"cost of run {info.root_flow_run_id} after stage {stage}")
    line = summary_line(run_rows)
    log.info("stage %s: $%.6f; run so far: %s", stage, row["total_usd"], line)
    return line


def publish_ledger_artifact(rows: list[dict[str, Any]], description: str, key: str = "run-cost-ledger") -> None:
    table = [{c: _cell(r.get(c)) for c in ARTIFACT_COLUMNS} for r in rows]
    create_table_artifact(table=table, key=key, description=description)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 9)
    return value


@dataclass
class StageCostRecorder:
    """What a stage reports while it runs; priced and written when the ``stage_cost`` block ends."""

    stage: str
    started_at: datetime
    rows_ingested: int = 0
    rows_scored: int = 0
    rows_pushed: int = 0
    api_calls: dict[str, int] = field(default_factory=dict)
    api_left: dict[str, int] = field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""
    line: str = ""

    def add_api_calls(self, destination: str, calls: int, left: int | None = None) -> None:
        self.api_calls[destination] = self.api_calls.get(destination, 0) + int(calls)
        if left is not None:
            self.api_left[destination] = int(left)

    def take(self, result: Any) -> None:
        """Pick counts out of a stage result dict (keys rows_ingested/rows_scored/rows_pushed/api_calls)."""
        if not isinstance(result, Mapping):
            return
        for key in ("rows_ingested", "rows_scored", "rows_pushed"):
            if isinstance(result.get(key), int):
                setattr(self, key, int(result[key]))
        for dest, n in dict(result.get("api_calls") or {}).items():
            self.add_api_calls(str(dest), int(n))
        for dest, n in dict(result.get("api_left") or {}).items():
            self.api_left[str(dest)] = int(n)
        if result.get("model_version"):
            self.model_name = str(result.get("model_name") or self.model_name)
            self.model_version = str(result["model_version"])


@contextlib.contextmanager
def stage_cost(
    stage: str, spec_path: str, warehouse: str, tasks: list[str] | None = None
) -> Iterator[StageCostRecorder]:
    """Time the block as ``stage``; at its end write the ledger row (also when the block failed).

    A failed stage is recorded with ``status = failed`` and its exception re-raised unchanged; if
    writing the ledger fails after a failed stage, that error is logged, never raised over it.
    """
    rec = StageCostRecorder(stage, datetime.now(UTC))
    status = "completed"
    try:
        yield rec
    except BaseException:
        status = "failed"
        raise
    finally:
        kwargs: dict[str, Any] = {
            "ended_at": datetime.now(UTC),
            "status": status,
            "rows": {"ingested": rec.rows_ingested, "scored": rec.rows_scored, "pushed": rec.rows_pushed},
            "api_calls": rec.api_calls,
            "api_left": rec.api_left,
            "model_name": rec.model_name,
            "model_version": rec.model_version,
            "tasks": tasks,
        }
        if status == "failed":
            try:
                rec.line = record_stage_cost(spec_path, warehouse, stage, rec.started_at, **kwargs)
            except Exception as exc:  # the stage's own error matters more
                log.error("could not record the cost of failed stage %s: %s", stage, exc)
        else:
            rec.line = record_stage_cost(spec_path, warehouse, stage, rec.started_at, **kwargs)


def costed_stage(stage: str, spec_arg: str = "spec_path", warehouse_arg: str = "warehouse") -> Callable[[F], F]:
    """Decorator form for a stage flow's function (put it *under* ``@flow``)::

    @flow(name="score")
    @costed_stage("score")
    def score(spec_path: str, warehouse: str, ...) -> dict: ...   # returns {"rows_scored": n, ...}
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            import inspect

            bound = inspect.signature(fn).bind(*args, **kwargs)
            bound.apply_defaults()
            with stage_cost(stage, bound.arguments[spec_arg], bound.arguments[warehouse_arg]) as rec:
                result = fn(*args, **kwargs)
                rec.take(result)
            return result

        return inner  # type: ignore[return-value]

    return wrap
