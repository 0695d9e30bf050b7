"""Every fault point of the nightly loop, end to end (Postgres CDC → DuckDB → MLflow → CRM sandbox).

A reference copy of the day-0 pipeline runs day 1 without a fault. For each point (``raise``, and
``kill`` = the worker dies where a crash hurts most) another copy runs day 1 with the fault — it
must fail (or die) at that point — and then again without it; the result must be identical to the
reference: every warehouse table opsloop writes, the CRM records' AI fields, the sync log and sync
state (``tests/faults/compare.py`` says what identical means per table). Points and outcomes:
``docs/reliability.md#fault-points``.

The copies run two at a time (``OPSLOOP_FAULT_WORKERS``, default 2) in a thread pool started by the
``fault_runs`` fixture; each test waits for its own copy and judges it. Timings are printed at the
end of the session (and written to ``<test home>/fault-timings.json``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
import pytest

from opsloop import faults
from tests.faults.compare import compare, cursor_covers_changes, day_log
from tests.faults.conftest import Lab
from tests.faults.lab import Case, _context, run_case

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
WORKERS = int(os.environ.get("OPSLOOP_FAULT_WORKERS", "2"))
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
