"""Every fault point of the nightly loop, end to end (Postgres CDC → DuckDB → MLflow → CRM sandbox).

A reference copy of the day-0 pipeline runs day 1 without a fault. For each point (``raise``, and
``kill`` = the worker dies where a crash hurts most) another copy runs day 1 with the fault — it
must fail (or die) at that point — and then again without it; the result must be identical to the
reference: every warehouse table opsloop writes, the CRM records' AI fields, the sync log and sync
state (``tests/faults/compare.py`` says what identical means per table). Points and outcomes:
``docs/reliability.md#fault-points``.

The copies run three at a time (``OPSLOOP_FAULT_WORKERS``, default 3) in a thread pool started by the
``fault_runs`` fixture; each test waits for its own copy and judges it. Timings are printed at the
end of the session (and written to ``<test home>/fault-timings.json``).

The overlap tests (issue 9, part 4) are in this file too: they use the same lab, and ``make test``
hands out whole files to its pytest workers (``--dist loadfile``), so one file = one lab.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opsloop import faults
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.faults.compare import compare, cursor_covers_changes, day_log
from tests.faults.conftest import Lab
from tests.faults.lab import Case, Running, _context, clone, dispose, run_case, start_flow

pytestmark = [pytest.mark.slow]

# where each point sits: the stage whose failure the nightly reports
STAGE = {
    "after_extract": "ingest",
    "after_stage_load": "ingest",
    "mid_merge": "ingest",
    "after_merge_before_state": "ingest",
    "after_state_before_slot_advance": "ingest",
    "after_scoring_before_merge": "score",
    "mid_crm_push": "sync",
    "after_push_before_sync_state": "sync",
    "during_cost_write": "report",
}
KILL = (
    "mid_merge",
    "after_merge_before_state",
    "after_state_before_slot_advance",
    "mid_crm_push",
    "after_push_before_sync_state",
)
# the one window where the same record is sent twice: logged as confirmed, sync state not yet merged
RESEND_WINDOW = {"after_push_before_sync_state"}
CASES = [f"{p}:raise" for p in faults.POINTS] + [f"{p}:kill" for p in KILL]
WORKERS = int(os.environ.get("OPSLOOP_FAULT_WORKERS", "3"))  # runs wait on the API half the time
SF, HS = "salesforce.Contact", "hubspot.contacts"  # pushed one after the other, one batch each on day 1
# Which destinations' records the failed run confirmed in _sync_log, and which the rerun then sent
# (a point before the push: none, then both). A raise fails only the destination it hit — the next
# one is pushed in the same run (the point fires at its first pass only); a kill ends the run there.
PUSHED_BY_FAILED_RUN = {
    "mid_crm_push:raise": {SF, HS},  # SF's confirmed batch is still logged + its state written (finally)
    "mid_crm_push:kill": set(),  # SF's batch confirmed by the CRM, never logged: the rerun sends it again
    "after_push_before_sync_state:raise": {SF, HS},  # SF logged, its sync state not written
    "after_push_before_sync_state:kill": {SF},
    "during_cost_write:raise": {SF, HS},  # the push completed before the report failed
}
SENT_BY_RERUN = {
    "mid_crm_push:raise": set(),
    "after_push_before_sync_state:raise": {SF},  # the at-least-once window: the same payloads again
    "during_cost_write:raise": set(),
}


@dataclass
class FaultRuns:
    lab: Lab
    reference: Future[Case]
    cases: dict[str, Future[Case]]

    def get(self, fault: str) -> tuple[Case, Case]:
        if fault not in self.cases:
            pytest.fail(f"{fault} was not scheduled")
        return self.reference.result(), self.cases[fault].result()


def _selected(request: pytest.FixtureRequest) -> list[str]:
    mod = request.module
    out = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is mod and spec is not None and "fault" in spec.params:
            out.append(str(spec.params["fault"]))
    return out


@pytest.fixture(scope="module")
def fault_runs(fault_lab: Lab, request: pytest.FixtureRequest) -> Iterator[FaultRuns]:
    _context()  # the forkserver, before threads use it
    lab = fault_lab
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fault-case") as pool:
        ref = pool.submit(run_case, lab.template, lab.source_dsn, "ref", None)
        cases = {
            fault: pool.submit(
                run_case, lab.template, lab.source_dsn, "f-" + fault.replace(":", "-").replace("_", "-"), fault
            )
            for fault in _selected(request)
        }
        yield FaultRuns(lab, ref, cases)
        for name, fut in [("reference", ref), *cases.items()]:
            if fut.done() and fut.exception() is None:
                lab.timings.update({f"{name} · {k}": v for k, v in fut.result().seconds.items()})
    lab.timings[f"fault cases ({len(cases)} + reference, {WORKERS} at a time)"] = time.monotonic() - started


def test_reference_day_completes(fault_runs: FaultRuns) -> None:
    ref = fault_runs.reference.result()
    assert ref.rerun is not None and ref.snap is not None
    assert ref.rerun.returncode == 0 and ref.rerun.state == "Completed", f"{ref.rerun.state}: {ref.rerun.message}"
    lab, tables = fault_runs.lab, ref.snap.tables
    # the day's changes arrived: the warehouse holds exactly the source's transactions, less the
    # rows the quality gates quarantined (each one recorded) — nothing silently lost or kept
    with psycopg.connect(lab.source_dsn) as conn:
        source = {r[0] for r in conn.execute("SELECT event_id FROM transactions").fetchall()}
    landed = {r["event_id"] for r in tables["ops_ai.transactions"]}
    quarantined = {
        json.loads(r["row_json"])["event_id"]
        for r in tables["opsloop_meta._quarantine"]
        if r["stream"] == "transactions"
    }
    assert landed <= source, f"transactions not (or no longer) in the source: {sorted(landed - source)[:5]}"
    assert source - landed <= quarantined, (
        f"source transactions missing, not quarantined: {sorted(source - landed - quarantined)[:5]}"
    )
    template_tx = lab.template.wh().query("SELECT COUNT(*) AS n FROM ops_ai.transactions").to_pylist()[0]["n"]
    assert len(landed) > template_tx, "day 1's new transactions did not land"
    assert {r["customer_id"] for r in tables["ops_ai.customer_features"]} == {
        r["customer_id"] for r in tables["ops_ai.predictions"]
    }
    confirmed = [r for r in tables["opsloop_meta._sync_log"] if r["at"] >= ref.snap.day_started]
    assert confirmed and all(r["status"] in ("created", "updated") for r in confirmed)
    assert cursor_covers_changes(ref.snap) == []


@pytest.mark.parametrize("fault", CASES)
def test_fault_then_rerun_ends_identical(fault_runs: FaultRuns, fault: str) -> None:
    ref, case = fault_runs.get(fault)
    point, action = fault.split(":")
    assert ref.snap is not None and ref.rerun is not None and ref.rerun.returncode == 0, "the reference run failed"
    assert case.faulted is not None and case.rerun is not None and case.snap is not None
    bad = case.faulted
    if action == "kill":
        assert bad.returncode == 137 and bad.state == "", (
            f"{fault} never fired: the run ended {bad.returncode} {bad.state} {bad.message[:300]}"
        )
    else:
        assert bad.returncode == 1 and bad.state == "Failed", f"{fault}: the run ended {bad.state} {bad.message[:300]}"
        assert f"{STAGE[point]} failed: InjectedFault: injected fault at {point}" in bad.message, (
            f"{fault} did not fail at its point: {bad.message[:500]}"
        )
    rerun = case.rerun
    assert rerun.returncode == 0 and rerun.state == "Completed", (
        f"the rerun after {fault}: {rerun.state} {rerun.message}"
    )
    log = [r for r in day_log(case.snap) if r["status"] in ("created", "updated")]
    by_failed = {r["destination"] for r in log if r["at"] < case.snap.rerun_started}
    by_rerun = {r["destination"] for r in log if r["at"] >= case.snap.rerun_started}
    assert by_failed == PUSHED_BY_FAILED_RUN.get(fault, set()), f"{fault}: the failed run confirmed {by_failed}"
    assert by_rerun == SENT_BY_RERUN.get(fault, {SF, HS}), f"{fault}: the rerun pushed to {by_rerun}"
    problems = compare(ref.snap, case.snap, resend_allowed=point in RESEND_WINDOW)
    problems += cursor_covers_changes(case.snap)
    assert not problems, f"after {fault} and a rerun, {len(problems)} difference(s) from the reference:\n" + "\n".join(
        problems[:40]
    )


# -- overlap (issue 9, part 4) ----------------------------------------------------------------------
# Overlap (issue 9, part 4): a manual ``ingest`` run started while the nightly run of the same
# pipeline is in progress is held by the pipeline lease and then refused with a message naming the
# nightly run; the nightly completes and the day's CDC batch is processed exactly once.
#
# The nightly is held at a fault point with ``OPSLOOP_FAULT=<point>:pause`` (it waits for the file
# named by ``OPSLOOP_FAULT_RELEASE``). Two points:
#
# * ``after_scoring_before_merge`` — the nightly holds the lease, not the warehouse file: the manual
#   run meets the lease at once, waits ``warehouse.leaseWait`` and fails;
# * ``after_state_before_slot_advance`` — the most dangerous moment: the warehouse has the batch, the
#   replication slot does not know yet, so a second reader would get the same changes again. DuckDB's
#   file lock holds the manual run first (the nightly's ingest keeps its connection), then the lease.
#
# Deployment-level concurrency limits (a second trigger of one deployment waits for the first) are
# tested in ``tests/flows/test_prefect_yaml.py::test_targets_are_paired_and_consistent`` and
# ``tests/e2e/test_nightly_deployment.py::test_custom_run_completes_and_second_run_waits``.
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
