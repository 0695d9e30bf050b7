"""Run the nightly flow in a child process and record its final state (the fault suite's child).

Children are forked from a ``forkserver`` that imported the flows once (``tests.faults.lab``), so a
run costs its work, not the ~7 s of imports; ``OPSLOOP_FAULT`` is set in the child only. A child
writes ``{"state", "message", "flow_run_id"}`` as JSON to ``result_path`` and exits 0 when the run
completed, 1 otherwise, 137 when ``OPSLOOP_FAULT=<point>:kill`` fired (then nothing is written).

By hand: ``python -m tests.faults.run_nightly '{"spec_path": ..., "warehouse": ...}'``.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import flows.ingest
import flows.score
import flows.sync
from flows.nightly import nightly

PRELOAD = ["tests.faults.run_nightly"]
# What a nightly run imports only when it gets there (measured: ~1,400 modules, mostly MLflow, skops
# and scikit-learn when the model is loaded, the CRM clients, the cost/KPI tasks) — imported once in
# the forkserver, so each forked run starts warm instead of paying ~5 s of CPU for imports.
WARM = (
    "mlflow",
    "mlflow.sklearn",
    "mlflow.pyfunc",
    "mlflow.artifacts",
    "mlflow.tracking",
    "skops.io",
    "sklearn.ensemble",
    "sklearn.pipeline",
    "sklearn.compose",
    "sklearn.preprocessing",
    "sklearn.impute",
    "scipy.io",
    "hubspot.crm.objects",
    "hubspot.crm.properties",
    "simple_salesforce",
    "sqlglot.dialects.bigquery",
    "sqlglot.dialects.duckdb",
    "duckdb",
    "prefect.task_engine",
    "prefect.concurrency.sync",
    "prefect.utilities.visualization",
    "psycopg",
    "tasks.costs",
    "tasks.kpis",
    "tasks.ml",
    "tasks.score",
    "tasks.sync",
    "tasks.ingest",
    "flows.train",
    "opsloop.sources.pgcdc",
    "opsloop.crm.runner",
    "opsloop.crm.hubspot",
    "opsloop.crm.salesforce",
    "opsloop.warehouse.duckdb",
)
for _name in WARM:
    importlib.import_module(_name)
__all__ = ["flows", "run_child"]


FLOWS: dict[str, Any] = {"nightly": nightly, "ingest": flows.ingest.ingest}


def run_child(
    params: dict[str, Any],
    fault: str | None,
    result_path: str,
    flow: str = "nightly",
    env: dict[str, str] | None = None,
) -> None:
    """Run ``flow`` (nightly, or ingest for a manual run) with ``OPSLOOP_FAULT=fault`` and ``env``."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from opsloop import faults

    os.environ.pop("OPSLOOP_FAULT", None)
    os.environ.update(env or {})
    if fault:
        os.environ["OPSLOOP_FAULT"] = fault
    faults.reset()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        state = FLOWS[flow](**params, return_state=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    info = {
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "state": state.name,
        "message": state.message or "",
        "flow_run_id": str(state.state_details.flow_run_id) if state.state_details else None,
    }
    Path(result_path).write_text(json.dumps(info))
    sys.stdout.flush()
    os._exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    run_child(json.loads(sys.argv[1]), os.environ.get("OPSLOOP_FAULT"), "/dev/stdout")
