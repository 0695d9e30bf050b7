"""Train flow: build the feature snapshot → train → register → promotion gate → report."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from opsloop.spec import load_spec
from tasks.lease import pipeline_lease
from tasks.ml import build_feature_snapshot, consume_retrain_triggers, model_spec, train_register_model


def _as_of(value: str | None, horizon_days: int | None) -> date | None:
    if value:
        return date.fromisoformat(value)
    if horizon_days is None:
        return None
    return datetime.now(UTC).date() - timedelta(days=horizon_days)


def _report(spec_name: str, out: dict[str, Any]) -> str:
    m = out["metrics"]
    lines = [
        f"# train · {out['model']} v{out['version']} · **{out['decision']}**",
        "",
        f"Reason: {out['reason']}",
        "",
        "| metric | challenger | champion (same holdout) |",
        "|---|---|---|",
    ]
    champ = out.get("champion_metrics") or {}
    for k in ("roc_auc", "pr_auc", "brier", "log_loss"):
        c = champ.get(k)
        lines.append(f"| {k} | {m[k]:.4f} | {'' if c is None else f'{c:.4f}'} |")
    lines += ["", "| feature | ROC AUC drop when permuted |", "|---|---|"]
    lines += [f"| {n} | {v:.4f} |" for n, v in out["importance"]]
    if out.get("fairness"):
        f = out["fairness"]
        lines += ["", f"Fairness by `{f['column']}` ({f['metric']} gap {f['gap']:.4f})", ""]
        lines += ["| group | n | observed | positive rate | mean score | AUC |", "|---|---|---|---|---|---|"]
        for g in f["groups"]:
            auc = "" if g["roc_auc"] is None else f"{g['roc_auc']:.3f}"
            lines.append(
                f"| {g['group']} | {g['n']} | {g['observed_rate']:.3f} | {g['positive_rate']:.3f} | "
                f"{g['mean_score']:.3f} | {auc} |"
            )
        if f["skipped"]:
            lines.append(f"\nGroups too small to judge: {', '.join(f['skipped'])}")
    if out.get("run_url"):
        lines += ["", f"MLflow run (plots: calibration, feature importance): {out['run_url']}"]
    return "\n".join(lines)


@flow(name="train", log_prints=True)
@pipeline_lease()  # one run of the pipeline at a time (docs/reliability.md#overlap)
def train_model(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    mlflow: str = "opsloop-mlflow/local",
    reason: str = "manual",
    as_of: str | None = None,
    build: bool = True,
) -> dict[str, Any]:
    """Train the spec's model as of ``as_of`` (default: today − features.build.horizonDays) and gate it."""
    started = datetime.now(UTC)
    spec = load_spec(spec_path)
    ms = model_spec(spec, spec_path)
    fb = ms.features.build
    snapshot = _as_of(as_of, fb.horizon_days if fb else None)
    built = None
    if build and fb is not None and snapshot is not None:
        built = build_feature_snapshot(spec_path, warehouse, snapshot)
    out = train_register_model(spec_path, warehouse, mlflow, snapshot, reason)
    consume_retrain_triggers(spec_path, warehouse, started, f"v{out['version']} {out['decision']}: {out['reason']}")
    md = _report(spec.name, out)
    create_markdown_artifact(md, key="train-report", description=f"training of {ms.name}")
    create_table_artifact(out["calibration"], key="train-calibration", description="holdout calibration bins")
    print(md)
    return {**out, "features": built}


if __name__ == "__main__":
    train_model()
