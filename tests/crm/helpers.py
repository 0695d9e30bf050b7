"""Shared helpers for the reverse-ETL tests: a predictions table, a spec, a push through the real clients."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from opsloop.crm.clients import hubspot_client, salesforce_client
from opsloop.crm.retry import RetryPolicy
from opsloop.crm.runner import RunOptions, make_sink, push_destination
from opsloop.spec import PipelineSpec, load_spec
from opsloop.warehouse.base import TableRef, TableSchema, Warehouse
from sandbox.client import SandboxClient

PRED = TableRef("ops_ai", "predictions")
FAST = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.05, retry_after_cap=0.2)
ACTIONS = ("executive_call", "retention_offer", "check_in_email", "none")
ARROW = pa.schema(
    [
        ("customer_id", pa.string()),
        ("predicted_churn_risk", pa.float64()),
        ("risk_bucket", pa.string()),
        ("next_best_action", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
    ]
)

SPEC = """
name: crm_test
scoring:
  dataset: ops_ai
  table: predictions
destinations:
  - type: reverse_etl
    crm: salesforce
    connection: opsloop-salesforce/sandbox
    object: Contact
    externalIdField: Customer_Id__c
    entityKey: customer_id
    fieldMap:
      predicted_churn_risk: AI_Churn_Risk__c
      next_best_action: AI_Next_Action__c
      risk_bucket: AI_Risk_Bucket__c
      scored_at: AI_Scored_At__c
  - type: reverse_etl
    crm: hubspot
    connection: opsloop-hubspot/sandbox
    object: contacts
    externalIdField: customer_id
    entityKey: customer_id
    fieldMap:
      predicted_churn_risk: ai_churn_risk
      next_best_action: ai_next_action
      risk_bucket: ai_risk_bucket
      scored_at: ai_scored_at
sync:
  apiBudgetShare: {share}
  bulkThreshold: {bulk}
  retryCap: {cap}
  requireReview: {review}
  significance: {{ minDelta: {delta}, onBucketChange: true }}
"""


def cid(i: int) -> str:
    return f"C{i:07d}"


def bucket(score: float) -> str:
    return "low" if score < 0.3 else "medium" if score < 0.7 else "high"


def write_spec(
    tmp: Path, share: float = 0.5, bulk: int = 2000, cap: int = 3, review: bool = False, delta: float = 0.0
) -> PipelineSpec:
    path = tmp / "crm_test.yaml"
    path.write_text(SPEC.format(share=share, bulk=bulk, cap=cap, review=str(review).lower(), delta=delta))
    return load_spec(path)


def predictions(n: int, version: str = "1", seed: int = 1, start: int = 1) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    at = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(days=seed)
    rows = []
    for i in range(start, start + n):
        s = round(rnd.random(), 6)
        rows.append(
            {
                "customer_id": cid(i),
                "predicted_churn_risk": s,
                "risk_bucket": bucket(s),
                "next_best_action": ACTIONS[int(s * 4) % 4],
                "model_name": "churn",
                "model_version": version,
                "scored_at": at,
                "run_id": f"score-{seed}",
            }
        )
    return rows


def staged(wh: Warehouse, tmp: Path, n: int, **spec: Any) -> tuple[PipelineSpec, list[dict[str, Any]]]:
    """A spec (:func:`write_spec` with ``spec``) and ``n`` fresh predictions written to the warehouse."""
    rows = predictions(n)
    write_predictions(wh, rows)
    return write_spec(tmp, **spec), rows


def write_predictions(wh: Warehouse, rows: list[dict[str, Any]]) -> None:
    wh.ensure_dataset(PRED.dataset)
    wh.drop_table(PRED)
    wh.ensure_table(PRED, TableSchema.from_arrow(ARROW))
    wh.append(PRED, pa.Table.from_pylist(rows, schema=ARROW))


def push(
    wh: Warehouse,
    spec: PipelineSpec,
    crm: str,
    sbx: SandboxClient | None,
    run_id: str = "run-1",
    token: str | None = None,
    client: Any = None,
    policy: RetryPolicy | None = None,
    **run: Any,
) -> dict[str, Any]:
    """Push ``crm``'s destination of ``spec`` as the sync task does; ``client`` (a block's) instead of
    one for the sandbox, ``policy`` instead of the fast test retries (:data:`FAST`, read at call time:
    a test may swap it)."""
    dest = next(d for d in spec.reverse_etl() if d.crm == crm)
    if client is None:
        assert sbx is not None, "a sandbox, or a client"
        client = (
            salesforce_client(sbx.url, token or sbx.salesforce_token, timeout=(5, 60))
            if crm == "salesforce"
            else hubspot_client(token or sbx.hubspot_token, sbx.url, timeout=(5, 60))
        )
    sink = make_sink(dest, client, str(dest.connection), spec, policy=policy or FAST)
    if crm == "salesforce" and policy is None:
        sink.poll_interval = 0.02  # type: ignore[attr-defined]
    opts = RunOptions(run_id=run_id, **run)
    return push_destination(wh, sink, dest, spec, opts)


def expected(rows: list[dict[str, Any]], scored: Callable[[datetime], Any]) -> dict[str, tuple[Any, ...]]:
    """(churn risk, next action, bucket, ``scored(scored_at)``) per customer id: what the CRM should hold."""
    return {
        r["customer_id"]: (r["predicted_churn_risk"], r["next_best_action"], r["risk_bucket"], scored(r["scored_at"]))
        for r in rows
    }


def expected_sf(rows: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return expected(rows, lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.000+0000"))


def actual_sf(sbx: SandboxClient) -> dict[str, tuple[Any, ...]]:
    return {
        k: (v.get("AI_Churn_Risk__c"), v.get("AI_Next_Action__c"), v.get("AI_Risk_Bucket__c"), v.get("AI_Scored_At__c"))
        for k, v in sbx.by_key("salesforce", "Contact", "Customer_Id__c").items()
    }


def expected_hs(rows: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return expected(rows, lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.000Z"))


def actual_hs(sbx: SandboxClient) -> dict[str, tuple[Any, ...]]:
    out = {}
    for k, v in sbx.by_key("hubspot", "contacts", "customer_id").items():
        risk = v.get("ai_churn_risk")
        out[k] = (
            float(risk) if risk is not None else None,
            v.get("ai_next_action"),
            v.get("ai_risk_bucket"),
            v.get("ai_scored_at"),
        )
    return out


def sync_state(wh: Warehouse, destination: str) -> dict[str, str]:
    rows = wh.query(
        "SELECT entity, payload_hash FROM opsloop_meta._sync_state WHERE destination = $d", {"d": destination}
    ).to_pylist()
    return {r["entity"]: r["payload_hash"] for r in rows}


def log_counts(wh: Warehouse, run_id: str | None = None) -> dict[str, int]:
    where = "WHERE run_id = $r" if run_id else ""
    rows = wh.query(
        f"SELECT status, count(*) AS n FROM opsloop_meta._sync_log {where} GROUP BY 1",
        {"r": run_id} if run_id else None,
    ).to_pylist()
    return {r["status"]: int(r["n"]) for r in rows}
