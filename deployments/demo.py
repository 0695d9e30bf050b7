"""The last step of ``make demo``: demo data, local deployments, one nightly run through the worker.

    python -m deployments.demo [--customers 5000] [--no-deploy] [--timeout 1800]

1. the demo source database (``source`` on the stack's PostgreSQL): seeded on the first run, one
   "next day" of changes (``opsloop.demodata advance``) on every later run, so each demo run has
   new, changed and deleted rows to ingest;
2. ``python -m deployments.deploy local`` (every local deployment in prefect.yaml);
3. a run of the ``nightly/nightly`` deployment, picked up by the stack's process worker — the same
   path a scheduled or UI-triggered run takes — waited for, then its summary artifact printed with
   the links to the Prefect UI (run page), MLflow and the CRM sandbox.

Exit code 0 only when the nightly run completed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "nightly/nightly"


def prepare_source(dsn: str, customers: int) -> dict[str, Any]:
    """Seed the demo source database once; afterwards advance it by one day per demo run."""
    import psycopg

    try:
        from opsloop import demodata
    except ImportError:
        return {"skipped": "opsloop.demodata is not installed yet"}
    seeded = False
    with psycopg.connect(dsn, autocommit=True) as con:
        row = con.execute("SELECT to_regclass('public.customers') IS NOT NULL").fetchone()
        if row and row[0]:
            row = con.execute("SELECT EXISTS (SELECT 1 FROM customers)").fetchone()
            seeded = bool(row and row[0])
    if seeded:
        return {"advanced": demodata.advance(dsn)}
    return {"seeded": demodata.seed(dsn, customers)}


def sync_crm_contacts(dsn: str, sandbox_url: str) -> dict[str, int]:
    """Give every demo customer a Contact in the sandbox's Salesforce org, as a real org would have.

    Salesforce creates no Contact without ``LastName``, so opsloop's push (an upsert of AI fields by
    ``Customer_Id__c``) updates existing Contacts; customers new since the last demo run get theirs here.
    """
    import psycopg

    from sandbox.client import SandboxClient

    sandbox = SandboxClient(sandbox_url)
    known = set(sandbox.by_key("salesforce", "Contact", "Customer_Id__c"))
    with psycopg.connect(dsn) as con:
        rows = con.execute("SELECT customer_id, full_name FROM customers ORDER BY customer_id").fetchall()
    new = [
        {"Customer_Id__c": cid, "FirstName": (name or "").split(" ")[0], "LastName": (name or cid).split(" ")[-1]}
        for cid, name in rows
        if cid and cid not in known
    ]
    for i in range(0, len(new), 5000):
        sandbox.load("salesforce", "Contact", new[i : i + 5000])
    return {"contacts_created": len(new), "contacts_total": len(known) + len(new)}


def run_nightly(timeout: float) -> tuple[Any, str]:
    """Trigger the nightly deployment, wait for its final state, return it with the summary artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.deployments import run_deployment

    run = run_deployment(DEPLOYMENT, timeout=timeout, tags=["demo"])
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=ArtifactFilterKey(any_=["nightly-summary"])
            )
        )
    return run, str(arts[0].data) if arts else ""


def main(argv: list[str] | None = None) -> int:
    from prefect.utilities.urls import url_for

    from deployments.deploy import deploy
    from opsloop.devstack.stack import LocalStack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=5000, help="size of the first seed")
    ap.add_argument("--no-deploy", action="store_true", help="skip `prefect deploy` (already deployed)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the nightly run")
    args = ap.parse_args(argv)

    stack = LocalStack.from_env(REPO)
    print(f"demo source database: {prepare_source(stack.pg.dsn('source'), args.customers)}", flush=True)
    print(f"CRM sandbox contacts: {sync_crm_contacts(stack.pg.dsn('source'), stack.sandbox_url)}", flush=True)
    if not args.no_deploy and deploy("local") != 0:
        print("prefect deploy failed", file=sys.stderr)
        return 1
    if not stack.services()["worker"].healthy():
        print("the process worker is not running: make stack-up", file=sys.stderr)
        return 1
    print(f"running deployment {DEPLOYMENT} on work pool opsloop-local …", flush=True)
    run, summary = run_nightly(args.timeout)
    print(summary or "(no summary artifact)")
    state = run.state
    print(f"\nnightly run {run.name}: {state.name if state else 'unknown'}")
    print(f"  run page     {url_for('flow-run', obj_id=run.id) or ''}")
    for what, where in stack.urls().items():
        print(f"  {what:<12} {where}")
    if state is None or not state.is_completed():
        print(f"\n{state.message if state else 'no final state'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
