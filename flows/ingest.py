"""The ingest flow: every source of a pipeline spec into the warehouse, with a report per run."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from opsloop.errors import ConfigError
from opsloop.ingest.report import combine, report_markdown, report_rows
from opsloop.spec import load_spec
from tasks.ingest import ingest_source_task
from tasks.lease import pipeline_lease


@flow(name="ingest", log_prints=True, description="Sources → quality gates → PII → MERGE + state, per source.")
@pipeline_lease()  # one run of the pipeline at a time (docs/reliability.md#overlap)
def ingest(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    full_refresh: bool = False,
    since: datetime | None = None,
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Ingest ``sources`` (default: all) of the spec into the ``warehouse`` block.

    ``full_refresh`` re-snapshots (CDC: new slot) and replaces the targets; ``since`` re-reads
    watermark sources from that timestamp. A failing source does not stop the others; the flow fails
    at the end, naming it, after the report artifacts are written.
    """
    spec = load_spec(spec_path)
    ids = [s.id for s in spec.sources]
    selected = list(sources) if sources else ids
    unknown = [s for s in selected if s not in ids]
    if unknown:
        raise ConfigError(f"sources: {unknown} are not sources of pipeline {spec.name!r} ({ids})")
    results: list[dict[str, Any]] = []
    failures: list[tuple[str, BaseException]] = []
    for sid in selected:
        state = ingest_source_task(spec_path, warehouse, sid, full_refresh, since, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            exc = state.result(raise_on_failure=False)
            err = exc if isinstance(exc, BaseException) else RuntimeError(str(state.message))
            failures.append((sid, err))
    summary = combine(spec.name, results, failures)
    create_markdown_artifact(report_markdown(summary), key="ingest-report", description=f"ingest of {spec.name}")
    create_table_artifact(report_rows(summary), key="ingest-streams", description="rows per stream, this run")
    print(report_markdown(summary))
    if failures:
        raise failures[0][1]
    return summary


if __name__ == "__main__":
    ingest()
