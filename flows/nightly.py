"""The nightly loop: ingest → (train when triggered) → score → sync → cost/KPI report."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from opsloop.spec import load_spec
from tasks.demo import load_demo_round


@flow(name="nightly", log_prints=True)
def nightly(
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    demo_rows: int = 20_000,
) -> dict[str, Any]:
    """Run the nightly loop for one pipeline spec against the warehouse block ``warehouse``."""
    spec = load_spec(spec_path)
    rounds = [load_demo_round(spec.name, warehouse, r, demo_rows) for r in (0, 1)]
    lines = [f"| {r['round']} | {r['staged']} | {r['inserted']} | {r['updated']} |" for r in rounds]
    md = "\n".join(
        [f"# nightly · {spec.name}", "", "| round | staged | inserted | updated |", "|---|---|---|---|", *lines]
    )
    create_markdown_artifact(md, key="nightly-summary", description=f"nightly run of {spec.name}")
    print(md)
    return {"pipeline": spec.name, "rounds": rounds}


if __name__ == "__main__":
    nightly()
