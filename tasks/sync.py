"""Reverse-ETL task: push one CRM destination (coarse: one task run per destination)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.blocks.core import Block

from blocks import load_warehouse
from opsloop.crm.runner import RunOptions, make_sink, push_destination
from opsloop.errors import ConfigError
from opsloop.spec import load_spec
from tasks.common import TRANSIENT_RETRIES, flow_run_id, run_labels


def _client(ref: str) -> Any:
    try:
        block = Block.load(ref)
    except ValueError as exc:
        raise ConfigError(f"CRM block {ref!r} not found — run `make bootstrap` or create it: {exc}") from exc
    if not hasattr(block, "get_client"):
        raise ConfigError(f"block {ref!r} is a {type(block).__name__}, not a CRM credentials block")
    return block.get_client()


@task(name="push_crm_destination", **TRANSIENT_RETRIES)
def push_crm_destination(
    spec_path: str,
    warehouse: str,
    destination: str,
    dry_run: bool = False,
    limit: int | None = None,
    retry_failed_only: bool = False,
) -> dict[str, Any]:
    """Diff the predictions against the sync state and push the changes to one CRM destination."""
    spec = load_spec(spec_path)
    dest = next((d for d in spec.reverse_etl() if d.name == destination), None)
    if dest is None:
        raise ConfigError(f"{spec_path}: no reverse_etl destination {destination!r}")
    ref = str(dest.connection)
    wh = load_warehouse(warehouse, **run_labels(spec.name, f"sync_{dest.crm}"))
    sink = make_sink(dest, _client(ref), ref, spec)
    run = RunOptions(
        run_id=flow_run_id(), dry_run=dry_run or spec.sync.dry_run, limit=limit, retry_failed_only=retry_failed_only
    )
    report = push_destination(wh, sink, dest, spec, run)
    if not run.dry_run:
        report.pop("samples", None)
    return report
