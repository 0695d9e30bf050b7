"""Small renderings of ledger rows shared by tasks, flows and the CLI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from opsloop.costs import LEDGER_COLUMNS, LEDGER_SCHEMA, MIB
from opsloop.warehouse.base import LOGICAL_TO_ARROW


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Ledger rows as an Arrow table with the ledger's column types (for CSV export and artifacts)."""
    schema = pa.schema([pa.field(c.name, LOGICAL_TO_ARROW[c.type]) for c in LEDGER_SCHEMA.columns])
    return pa.Table.from_pylist([{c: r.get(c) for c in LEDGER_COLUMNS} for r in rows], schema=schema)


def summary_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line for a run's markdown summary."""
    tot = {k: sum(float(r.get(k) or 0) for r in rows) for k in ("total_usd", "bq_usd", "compute_usd", "api_usd")}
    jobs = sum(int(r.get("warehouse_jobs") or 0) for r in rows)
    billed = sum(int(r.get("bq_bytes_billed") or 0) for r in rows)
    calls = sum(int(r.get("api_calls") or 0) for r in rows)
    wall = sum(float(r.get("wall_seconds") or 0) for r in rows)
    return (
        f"cost ${tot['total_usd']:.6f} (BigQuery ${tot['bq_usd']:.6f} · compute ${tot['compute_usd']:.6f} · "
        f"API ${tot['api_usd']:.6f}) · {len(rows)} stage(s) · {wall:.1f} s · {jobs} warehouse job(s), "
        f"{billed / MIB:.1f} MiB billed · {calls} CRM call(s)"
    )
