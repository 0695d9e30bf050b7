"""Faults mid-push: 429 storms, 5xx bursts, failed bulk polls, a killed worker — every record ends
in the CRM exactly once per attempt that succeeded, and the sync state matches the CRM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from opsloop import faults
from opsloop.crm.diff import payload_hash
from opsloop.crm.retry import RetryPolicy
from opsloop.crm.synclog import SyncTables
from opsloop.errors import InjectedFault
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient
from tests.crm import helpers
from tests.crm.helpers import (
    actual_hs,
    actual_sf,
    expected_hs,
    expected_sf,
    log_counts,
    predictions,
    push,
    staged,
    sync_state,
    write_predictions,
)

REPO = Path(__file__).resolve().parents[2]


def _ok_calls(sbx: SandboxClient, route: str) -> int:
    return sum(
        1
        for e in sbx.requests(log=5000)["log"]
        if e["route"] == route and not e["injected"] and 200 <= e["status"] < 300
    )


def test_hubspot_429_storm_and_5xx_burst_deliver_every_record_once(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 3000)
    storm = {"status": "error", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING"}
    crm_sandbox.fault(
        "/batch/upsert", method="POST", status=429, body=storm, headers={"Retry-After": "0"}, count=6, skip=5
    )
    crm_sandbox.fault("/batch/upsert", method="POST", status=502, count=3, skip=15)
    crm_sandbox.fault("/batch/upsert", method="POST", status=503, count=2, skip=25)
    rep = push(wh, spec, "hubspot", crm_sandbox)
    assert rep["created"] == 3000 and rep["failed"] == 0 and rep["api_retries"] == 11
    assert _ok_calls(crm_sandbox, "hs.batch_upsert") == 30  # each batch processed exactly once
    assert actual_hs(crm_sandbox) == expected_hs(rows)
    assert log_counts(wh) == {"created": 3000}


def test_salesforce_5xx_burst_and_failed_bulk_polls(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    spec, rows = staged(wh, tmp_path, 900, bulk=1000)
    crm_sandbox.seed("salesforce", "Contact", 3000)
    crm_sandbox.fault("/composite/sobjects", method="PATCH", status=503, count=3, skip=1)
    crm_sandbox.fault("/composite/sobjects", method="PATCH", status=429, headers={"Retry-After": "0"}, count=2, skip=2)
    rep = push(wh, spec, "salesforce", crm_sandbox)
    assert rep["updated"] == 900 and _ok_calls(crm_sandbox, "sf.collections_upsert") == 5
    rows = predictions(3000, seed=2)
    write_predictions(wh, rows)
    crm_sandbox.settings(bulk_inprogress_polls=3)
    crm_sandbox.fault(r"/jobs/ingest/750\w+$", method="GET", status=503, count=2, skip=1)
    crm_sandbox.fault(r"/jobs/ingest/750\w+$", method="GET", status=429, headers={"Retry-After": "0"}, count=1, skip=1)
    rep = push(wh, spec, "salesforce", crm_sandbox, run_id="run-2")
    assert rep["updated"] == 3000 and rep["failed"] == 0
    jobs = crm_sandbox.jobs()
    assert len(jobs) == 1 and jobs[0]["state"] == "JobComplete"  # a failed poll never aborts the job
    assert actual_sf(crm_sandbox) == expected_sf(rows)


@pytest.mark.slow
def test_push_paces_itself_under_the_rate_window(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    """8 requests per rolling 1 s window, 429s without Retry-After (HubSpot is not documented to send
    it): the push keeps under the window its answers announce, so it is never refused."""
    spec, rows = staged(wh, tmp_path, 2000)
    crm_sandbox.rate_limit(8, window_ms=1000, retry_after=False)
    started = time.monotonic()
    rep = push(wh, spec, "hubspot", crm_sandbox)
    took = time.monotonic() - started
    statuses = crm_sandbox.requests()["hubspot"]["status"]
    assert rep["created"] == 2000 and rep["failed"] == 0
    assert statuses.get("429", 0) == 0 and rep["api_retries"] == 0  # unpaced: 429s and blind backoff
    assert rep["api_calls"] >= 21  # the properties read (+ creates) and 20 batches
    assert took >= (rep["api_calls"] / 8 - 1) * 1.0 and rep["api_paced_s"] > 0
    assert actual_hs(crm_sandbox) == expected_hs(rows)


@pytest.mark.slow
def test_a_request_that_arrives_late_does_not_push_the_next_ones_over_the_window(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient
) -> None:
    """The CRM counts a request when it arrives. The first batch reaches the window 0.3 s after the
    pacer let it go (a new TLS connection, a busy machine): it counts until 0.3 s later than its
    send, so the requests that would fill its place a window after the send must wait for its answer's
    time instead, or the CRM refuses one."""
    spec, rows = staged(wh, tmp_path, 1500)
    crm_sandbox.rate_limit(8, window_ms=1000, retry_after=False)
    crm_sandbox.fault("/batch/upsert", method="POST", delay=0.3, count=1)
    rep = push(wh, spec, "hubspot", crm_sandbox)
    statuses = crm_sandbox.requests()["hubspot"]["status"]
    assert rep["created"] == 1500 and rep["failed"] == 0
    assert statuses.get("429", 0) == 0 and rep["api_retries"] == 0
    assert actual_hs(crm_sandbox) == expected_hs(rows)


@pytest.mark.parametrize("spent", [8, 6])
def test_a_window_another_client_spent_is_waited_out(
    spent: int, wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient, hs_client: Any
) -> None:
    """Another client of the same app spent the window (8 of 8), or most of it (6 of 8), before the
    push. All spent: the push's first call is refused and waits the Retry-After. Partly spent: the
    first answer's X-HubSpot-RateLimit-Remaining tells the pacer, and nothing is refused."""
    spec, rows = staged(wh, tmp_path, 300)
    crm_sandbox.rate_limit(8, window_ms=2000, retry_after=True)
    for _ in range(spent):
        hs_client.crm.contacts.basic_api.get_page(limit=1)
    helpers_policy = RetryPolicy(max_attempts=10, base_delay=0.05, retry_after_cap=15)
    old, helpers.FAST = helpers.FAST, helpers_policy
    try:
        started = time.monotonic()
        rep = push(wh, spec, "hubspot", crm_sandbox)
    finally:
        helpers.FAST = old
    refused = crm_sandbox.requests()["hubspot"]["status"].get("429", 0)
    assert rep["created"] == 300 and rep["failed"] == 0
    assert time.monotonic() - started >= 1.0  # waited for the window instead of hammering
    if spent == 8:
        assert rep["api_retries"] >= 1 and refused == rep["api_retries"]  # each refusal waited out, then retried
    else:
        assert refused == 0 and rep["api_retries"] == 0 and rep["api_paced_s"] > 0
    assert actual_hs(crm_sandbox) == expected_hs(rows)


def _consistent(wh: DuckDBAdapter, sbx: SandboxClient, rows: list[dict], crm: str) -> None:
    dest = "salesforce.Contact" if crm == "salesforce" else "hubspot.contacts"
    state = sync_state(wh, dest)
    exp = expected_sf(rows) if crm == "salesforce" else expected_hs(rows)
    got = actual_sf(sbx) if crm == "salesforce" else actual_hs(sbx)
    assert got == exp
    assert set(state) == set(exp)
    names = (
        ["AI_Churn_Risk__c", "AI_Next_Action__c", "AI_Risk_Bucket__c", "AI_Scored_At__c"]
        if crm == "salesforce"
        else ["ai_churn_risk", "ai_next_action", "ai_risk_bucket", "ai_scored_at"]
    )
    for r in rows:
        payload = dict(
            zip(
                names,
                (
                    r["predicted_churn_risk"],
                    r["next_best_action"],
                    r["risk_bucket"],
                    r["scored_at"].strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                ),
                strict=True,
            )
        )
        assert state[r["customer_id"]] == payload_hash(payload)


def _child(wh: DuckDBAdapter, tmp_path: Path, crm: str, sbx: SandboxClient, fault: str, flush: int) -> int:
    env = {**os.environ, "OPSLOOP_FAULT": fault, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.crm.push_child",
            wh.path,
            str(tmp_path / "crm_test.yaml"),
            crm,
            sbx.url,
            "killed-run",
            str(flush),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("crm", ["hubspot", "salesforce"])
def test_killed_mid_push_then_rerun_is_exact(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient, crm: str
) -> None:
    spec, rows = staged(wh, tmp_path, 1000, bulk=100_000)  # Salesforce via Collections: 200 per call
    crm_sandbox.seed("salesforce", "Contact", 1000)
    chunk = 100 if crm == "hubspot" else 200
    assert _child(wh, tmp_path, crm, crm_sandbox, "mid_crm_push:kill:4", flush=2 * chunk) == 137
    flushed = len(sync_state(wh, f"{'salesforce.Contact' if crm == 'salesforce' else 'hubspot.contacts'}"))
    # chunks 1-2 were handed to the background flush, which the kill at the 4th chunk may have cut
    # short (then nothing of it committed); chunks 3-4 reached the CRM and their state never did
    assert flushed in (0, 2 * chunk)
    rep = push(wh, spec, crm, crm_sandbox, run_id="rerun")
    assert rep["candidates"] == 1000 - flushed and rep["failed"] == 0
    _consistent(wh, crm_sandbox, rows, crm)


@pytest.mark.slow
def test_killed_after_push_before_sync_state(wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient) -> None:
    spec, rows = staged(wh, tmp_path, 600)
    assert _child(wh, tmp_path, "hubspot", crm_sandbox, "after_push_before_sync_state:kill:2", flush=200) == 137
    assert len(sync_state(wh, "hubspot.contacts")) == 200
    assert log_counts(wh, "killed-run") == {"created": 400}  # the log row of a push always lands first
    rep = push(wh, spec, "hubspot", crm_sandbox, run_id="rerun")
    # the 400 unconfirmed records are pushed again: the 200 logged ones update, and so may those the
    # push sent while that flush ran on the background thread (up to a buffer of flush_rows, plus
    # the requests in flight: here all of the other 200); none is created twice
    assert rep["candidates"] == 400 and rep["updated"] + rep["created"] == 400
    assert rep["updated"] >= 200
    _consistent(wh, crm_sandbox, rows, "hubspot")


def test_injected_error_mid_push_flushes_what_landed(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, rows = staged(wh, tmp_path, 500)
    monkeypatch.setenv("OPSLOOP_FAULT", "mid_crm_push:raise:3")
    with pytest.raises(InjectedFault):
        push(wh, spec, "hubspot", crm_sandbox)
    monkeypatch.delenv("OPSLOOP_FAULT")
    faults.reset()
    assert len(sync_state(wh, "hubspot.contacts")) == 300  # confirmed results were flushed on the way out
    rep = push(wh, spec, "hubspot", crm_sandbox, run_id="rerun")
    assert rep["candidates"] == 200
    _consistent(wh, crm_sandbox, rows, "hubspot")
    runs = wh.query("SELECT status FROM opsloop_meta._sync_runs ORDER BY started_at").to_pylist()
    assert [r["status"] for r in runs] == ["failed", "completed"]


def test_background_flush_failure_stops_the_push_and_nothing_is_lost(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, rows = staged(wh, tmp_path, 800)
    threads: list[str] = []
    flush = SyncTables.flush

    def spy(self: SyncTables, *a: Any, **k: Any) -> Any:
        threads.append(threading.current_thread().name)
        return flush(self, *a, **k)

    monkeypatch.setattr(SyncTables, "flush", spy)
    # the 2nd flush (records 101-200, on the background thread) dies after its log rows
    monkeypatch.setenv("OPSLOOP_FAULT", "after_push_before_sync_state:raise:2")
    with pytest.raises(InjectedFault):
        push(wh, spec, "hubspot", crm_sandbox, flush_rows=100)
    monkeypatch.delenv("OPSLOOP_FAULT")
    faults.reset()
    assert threads[0].startswith("sync-flush") and threads[1].startswith("sync-flush")
    assert threads[-1] == "MainThread"  # what was buffered when the push stopped: flushed on the way out
    state = len(sync_state(wh, "hubspot.contacts"))
    assert 100 <= state <= 800 - 100  # the failed flush's 100 records are not confirmed
    runs = wh.query("SELECT status, note FROM opsloop_meta._sync_runs").to_pylist()
    assert [r["status"] for r in runs] == ["failed"] and "after_push_before_sync_state" in runs[0]["note"]
    rep = push(wh, spec, "hubspot", crm_sandbox, run_id="rerun", flush_rows=100)
    assert rep["candidates"] == 800 - state and rep["failed"] == 0
    _consistent(wh, crm_sandbox, rows, "hubspot")


def test_flushes_shrink_toward_the_end_and_run_on_one_duckdb_thread_beside_the_push(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full buffers go to the background flush, fewer records toward the end, so the flush the push
    waits for after its last answer is small; background flushes run DuckDB on one thread (the HTTP
    threads and the CRM need the cores), the last one — nothing else running — on all of them."""
    from opsloop.crm import runner

    spec, rows = staged(wh, tmp_path, 1000)
    monkeypatch.setattr(runner, "TAIL_FLUSH_ROWS", 100)
    seen: list[tuple[str, int, int]] = []
    flush = SyncTables.flush

    def spy(self: SyncTables, results: Any, *a: Any, **k: Any) -> Any:
        with self.wh.connect() as con:  # type: ignore[attr-defined]
            (threads,) = con.execute("SELECT current_setting('threads')").fetchone()
        seen.append((threading.current_thread().name, sum(len(r) for r in results), int(threads)))
        return flush(self, results, *a, **k)

    monkeypatch.setattr(SyncTables, "flush", spy)
    rep = push(wh, spec, "hubspot", crm_sandbox, flush_rows=400)
    assert rep["pushed"] == 1000 and rep["failed"] == 0
    background = [(n, t) for name, n, t in seen if name.startswith("sync-flush")]
    last = seen[-1]
    # a full buffer at 400; then each time the buffer holds as many as are still to come (300 at
    # 700, 200 at 900); the last 100 are recorded after the last answer, on the pushing thread
    assert background == [(400, 1), (300, 1), (200, 1)]
    assert last[0] == "MainThread" and last[1] == 100 and last[2] > 1
    assert sum(n for _, n, _ in seen) == 1000
    with wh.connect() as con:  # the file's own thread count is back once the push is over
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] > 1
    _consistent(wh, crm_sandbox, rows, "hubspot")


def test_the_first_flush_near_the_end_checkpoints_in_the_background_once(
    wh: DuckDBAdapter, tmp_path: Path, crm_sandbox: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first background flush with at most SETTLE_ROWS records still to push writes the WAL into
    the file on the flusher's thread (the push's last requests go on meanwhile), so the checkpoint
    when the session closes after the last answer has only the rest to write. Once per push."""
    from opsloop.crm import runner

    spec, rows = staged(wh, tmp_path, 1000)
    monkeypatch.setattr(runner, "TAIL_FLUSH_ROWS", 100)
    monkeypatch.setattr(runner, "SETTLE_ROWS", 300)
    wal = Path(wh.path + ".wal")
    flushed: list[int] = []
    settled: list[tuple[str, int, int, int]] = []
    flush, checkpoint = SyncTables.flush, SyncTables.checkpoint

    def spy_flush(self: SyncTables, results: Any, *a: Any, **k: Any) -> Any:
        flushed.append(sum(len(r) for r in results))
        return flush(self, results, *a, **k)

    def spy_checkpoint(self: SyncTables) -> None:
        before = wal.stat().st_size if wal.exists() else 0
        checkpoint(self)
        after = wal.stat().st_size if wal.exists() else 0
        settled.append((threading.current_thread().name, sum(flushed), before, after))

    monkeypatch.setattr(SyncTables, "flush", spy_flush)
    monkeypatch.setattr(SyncTables, "checkpoint", spy_checkpoint)
    rep = push(wh, spec, "hubspot", crm_sandbox, flush_rows=400)
    assert rep["pushed"] == 1000 and rep["failed"] == 0
    assert flushed == [400, 300, 200, 100]
    # hand-offs at 400 (600 to go), 700 (300 to go: the first within SETTLE_ROWS) and 900 (100 to go)
    assert len(settled) == 1
    name, recorded, before, after = settled[0]
    assert name.startswith("sync-flush") and recorded == 700
    assert before > 0 and after == 0  # the WAL held the flushes; the checkpoint wrote them into the file
    _consistent(wh, crm_sandbox, rows, "hubspot")
