"""GDPR erasure end to end: after a full nightly run, ``forget-subject`` (run through its local
deployment, asked by e-mail as a data-protection officer would) leaves no trace of the subject's
raw identifiers anywhere the loop writes, clears its AI fields in Salesforce and HubSpot, keeps
the subject out of the next nightly run (suppression list), and a rerun erases nothing more."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.security.conftest import (
    SUBJECT,
    SentinelStack,
    descendants,
    mlflow_text,
    prefect_artifacts_text,
    run_deployment,
    warehouse_text,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

FORGET = "forget-subject/forget-subject"


def identifiers() -> dict[str, str]:
    """The subject's raw identifiers: customer id, e-mail (and its local part), phone, name."""
    return {
        "customer id": SUBJECT.customer_id,
        **SUBJECT.raw_pii(),
        "last name": SUBJECT.last,
        "full name": SUBJECT.full_name,
    }


def traces(texts: dict[str, str]) -> dict[str, list[str]]:
    """``where -> [identifier kinds found]`` (case-insensitive)."""
    found: dict[str, list[str]] = {}
    for where, text in texts.items():
        low = text.lower()
        hits = [kind for kind, value in identifiers().items() if value.lower() in low]
        if hits:
            found[where] = hits
    return found


def ai_fields(stack: SentinelStack) -> dict[str, Any]:
    sbx = stack.sandbox()
    sf = sbx.by_key("salesforce", "Contact", "Customer_Id__c").get(SUBJECT.customer_id, {})
    hs = sbx.by_key("hubspot", "contacts", "customer_id").get(SUBJECT.customer_id, {})
    return {
        "sf": (sf.get("AI_Churn_Risk__c"), sf.get("AI_Next_Action__c")),
        "hs": (hs.get("ai_churn_risk"), hs.get("ai_next_action")),
        "sf_exists": bool(sf),
        "hs_exists": bool(hs),
    }


def audit_rows(stack: SentinelStack) -> list[dict[str, Any]]:
    import duckdb

    con = duckdb.connect(str(stack.warehouse_file), read_only=True)
    try:
        cur = con.execute('SELECT * FROM "opsloop_meta"."_erasure_log" ORDER BY started_at')
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def test_forget_subject_end_to_end(sentinel_stack: SentinelStack, tmp_path: Path, fast_flows: None) -> None:
    import psycopg
    from prefect.client.orchestration import get_client

    stack = sentinel_stack
    # before: the subject is everywhere the loop writes (so the checks below can fail)
    before = traces(warehouse_text(stack.warehouse_file))
    for table in (
        "ops_ai.customers",
        "ops_ai.transactions",
        "ops_ai.customer_features",
        "ops_ai.predictions",
        "ops_ai.prediction_history",
        "opsloop_meta._sync_state",
        "opsloop_meta._sync_log",
        "opsloop_meta._quarantine",
    ):
        assert "customer id" in before.get(table, []), (table, before)
    assert "last name" in before["ops_ai.customers"]
    fields = ai_fields(stack)
    assert fields["sf"][0] is not None and fields["hs"][0] not in (None, ""), fields

    # the DPO's request names the e-mail; the flow hashes it with the salt to find the subject
    request = {"email": SUBJECT.email, "reason": "ticket DPO-7", "requested_by": "dpo@example.com"}
    run = run_deployment(FORGET, {**_target(stack), **request})
    assert run.state.is_completed(), f"forget-subject ended {run.state.name}: {run.state.message}"

    # Prefect keeps the keyed hash, not the raw e-mail, in the run's stored parameters
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(run.id).parameters
    assert stored["email"] is None and stored["entity_key"] is None, stored
    assert re.fullmatch(r"[0-9a-f]{64}", stored["email_hash"]), stored
    assert not traces({"parameters": json.dumps(stored)})

    # no trace in any warehouse table; CRM AI fields cleared (the records themselves stay)
    wh = warehouse_text(stack.warehouse_file)
    assert traces(wh) == {}
    log = [r for r in wh["opsloop_meta._sync_log"].splitlines() if "erased:" in r]
    assert log, "the sync log keeps the subject's push history under its pseudonym"
    fields = ai_fields(stack)
    assert fields["sf_exists"] and fields["hs_exists"]
    assert fields["sf"] == (None, None) and all(v in (None, "") for v in fields["hs"]), fields

    audit = audit_rows(stack)
    first = audit[-1]
    assert first["status"] == "completed" and first["dry_run"] is False
    tables = json.loads(first["tables"])
    assert tables["ops_ai.customers"] == 1 and tables["ops_ai.transactions"] >= 1
    assert {"ops_ai.predictions", "opsloop_meta._sync_state", "opsloop_meta._quarantine"} <= set(tables)
    assert first["rows_erased"] == sum(tables.values())
    crm = json.loads(first["crm"])
    assert {v["status"] for v in crm.values()} == {"cleared"}, crm
    assert first["suppressed"] >= 2  # key hash + e-mail hash
    assert "dpo@example.com" in first["requested_by"] and first["reason"] == "ticket DPO-7"
    assert not traces({"audit": json.dumps(audit, default=str)})
    assert not traces(prefect_artifacts_text(stack.started, [run.id]))

    # the subject changes at the source; the next nightly run must not bring it back
    with psycopg.connect(stack.source_dsn, autocommit=True) as con:
        con.execute(
            "UPDATE customers SET mrr = mrr + 1, updated_at = now() WHERE customer_id = %s", (SUBJECT.customer_id,)
        )
        con.execute(
            "INSERT INTO transactions (event_id, customer_id, amount, currency, event_time, updated_at) "
            "VALUES ('E-SNTL-2', %s, 12.50, 'EUR', now() - interval '5 minutes', now())",
            (SUBJECT.customer_id,),
        )
    from flows.forget_subject import forget_subject
    from flows.nightly import nightly

    later = nightly(**stack.parameters(retrain="never"), return_state=True)  # in-process: same code, less start-up
    assert later.is_completed(), f"nightly ended {later.name}: {later.message}"
    stack.runs.append(later.state_details.flow_run_id)
    assert traces(warehouse_text(stack.warehouse_file)) == {}
    later_arts = prefect_artifacts_text(stack.started, descendants(later.state_details.flow_run_id))
    assert not traces(later_arts)
    flags = _stream_flags(later_arts)
    for stream in ("customers", "transactions"):  # skipped and counted, never silently
        assert re.search(r"privacy: [1-9]\d* row\(s\) of erased data subjects skipped", flags[stream]), flags
    fields = ai_fields(stack)
    assert fields["sf"] == (None, None) and all(v in (None, "") for v in fields["hs"]), fields

    # nothing of the subject in MLflow: params, tags, metrics, every artifact (input examples included)
    ml = mlflow_text(stack.mlflow_url, stack.experiment, stack.model_name, tmp_path / "mlflow")
    examples = [json.loads(v) for k, v in ml.items() if k.endswith("artifact input_example.json")]
    assert examples, sorted(ml)
    assert traces(ml) == {}
    _assert_synthetic(examples, stack)

    # a rerun (UI "Retry" re-sends the scrubbed parameters) is harmless and finds nothing more
    again = forget_subject(**_target(stack), email_hash=stored["email_hash"], return_state=True)
    assert again.is_completed(), f"rerun ended {again.name}: {again.message}"
    last = audit_rows(stack)[-1]
    assert last["status"] == "nothing_to_erase" and last["rows_erased"] == 0, last
    assert json.loads(last["tables"]) == {} and last["suppressed"] == 0
    assert last["subject"] == first["subject"]
    by_key = forget_subject(**_target(stack), entity_key=SUBJECT.customer_id, return_state=True)
    assert by_key.is_completed(), by_key.message
    last = audit_rows(stack)[-1]
    assert last["status"] == "nothing_to_erase" and last["subject"] == first["subject"], last
    assert {v["status"] for v in json.loads(last["crm"]).values()} == {"already_clear"}, last["crm"]


def _stream_flags(arts: dict[str, str]) -> dict[str, str]:
    """``stream -> flags`` from the ingest run's ``ingest-streams`` table artifact."""
    for text in arts.values():
        art = json.loads(text)
        if art["key"] == "ingest-streams":
            data = art["data"]
            rows = json.loads(data) if isinstance(data, str) else data
            return {r["stream"]: str(r.get("flags") or "") for r in rows}
    raise AssertionError(f"no ingest-streams artifact among {sorted(arts)}")


def _assert_synthetic(examples: list[dict[str, Any]], stack: SentinelStack) -> None:
    """Each logged input example is one synthetic row (medians / modes), equal to no customer's features."""
    import duckdb

    con = duckdb.connect(str(stack.warehouse_file), read_only=True)
    try:
        for ex in examples:
            cols, data = ex["columns"], ex["data"]
            assert len(data) == 1, ex
            numeric = [c for c, v in zip(cols, data[0], strict=True) if isinstance(v, int | float)]
            assert len(numeric) >= 5, ex
            where = " AND ".join(f'CAST("{c}" AS DOUBLE) = ?' for c in numeric)
            values = [float(data[0][cols.index(c)]) for c in numeric]
            same = con.execute(f'SELECT count(*) FROM "ops_ai"."customer_features" WHERE {where}', values).fetchone()
            assert same == (0,), f"the input example is a real customer's feature row: {ex}"
    finally:
        con.close()


def _target(stack: SentinelStack) -> dict[str, str]:
    return {"spec_path": stack.spec_path, "warehouse": stack.warehouse}
