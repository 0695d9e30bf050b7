"""Demo stage of the first nightly run: a generated customer table loaded by staging + MERGE."""

from __future__ import annotations

from typing import Any

from prefect import task

from blocks import load_warehouse
from opsloop.demo import DEMO_SCHEMA, demo_customers
from opsloop.warehouse.base import MergeSpec, StateUpdate, TableRef, TableSchema
from opsloop.warehouse.write import write_merge
from tasks.common import TRANSIENT_RETRIES, flow_run_id, run_labels


@task(name="load_demo_round", **TRANSIENT_RETRIES)
def load_demo_round(pipeline: str, warehouse: str, round_no: int, rows: int) -> dict[str, Any]:
    wh = load_warehouse(warehouse, **run_labels(pipeline, f"demo_round_{round_no}"))
    target = TableRef("ops_demo", "customers")
    data = demo_customers(rows, round_no)
    spec = MergeSpec(target, tuple(DEMO_SCHEMA.names), ("customer_id",), ("updated_at",))
    res = write_merge(
        wh,
        target,
        TableSchema.from_arrow(DEMO_SCHEMA, cluster_by=["customer_id"]),
        DEMO_SCHEMA,
        data.to_batches(max_chunksize=50_000),
        spec,
        job_key=f"{flow_run_id()}_demo_{round_no}",
        state=StateUpdate(pipeline, "demo.customers", flow_run_id(), cursor=str(round_no)),
    )
    return {"round": round_no, "staged": res.rows_staged, "inserted": res.inserted, "updated": res.updated}
