"""Named fault points for crash/rerun tests.

Set ``OPSLOOP_FAULT`` to ``<point>`` or ``<point>:<action>[:<n>]`` where action is ``raise``
(default), ``kill`` (``os._exit(137)``, as if the worker was preempted) or ``pause`` (block until
the file named by ``OPSLOOP_FAULT_RELEASE`` exists, after creating ``<that file>.reached``: lets an
overlap test act while a run sits at a known point) and ``n`` is the number of times the point must
be passed before it fires (default 1 = the first time).
Only tests set it; production never does, and an unknown point name is harmless.
The points, where they are and what a rerun must show: ``docs/reliability.md#fault-points``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from opsloop.errors import InjectedFault

ENV_VAR = "OPSLOOP_FAULT"
RELEASE_VAR = "OPSLOOP_FAULT_RELEASE"
PAUSE_TIMEOUT = 600.0
_hits: dict[str, int] = {}

POINTS = (
    "after_extract",  # ingest: the source is read, the staging load not finished
    "after_stage_load",  # ingest / scoring: staging table loaded, target untouched
    "mid_merge",  # ingest: a chunk's MERGE + position committed, the run's next chunk/table not yet
    "after_merge_before_state",  # inside the MERGE transaction, before the position and the commit
    "after_state_before_slot_advance",  # CDC: every table committed up to the batch end, slot not advanced
    "after_scoring_before_merge",  # scoring: predictions computed and spilled, predictions MERGE not run
    "mid_crm_push",  # sync: after the n-th batch the CRM confirmed, results not yet flushed
    "after_push_before_sync_state",  # sync: the log rows of a flush appended, sync state not merged
    "during_cost_write",  # report: before a cost-ledger row / a chunk of KPI rows is upserted
)


def checkpoint(point: str) -> None:
    """Fire the configured fault if ``point`` matches ``OPSLOOP_FAULT``; otherwise do nothing."""
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    action, _, count = rest.partition(":")
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != int(count or 1):
        return
    if action == "kill":
        os._exit(137)
    if action == "pause":
        _pause(point)
        return
    raise InjectedFault(f"injected fault at {point}")


def _pause(point: str) -> None:
    release = Path(os.environ.get(RELEASE_VAR) or "")
    if not release.name:
        raise InjectedFault(f"pause at {point}: set {RELEASE_VAR} to the file that releases it")
    Path(f"{release}.reached").write_text(f"{point} pid {os.getpid()}\n")
    deadline = time.monotonic() + PAUSE_TIMEOUT
    while not release.exists():
        if time.monotonic() > deadline:
            raise InjectedFault(f"pause at {point}: {release} did not appear within {PAUSE_TIMEOUT:.0f} s")
        time.sleep(0.05)


def reset() -> None:
    """Forget how often each point was passed (tests call this between runs)."""
    _hits.clear()
