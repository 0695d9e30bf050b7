"""The reverse-ETL flow: push changed predictions into every CRM destination of a pipeline."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from opsloop.errors import ConfigError
from opsloop.spec import load_spec
from tasks.lease import pipeline_lease
from tasks.sync import push_crm_destination

COLUMNS = (
    "destination",
    "status",
    "candidates",
    "pushed",
    "created",
    "updated",
    "failed",
    "rejected",
    "held",
    "deferred",
    "api_calls",
    "api_left",
    "api_paced_s",  # seconds the push waited to keep under the CRM's rolling window (HubSpot)
)


@flow(name="sync", log_prints=True)
@pipeline_lease()  # one run of the pipeline at a time (docs/reliability.md#overlap)
def sync_predictions(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    destination: str | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    retry_failed_only: bool = False,
) -> dict[str, Any]:
    """Push changed predictions to the CRM destinations (``destination``: a name like
    ``salesforce.Contact``, a CRM name, or a connection block; default: all)."""
    spec = load_spec(spec_path)
    dests = [d for d in spec.reverse_etl() if destination is None or destination in (d.name, d.crm, d.connection)]
    if not dests:
        known = [d.name for d in spec.reverse_etl()]
        raise ConfigError(f"{spec_path}: no reverse_etl destination matches {destination!r} (known: {known})")
    states = [
        push_crm_destination(spec_path, warehouse, d.name, dry_run, limit, retry_failed_only, return_state=True)
        for d in dests
    ]
    reports, errors = [], []
    for d, state in zip(dests, states, strict=True):
        if state.is_completed():
            reports.append(state.result())
        else:
            errors.append(state)
            reports.append({"destination": d.name, "status": "failed", "note": str(state.message or "")[:300]})
    _artifacts(spec.name, reports, dry_run)
    if errors:
        errors[0].result()  # re-raise the first failure (after the artifact shows what did land)
    return {
        "pipeline": spec.name,
        "destinations": reports,
        "rows_pushed": sum(int(r.get("pushed") or 0) for r in reports),
        "api_calls": {r["destination"]: int(r.get("api_calls") or 0) for r in reports},
        "api_left": {r["destination"]: int(r["api_left"]) for r in reports if r.get("api_left") is not None},
    }


def _artifacts(pipeline: str, reports: list[dict[str, Any]], dry_run: bool) -> None:
    rows = [{c: r.get(c) for c in COLUMNS} for r in reports]
    create_table_artifact(rows, key="sync-destinations", description=f"CRM push of {pipeline}")
    lines = [
        f"# sync · {pipeline}{' (dry run)' if dry_run else ''}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |" for r in reports]
    for r in reports:
        extra = []
        if r.get("failed_by_code"):
            extra.append("failed by error code: " + ", ".join(f"`{k}` {v}" for k, v in r["failed_by_code"].items()))
        if r.get("note"):
            extra.append(f"note: {r['note']}")
        if r.get("dry_run"):
            extra.append(
                f"would create {r.get('would_create', 0)}, would update {r.get('would_update', 0)}, "
                f"held {r.get('would_hold', 0)}; would spend {r.get('planned_calls')} call(s), "
                f"allowance {r.get('allowance')}, calls left today {r.get('api_left')}"
            )
            extra += [f"sample: `{s}`" for s in (r.get("samples") or [])[:3]]
        schema = r.get("schema") or {}
        if schema.get("missing") or schema.get("created"):
            extra.append(
                f"schema: missing {schema.get('missing')}, created {schema.get('created')}; "
                f"{'; '.join(schema.get('instructions') or [])}"
            )
        if extra:
            lines += ["", f"**{r['destination']}**", *[f"- {e}" for e in extra]]
    md = "\n".join(lines)
    create_markdown_artifact(md, key="sync-summary", description=f"CRM push of {pipeline}")
    print(md)


if __name__ == "__main__":
    sync_predictions()
