"""Upstream gates that can block the CRM push: a small ``_gates`` table in the meta dataset.

Any stage records its verdict with :func:`record_gate` (append-only, one row per decision)::

    record_gate(wh, "customer_ops_ai", run_id, "quality", "pass")
    record_gate(wh, "customer_ops_ai", run_id, "drift", "fail", "PSI 0.31 on mrr > alertPsi 0.25 (policy block_push)")

Statuses: ``pass`` | ``warn`` (never block) and ``fail`` | ``block`` (block the push). The push
checks, per gate named in ``sync.blockOn`` (default quality and drift), the **latest** verdict for
the pipeline (optionally for one run): the push is blocked while that latest verdict is fail/block.
A later ``pass`` (a fixed rerun, a manual override recorded by an operator) releases it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from opsloop.warehouse.base import Column, TableRef, TableSchema, Warehouse

GATES_TABLE = "_gates"
BLOCKING = ("fail", "block", "blocked")
STATUSES = ("pass", "warn", *BLOCKING)
GATES_SCHEMA = TableSchema(
    (
        Column("pipeline", "STRING"),
        Column("run_id", "STRING"),
        Column("gate", "STRING"),
        Column("status", "STRING"),
        Column("reason", "STRING"),
        Column("at", "TIMESTAMP"),
    )
)
_ARROW = pa.schema(
    [
        ("pipeline", pa.string()),
        ("run_id", pa.string()),
        ("gate", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class GateVerdict:
    allowed: bool
    reason: str
    verdicts: dict[str, str]


def gates_ref(wh: Warehouse) -> TableRef:
    return TableRef(wh.meta_dataset, GATES_TABLE)


def record_gate(
    wh: Warehouse, pipeline: str, run_id: str, gate: str, status: str, reason: str = "", at: datetime | None = None
) -> None:
    """Append one gate verdict (``status`` one of pass, warn, fail, block)."""
    status = status.lower()
    if status not in STATUSES:
        raise ValueError(f"gate {gate!r}: status {status!r} is not one of {STATUSES}")
    ref = gates_ref(wh)
    wh.ensure_table(ref, GATES_SCHEMA)
    row = {
        "pipeline": pipeline,
        "run_id": run_id,
        "gate": gate,
        "status": status,
        "reason": reason,
        "at": at or datetime.now(UTC),
    }
    wh.append(ref, pa.Table.from_pylist([row], schema=_ARROW))


def push_allowed(
    wh: Warehouse, pipeline: str, block_on: Iterable[str] = ("quality", "drift"), run_id: str | None = None
) -> GateVerdict:
    """Is the push allowed? Looks at the latest verdict of each gate in ``block_on``."""
    gates = [g for g in block_on]
    if not gates:
        return GateVerdict(True, "no gates configured (sync.blockOn is empty)", {})
    ref = gates_ref(wh)
    if wh.table_schema(ref) is None:
        return GateVerdict(True, "no gate verdicts recorded yet", {})
    p = wh.param
    names = ", ".join(p(f"g{i}") for i in range(len(gates)))
    params: dict[str, object] = {"pipeline": pipeline, **{f"g{i}": g for i, g in enumerate(gates)}}
    run_filter = ""
    if run_id is not None:
        run_filter = f" AND run_id = {p('run_id')}"
        params["run_id"] = run_id
    sql = (
        f"SELECT gate, status, reason FROM {wh.quote(ref)} WHERE pipeline = {p('pipeline')} AND gate IN ({names})"
        f"{run_filter} QUALIFY ROW_NUMBER() OVER (PARTITION BY gate ORDER BY {wh.quote('at')} DESC) = 1"
    )
    rows = wh.query(sql, params).to_pylist()
    verdicts = {str(r["gate"]): str(r["status"]) for r in rows}
    blocked = [r for r in rows if str(r["status"]).lower() in BLOCKING]
    if blocked:
        why = "; ".join(f"{r['gate']} gate is {r['status']}: {r['reason'] or 'no reason given'}" for r in blocked)
        return GateVerdict(False, f"push blocked for {pipeline}: {why}", verdicts)
    return GateVerdict(True, "all gates pass" if verdicts else "no verdict for the configured gates", verdicts)
