"""The nightly loop: ingest → (train when triggered) → score → sync → cost/KPI report.

Each stage is its own flow (``flows/ingest.py`` …), runnable alone and run here as a subflow. The
chain stops at the first stage that fails or whose gate blocks what comes next — the CRM push never
runs on data that failed its gates — and the run ends ``Failed`` (state name ``Blocked`` for a gate)
with a message naming the stage, the runbook section and the rerun command. The report stage runs
in any case: every stage that ran gets its cost-ledger row, and the run's KPIs and SLOs are
evaluated (a breached SLO or cost budget fails the run with its runbook link).

Artifacts of every run: ``nightly-summary`` (markdown: headline figures, cost, what to do),
``nightly-stages`` (table, one row per stage), a progress artifact, and from the cost/KPI tasks
``run-cost-ledger``, ``run-kpi-map`` and ``run-slos``.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any, Literal

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.utilities.urls import url_for

from opsloop.runbooks import advice
from opsloop.runsummary import StageOutcome, final_verdict, pick, stage_rows, summary_markdown
from opsloop.spec import load_spec
from tasks.lease import pipeline_lease
from tasks.stages import (
    Progress,
    StageDef,
    accepted_kwargs,
    decide_retrain,
    load_stage,
    logger,
    now_utc,
    read_run_costs,
    run_stage,
)

STAGES: dict[str, StageDef] = {
    "ingest": StageDef("ingest", "flows.ingest", "ingest", "ingest"),
    "train": StageDef("train", "flows.train", "train_model", "train"),
    "score": StageDef("score", "flows.score", "score_customers", "score"),
    "sync": StageDef("sync", "flows.sync", "sync_predictions", "sync"),
}
ORDER = ("ingest", "train", "score", "sync")
NIGHTLY = StageDef("report", "flows.nightly", "nightly", "nightly")


def _is_prod() -> bool:
    return str(runtime.deployment.name or "").endswith("-prod")


def _current_run_id() -> str:
    return str(runtime.flow_run.id or "local")


def _report(spec_path: str, warehouse: str, outcomes: list[StageOutcome]) -> tuple[StageOutcome, str]:
    """Cost-ledger rows for stages that did not price themselves, then KPIs/SLOs of the whole run."""
    started = now_utc()
    root = _current_run_id()
    out = StageOutcome("report", "completed", flow="nightly", flow_run_id=root)
    cost_line = ""
    try:
        from tasks.costs import record_stage_cost

        priced = {tuple(p) for p in read_run_costs(spec_path, warehouse, root)["priced"]}
        for o in outcomes:
            if o.flow_run_id is None or o.started_at is None or (o.flow_run_id, o.stage) in priced:
                continue
            m = o.metrics
            record_stage_cost(
                spec_path,
                warehouse,
                o.stage,
                o.started_at,
                ended_at=o.ended_at,
                status=o.status,
                rows={
                    "ingested": int(pick(m, ("rows_ingested", "rows_merged", "merged")) or 0),
                    "scored": int(pick(m, ("rows_scored", "scored")) or 0),
                    "pushed": int(pick(m, ("rows_pushed", "pushed")) or 0),
                },
                model_name=str(m.get("model_name") or m.get("model") or ""),
                model_version=str(m.get("model_version") or m.get("version") or ""),
                flow_run_id=o.flow_run_id,
            )
        totals = read_run_costs(spec_path, warehouse, root)
        cost_line = str(totals["line"])
        out.metrics = {"total_usd": totals["total_usd"], "priced_stages": totals["stages"]}

        from tasks.kpis import evaluate_run_kpis

        train = next((o for o in outcomes if o.stage == "train" and o.status == "completed"), None)
        known = {"model.auc": pick(train.metrics, ("metrics.roc_auc", "roc_auc"))} if train else {}
        kpis = evaluate_run_kpis(spec_path, warehouse, flow_run_id=root, metrics=known, fail_on_breach=True)
        out.metrics.update({f"slo.{k}": v for k, v in dict(kpis.get("slos") or {}).items()})
    except Exception as exc:  # a breached SLO / budget, or the ledger unavailable: reported, never hidden
        out.status = "failed"
        out.message = f"{type(exc).__name__}: {exc}"
        out.advice = advice("report", exc, out.message, NIGHTLY.rerun("nightly"))
    out.seconds = (now_utc() - started).total_seconds()
    return out, cost_line


@flow(
    name="nightly",
    log_prints=True,
    description="ingest → (train when triggered) → score → sync → cost/KPI report; stops at the first failed gate.",
)
@pipeline_lease()  # the whole run holds the pipeline; its stage subflows re-enter the lease
def nightly(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    mlflow: str = "opsloop-mlflow/local",
    full_refresh: bool = False,
    since: datetime | None = None,
    sources: list[str] | None = None,
    retrain: Literal["auto", "always", "never"] = "auto",
    destination: str | None = None,
    dry_run: bool = False,
    sync_limit: int | None = None,
) -> Any:
    """Run the whole loop for one pipeline spec.

    Args:
        spec_path: Pipeline spec (YAML) relative to the repository root.
        warehouse: Warehouse block document, e.g. opsloop-duckdb/local or opsloop-bigquery/prod.
        mlflow: MLflow block document used by train and score.
        full_refresh: Re-read every source from scratch (ingest) instead of incrementally.
        since: Re-read sources from this timestamp (ingest); empty = from the stored watermark / LSN.
        sources: Only these source ids (ingest); empty = all sources of the spec.
        retrain: auto = train when a drift/manual trigger is pending or the schedule is due; always; never.
        destination: Push only to this CRM destination (salesforce / hubspot); empty = all.
        dry_run: Compute the CRM push and report it without writing to the CRM.
        sync_limit: Push at most this many records per destination.
    """
    spec = load_spec(spec_path)
    params: dict[str, Any] = {
        "spec_path": spec_path,
        "warehouse": warehouse,
        "mlflow": mlflow,
        "full_refresh": full_refresh,
        "since": since,
        "sources": sources,
        "retrain": retrain,
        "destination": destination,
        "dry_run": dry_run,
        "sync_limit": sync_limit,
    }
    candidates = {
        **params,
        "limit": sync_limit,
        "retry_failed_only": False,
        "reason": "nightly",
        # score fans out over partitions as runs of this deployment (production twin when nightly is)
        "deployment": f"score/score-partition{'-prod' if _is_prod() else ''}",
    }
    log = logger()
    progress = Progress(len(ORDER) + 1, f"nightly {spec.name}")
    outcomes: list[StageOutcome] = []
    culprit: StageOutcome | None = None
    for name in ORDER:
        defn = STAGES[name]
        fl = load_stage(defn)
        if culprit is not None:
            outcomes.append(StageOutcome(name, "skipped", message=f"not run: {culprit.stage} {culprit.status}"))
        elif fl is None:
            outcomes.append(StageOutcome(name, "not_available", message=f"{defn.module} is not installed yet"))
        else:
            why = ""
            if name == "train":
                run_it, why = (retrain == "always", f"retrain={retrain}")
                if retrain == "auto":
                    run_it, why = decide_retrain(spec_path, warehouse)
                if not run_it:
                    outcomes.append(StageOutcome(name, "skipped", message=f"not triggered ({why})"))
                    progress.step(f"{name} skipped")
                    continue
                log.info("training triggered: %s", why)
            started = now_utc()
            outcome, _ = run_stage(defn, fl, accepted_kwargs(fl, {**candidates, "reason": why or "nightly"}))
            outcome.started_at, outcome.ended_at = started, now_utc()
            outcomes.append(outcome)
            if not outcome.ok:
                culprit = outcome
        progress.step(f"{name} {outcomes[-1].status}")

    report, cost_line = _report(spec_path, warehouse, outcomes)
    outcomes.append(report)
    progress.finish()

    run_id = runtime.flow_run.id
    run_url = (url_for("flow-run", obj_id=run_id) or "") if run_id else ""
    md = summary_markdown(spec.name, outcomes, params, cost_line, run_url)
    create_markdown_artifact(md, key="nightly-summary", description=f"nightly run of {spec.name}")
    create_table_artifact(stage_rows(outcomes), key="nightly-stages", description=f"stages of the {spec.name} run")
    print(md)

    verdict, culprit = final_verdict(outcomes)
    summary = {
        "pipeline": spec.name,
        "status": verdict,
        "stages": {o.stage: {"status": o.status, "flow_run_id": o.flow_run_id, **o.metrics} for o in outcomes},
        "cost": cost_line,
    }
    if culprit is None:
        return summary
    message = (
        culprit.advice.message(culprit.stage, culprit.message, culprit.status) if culprit.advice else culprit.message
    )
    return Failed(name="Blocked" if verdict == "blocked" else "Failed", message=message, data=summary)


if __name__ == "__main__":
    state = nightly(return_state=True)
    sys.exit(0 if state.is_completed() else 1)
