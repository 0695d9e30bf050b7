"""Run a stage flow as a subflow of ``nightly`` and turn its final state into a :class:`StageOutcome`.

Stage flows (``flows/ingest.py``, ``flows/train.py`` …) stay ordinary flows, runnable on their own;
this module only loads them, passes each the nightly parameters its signature accepts, and records
what happened (state, seconds, result figures, runbook advice when it failed or a gate blocked).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import Flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from blocks import load_warehouse
from opsloop.runbooks import advice
from opsloop.runsummary import StageOutcome, flatten
from opsloop.spec import load_spec
from tasks.common import TRANSIENT_RETRIES, run_labels

_fallback = logging.getLogger("opsloop.nightly")


def logger() -> Any:
    """The flow run's logger (lines show in the Prefect UI), or a plain logger outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback


# keys a stage result may use to say "a gate blocks what comes next" (and why)
BLOCK_FLAGS = ("push_blocked", "blocked", "gate_blocked")
BLOCK_REASONS = ("blocked_reason", "block_reason", "gate_reason", "reason")


@dataclass(frozen=True)
class StageDef:
    """``stage`` runs ``module:func``; operators rerun it with deployment ``<flow name>/<deployment>``."""

    stage: str
    module: str
    func: str
    deployment: str

    def rerun(self, flow_name: str, params: Mapping[str, Any] | None = None) -> str:
        extra = "".join(f" --param {k}={v}" for k, v in (params or {}).items() if v not in (None, "", []))
        return f"prefect deployment run '{flow_name}/{self.deployment}'{extra}"


def load_stage(defn: StageDef) -> Flow[..., Any] | None:
    """The stage's flow, or None while its module does not exist yet (a broken module still raises)."""
    try:
        module = importlib.import_module(defn.module)
    except ModuleNotFoundError as exc:
        if exc.name == defn.module:
            return None
        raise
    obj = getattr(module, defn.func, None)
    if obj is None:
        logger().warning("%s has no flow %r yet; stage %s skipped", defn.module, defn.func, defn.stage)
        return None
    if not isinstance(obj, Flow):
        raise TypeError(f"{defn.module}:{defn.func} is a {type(obj).__name__}, not a Prefect flow")
    return obj


def accepted_kwargs(fl: Flow[..., Any], candidates: Mapping[str, Any]) -> dict[str, Any]:
    """The candidates the flow's signature accepts; a datetime goes as ISO text to a non-datetime param."""
    sig = inspect.signature(fl.fn)
    out: dict[str, Any] = {}
    for name, param in sig.parameters.items():
        if name not in candidates:
            continue
        value = candidates[name]
        if isinstance(value, datetime) and "datetime" not in str(param.annotation):
            value = value.isoformat()
        out[name] = value
    missing = [
        n
        for n, p in sig.parameters.items()
        if p.default is inspect.Parameter.empty and n not in out and p.kind is not p.VAR_KEYWORD
    ]
    if missing:
        raise TypeError(f"flow {fl.name!r} needs parameter(s) {missing} that nightly does not provide")
    return out


def blocked_reason(result: Any) -> str | None:
    """The reason when a stage result says a gate blocks the next stage, else None."""
    if not isinstance(result, Mapping):
        return None
    for flag in BLOCK_FLAGS:
        if result.get(flag):
            for key in BLOCK_REASONS:
                if result.get(key):
                    return str(result[key])
            return f"{flag} is set"
    drift = result.get("drift")
    if isinstance(drift, Mapping) and drift.get("action") == "block_push":
        worst = sorted(
            (f for f in drift.get("features") or [] if isinstance(f, Mapping) and f.get("psi") is not None),
            key=lambda f: -float(f["psi"]),
        )[:3]
        top = ", ".join(f"{f['feature']} PSI {float(f['psi']):.3f}" for f in worst)
        return f"drift {drift.get('status')}: policy block_push holds the CRM push ({top})"
    dests = result.get("destinations")
    if isinstance(dests, list):
        blocked = [d for d in dests if isinstance(d, Mapping) and d.get("status") == "blocked"]
        if blocked:
            return "; ".join(f"{d.get('destination')}: push blocked by a gate — {d.get('note')}" for d in blocked)
    return None


def warnings_of(stage: str, result: Any) -> list[str]:
    """Things an operator should see even though the stage completed (each with its runbook)."""
    if not isinstance(result, Mapping):
        return []
    out = [f"{w}" for w in result.get("warnings") or [] if w]
    if stage == "ingest" and int(result.get("rows_quarantined") or 0):
        out.append(
            f"{result['rows_quarantined']} row(s) quarantined ({dict(result.get('quarantined_by_rule') or {})}) "
            "— docs/runbooks.md#data-break"
        )
    drift = result.get("drift")
    if isinstance(drift, Mapping):
        if drift.get("status") not in (None, "ok") and drift.get("action") != "block_push":
            out.append(f"drift {drift.get('status')} (action {drift.get('action')}) — docs/runbooks.md#drift")
        concept = drift.get("concept_drift")
        if isinstance(concept, Mapping) and concept.get("status") not in (None, "ok", "skipped", "no_labels"):
            out.append(f"concept drift {concept.get('status')} — docs/runbooks.md#drift")
    for d in result.get("destinations") or []:
        if not isinstance(d, Mapping):
            continue
        status, name = d.get("status"), d.get("destination")
        if status in ("budget_stopped", "budget_exhausted"):
            out.append(
                f"{name}: push stopped at the API budget, {d.get('deferred', 0)} record(s) deferred "
                "— docs/runbooks.md#api-budget-exhausted"
            )
        if int(d.get("failed") or 0):
            codes = dict(d.get("failed_by_code") or {})
            out.append(f"{name}: {d['failed']} record(s) rejected by the CRM {codes} — docs/runbooks.md#crm-outage")
    return out


def derived_metrics(result: Any) -> dict[str, Any]:
    """Figures the summary wants that stage results only hold nested (lists of destinations …)."""
    if not isinstance(result, Mapping):
        return {}
    out: dict[str, Any] = {}
    dests = [d for d in result.get("destinations") or [] if isinstance(d, Mapping)]
    if dests:
        out["crm_failed"] = sum(int(d.get("failed") or 0) for d in dests)
        out["crm_api_calls"] = sum(int(d.get("api_calls") or 0) for d in dests)
    if isinstance(result.get("drift"), Mapping):
        out["rows_scored"] = int(result["drift"].get("rows") or 0)
    return out


def run_stage(defn: StageDef, fl: Flow[..., Any], kwargs: Mapping[str, Any]) -> tuple[StageOutcome, Any]:
    """Run ``fl`` as a subflow; never raises for a failed stage (the outcome says what happened)."""
    t0 = time.monotonic()
    logger().info("stage %s: starting flow %r with %s", defn.stage, fl.name, dict(kwargs))
    state = fl(**kwargs, return_state=True)
    seconds = time.monotonic() - t0
    run_id = state.state_details.flow_run_id if state.state_details else None
    outcome = StageOutcome(
        defn.stage, "completed", seconds, str(run_id) if run_id else None, fl.name, message=state.message or ""
    )
    rerun = defn.rerun(fl.name, {k: v for k, v in kwargs.items() if k in ("spec_path", "warehouse")})
    if state.is_completed():
        result = state.result()
        outcome.metrics = {**flatten(result), **derived_metrics(result)}
        outcome.warnings = warnings_of(defn.stage, result)
        reason = blocked_reason(result)
        if reason:
            outcome.status = "blocked"
            outcome.message = reason
            outcome.advice = advice(defn.stage, None, reason, rerun)
        logger().info("stage %s: completed in %.1f s: %s", defn.stage, seconds, outcome.metrics)
        return outcome, result
    exc = state.result(raise_on_failure=False) if state.is_failed() else None
    error = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else (state.message or state.name)
    outcome.status = "blocked" if type(exc).__name__ == "GateBlockedError" else "failed"
    outcome.message = error or f"ended in state {state.name}"
    outcome.advice = advice(defn.stage, exc if isinstance(exc, BaseException) else None, outcome.message, rerun)
    logger().error("stage %s: %s after %.1f s — %s", defn.stage, state.name, seconds, outcome.message)
    return outcome, None


class Progress:
    """A Prefect progress artifact for the run (0–100 %), with a log line per step."""

    def __init__(self, total: int, description: str) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.description = description
        self._id: UUID | None = None
        try:
            self._id = create_progress_artifact(progress=0.0, description=description)
        except Exception as exc:  # progress is nice to have; never fail the run over it
            logger().warning("could not create the progress artifact: %s", exc)

    def step(self, what: str) -> None:
        self.done += 1
        pct = min(100.0, 100.0 * self.done / self.total)
        logger().info("progress %d/%d (%.0f %%): %s", self.done, self.total, pct, what)
        if self._id is not None:
            try:
                update_progress_artifact(self._id, pct, description=f"{self.description}: {what}")
            except Exception as exc:
                logger().warning("could not update the progress artifact: %s", exc)

    def finish(self) -> None:
        if self._id is not None and self.done < self.total:
            self.done = self.total - 1
            self.step("finished")


def now_utc() -> datetime:
    return datetime.now(UTC)


@task(name="decide_retrain", **TRANSIENT_RETRIES)
def decide_retrain(spec_path: str, warehouse: str) -> tuple[bool, str]:
    """The model lifecycle's retrain check: a pending drift/manual trigger, a due schedule, or no model yet."""
    from opsloop.ml.triggers import should_retrain

    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "decide_retrain"))
    decision = should_retrain(wh, spec)
    return decision.retrain, "; ".join(decision.reasons) or "no trigger pending, schedule not due"


@task(name="read_run_costs", **TRANSIENT_RETRIES)
def read_run_costs(spec_path: str, warehouse: str, root_run_id: str) -> dict[str, Any]:
    """The cost ledger rows of a run and its subflows: which stages are priced, the total and one line."""
    from opsloop import costs
    from opsloop.reports.ledger import summary_line

    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "read_run_costs"))
    rows = costs.read_ledger(wh, run_ids=[root_run_id])
    return {
        "priced": sorted({(str(r["flow_run_id"]), str(r["stage"])) for r in rows}),
        "total_usd": round(sum(float(r.get("total_usd") or 0) for r in rows), 9),
        "line": summary_line(rows) if rows else "",
        "stages": len(rows),
    }
