"""Overlap (issue 9, part 4): a manual ``ingest`` run started while the nightly run of the same
pipeline is in progress is held by the pipeline lease and then refused with a message naming the
nightly run; the nightly completes and the day's CDC batch is processed exactly once.

The nightly is held at a fault point with ``OPSLOOP_FAULT=<point>:pause`` (it waits for the file
named by ``OPSLOOP_FAULT_RELEASE``). Two points:

* ``after_scoring_before_merge`` — the nightly holds the lease, not the warehouse file: the manual
  run meets the lease at once, waits ``warehouse.leaseWait`` and fails;
* ``after_state_before_slot_advance`` — the most dangerous moment: the warehouse has the batch, the
  replication slot does not know yet, so a second reader would get the same changes again. DuckDB's
  file lock holds the manual run first (the nightly's ingest keeps its connection), then the lease.

Deployment-level concurrency limits (a second trigger of one deployment waits for the first) are
tested in ``tests/flows/test_prefect_yaml.py::test_targets_are_paired_and_consistent`` and
``tests/e2e/test_nightly_deployment.py::test_custom_run_completes_and_second_run_waits``.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.faults.conftest import Lab
from tests.faults.lab import Running, clone, dispose, start_flow

pytestmark = [pytest.mark.slow]

LEASE_WAIT = 3  # seconds (spec warehouse.leaseWait) — short, so the refusal comes quickly


def _wait_for(path: Path, timeout: float, what: str, running: Running) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        proc = running.process
        assert proc.is_alive(), f"{what}: the nightly ended (exit {proc.exitcode}) before it reached the point"
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout} s"
        time.sleep(0.1)


def _rows_since(wh: DuckDBAdapter, table: str, at: str, since: datetime) -> list[dict[str, Any]]:
    return [r for r in wh.query(f"SELECT * FROM {table}").to_pylist() if r[at] is not None and r[at] >= since]


@pytest.mark.parametrize("point", ["after_scoring_before_merge", "after_state_before_slot_advance"])
def test_manual_ingest_during_the_nightly_is_refused_and_the_batch_lands_once(fault_lab: Lab, point: str) -> None:
    lab = fault_lab
    p = clone(
        lab.template, f"ovl-{point.replace('_', '-')}", lab.source_dsn, **{"warehouse.leaseWait": f"{LEASE_WAIT}s"}
    )
    try:
        tpl = lab.template.wh()
        tx_before = tpl.query("SELECT COUNT(*) AS n FROM ops_ai.transactions").to_pylist()[0]["n"]
        q_before = tpl.query("SELECT COUNT(*) AS n FROM opsloop_meta._quarantine").to_pylist()[0]["n"]
        release = p.base / "release"
        day_started = datetime.now(UTC)
        nightly = start_flow(p, "nightly", f"{point}:pause", {"OPSLOOP_FAULT_RELEASE": str(release)})
        _wait_for(Path(f"{release}.reached"), 300, point, nightly)

        manual = start_flow(p, "ingest")
        if point == "after_state_before_slot_advance":
            time.sleep(3)  # the manual run is stuck on the warehouse file the paused ingest holds
            assert manual.process.is_alive(), "the manual ingest ended while the nightly held the warehouse"
            release.write_text("go")
            refused = manual.wait(300)
        else:
            refused = manual.wait(300)  # refused while the nightly is still paused
            release.write_text("go")
        done = nightly.wait(600)

        assert done.returncode == 0 and done.state == "Completed", f"nightly: {done.state} {done.message}"
        assert refused.returncode == 1 and refused.state == "Failed", (
            f"manual ingest: {refused.state} {refused.message}"
        )
        msg = refused.message
        assert (
            f"PipelineBusyError: pipeline customer_ops_ai is being processed by flow run {done.flow_run_id}" in msg
        ), msg
        assert f"(warehouse.leaseWait {LEASE_WAIT} s)" in msg and "this ingest run changed nothing" in msg, msg
        assert "docs/reliability.md#overlap" in msg, msg
        assert refused.seconds >= LEASE_WAIT, "the manual run was refused without waiting for the lease"

        # the day's batch was processed exactly once: by the nightly's ingest, not by the manual run
        wh = p.wh()
        runs = _rows_since(wh, "opsloop_meta._ingest_runs", "finished_at", day_started)
        assert {str(r["run_id"]) for r in runs} and len(runs) == 3, runs
        assert Counter(str(r["stream"]) for r in runs) == {"customers": 1, "transactions": 1, "support_tickets": 1}
        assert sum(int(r["inserted"]) + int(r["updated"]) + int(r["deleted"]) for r in runs) > 0
        by_stream = {str(r["stream"]): r for r in runs}
        tx = wh.query("SELECT COUNT(*) AS n, COUNT(DISTINCT event_id) AS k FROM ops_ai.transactions").to_pylist()[0]
        t = by_stream["transactions"]
        assert tx["n"] == tx["k"] == tx_before + int(t["inserted"]) - int(t["deleted"]), (tx, t)
        assert int(t["inserted"]) >= lab.day1["transactions_new"] - int(t["rows_quarantined"]) > 0, t
        quarantined = sum(int(r["rows_quarantined"]) for r in runs)
        q_after = wh.query("SELECT COUNT(*) AS n FROM opsloop_meta._quarantine").to_pylist()[0]["n"]
        assert q_after == q_before + quarantined, "quarantine rows written twice"
        assert wh.query("SELECT COUNT(*) AS n FROM opsloop_meta._pipeline_lease").to_pylist()[0]["n"] == 0

        # once the nightly is done the pipeline is free: a manual run now finds nothing left to do
        after = start_flow(p, "ingest").wait(300)
        assert after.returncode == 0 and after.state == "Completed", f"{after.state} {after.message}"
        last = [
            r
            for r in wh.query("SELECT * FROM opsloop_meta._ingest_runs").to_pylist()
            if r["run_id"] == after.flow_run_id
        ]
        assert len(last) == 3 and all(int(r["inserted"]) + int(r["updated"]) + int(r["deleted"]) == 0 for r in last), (
            last
        )
    finally:
        dispose(p, lab.source_dsn)
