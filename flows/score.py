"""Score flow: features as of today → champion scores (fan-out over K hash partitions on the work
pool when asked) → drift + concept drift with the spec's policy → human review of high-risk rows."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from blocks import load_warehouse
from opsloop.errors import ConfigError, TerminalError
from opsloop.ml.features import latest_as_of
from opsloop.spec import load_spec
from tasks.common import flow_run_id
from tasks.lease import pipeline_lease
from tasks.ml import build_feature_snapshot, model_spec
from tasks.score import apply_review, check_drift, pending_review, score_one_partition


class ReviewDecision(RunInput):
    """What the reviewer decides for the held high-risk predictions of this run."""

    approve: bool = Field(description="Release the held rows to the CRM push (false: reject them all).")
    reject_ids: list[str] = Field(default_factory=list, description="Entity keys to reject even when approving.")
    note: str = Field(default="", description="Why (kept in the review table).")


def _fan_out(
    deployment: str, params: dict[str, Any], partitions: int, batch: str, timeout: float
) -> list[dict[str, Any]]:
    """One flow run per partition on the deployment's work pool; wait for all, name the failures."""
    runs = [
        run_deployment(
            deployment,
            parameters={**params, "partition": p, "partitions": partitions, "batch": batch},
            timeout=0,
            as_subflow=True,
            tags=[f"batch:{batch}", f"partition:{p}"],
        )
        for p in range(partitions)
    ]
    deadline = time.monotonic() + timeout
    states: dict[int, Any] = {}
    with get_client(sync_client=True) as client:
        while len(states) < partitions and time.monotonic() < deadline:
            for p, fr in enumerate(runs):
                if p not in states:
                    cur = client.read_flow_run(fr.id)
                    if cur.state is not None and cur.state.is_final():
                        states[p] = cur
            time.sleep(1.0)
    out = [
        {"partition": p, "flow_run_id": str(fr.id), "state": states[p].state.type.value if p in states else "TIMEOUT"}
        for p, fr in enumerate(runs)
    ]
    bad = [o for o in out if o["state"] != "COMPLETED"]
    if bad:
        raise TerminalError(
            f"scoring batch {batch}: partition(s) {[o['partition'] for o in bad]} did not complete "
            f"({', '.join(o['state'] + ' ' + o['flow_run_id'] for o in bad)}); rerun those flow runs — "
            "completed partitions are kept (MERGE is idempotent)"
        )
    return out


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _review(spec_path: str, warehouse: str, batch: str, timeout: int, default: str) -> dict[str, Any]:
    waiting = pending_review(spec_path, warehouse, batch)
    if waiting["pending"] == 0:
        return {"pending": 0}
    lines = [f"{waiting['pending']} high-risk prediction(s) wait for review (default after {timeout}s: {default}).", ""]
    lines += [f"- {r.get('review_reason')}" for r in waiting["rows"][:20]]
    try:
        decision = pause_flow_run(
            wait_for_input=ReviewDecision.with_initial_data(description="\n".join(lines), approve=default == "approve"),
            timeout=timeout,
            poll_interval=2,
        )
        approve, by, note, rejects = decision.approve, "prefect-ui", decision.note, decision.reject_ids
    except FlowPauseTimeout:
        approve, by, note, rejects = default == "approve", "timeout-default", f"no decision within {timeout}s", []
    out = apply_review(spec_path, warehouse, batch, approve, by, note, rejects)
    return {"pending": waiting["pending"], "approved": approve, "decided_by": by, **out}


@flow(name="score", log_prints=True)
@pipeline_lease()  # one run of the pipeline at a time (docs/reliability.md#overlap)
def score_customers(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    mlflow: str = "opsloop-mlflow/local",
    partitions: int | None = None,
    partition: int | None = None,
    alias: str = "champion",
    as_of: str | None = None,
    batch: str | None = None,
    deployment: str | None = None,
    build: bool = True,
    review_timeout: int | None = None,
    fan_out_timeout: float = 3600,
) -> dict[str, Any]:
    """Score the population. ``partition`` set = one child partition of batch ``batch`` (fan-out child)."""
    spec = load_spec(spec_path)
    ms = model_spec(spec, spec_path)
    k = partitions or spec.scoring.partitions
    snapshot = date.fromisoformat(as_of) if as_of else None
    if partition is not None:  # a fan-out child (or the rerun of one failed partition)
        if batch is None:
            raise ConfigError("score: a partition run needs the batch id of its parent (batch=...)")
        out = score_one_partition(spec_path, warehouse, mlflow, alias, snapshot, batch, partition, k)
        print(f"partition {partition}/{k} of batch {batch}: {out['rows']} rows, served {out['served']}")
        return out
    batch = batch or flow_run_id()
    if ms.features.build is not None and build:
        snapshot = snapshot or datetime.now(UTC).date()
        build_feature_snapshot(spec_path, warehouse, snapshot)
    elif snapshot is None and ms.features.as_of:
        snapshot = latest_as_of(load_warehouse(warehouse), ms.features)
    params = {
        "spec_path": spec_path,
        "warehouse": warehouse,
        "mlflow": mlflow,
        "alias": alias,
        "as_of": str(snapshot) if snapshot else None,
        "build": False,
    }
    if k == 1:
        parts = [score_one_partition(spec_path, warehouse, mlflow, alias, snapshot, batch, 0, 1)]
    else:
        target = deployment or (f"score/{runtime.deployment.name}" if runtime.deployment.name else None)
        if target is None:
            raise ConfigError("score: fan-out over partitions needs a deployment (deployment='score/<name>')")
        parts = _fan_out(target, params, k, batch, fan_out_timeout)
    drift = check_drift(spec_path, warehouse, batch, k)
    rv = spec.scoring.review
    reviewed = _review(spec_path, warehouse, batch, review_timeout or rv.timeout, rv.default) if rv.enabled else None
    md = [
        f"# score · {spec.name} · batch {batch}",
        "",
        f"{drift['rows']} rows in {k} partition(s) as of {snapshot}; drift **{drift['status']}** "
        f"(policy {spec.scoring.drift.policy} → {drift['action']}); concept drift {drift['concept_drift']['status']}",
        "",
        "| feature | PSI | status |",
        "|---|---|---|",
        *[f"| {f['feature']} | {_num(f['psi'])} | {f['status']} {f['note']} |" for f in drift["features"]],
    ]
    if reviewed:
        md += ["", f"Review: {reviewed}"]
    create_markdown_artifact("\n".join(md), key="score-summary", description=f"scoring batch {batch}")
    print("\n".join(md))
    return {
        "batch": batch,
        "as_of": str(snapshot),
        "rows_scored": drift["rows"],
        "model_version": parts[0].get("model_version"),
        "is_fallback": any(p.get("is_fallback") for p in parts),
        "partitions": parts,
        "drift": drift,
        "review": reviewed,
    }


if __name__ == "__main__":
    score_customers()
