"""Named fault points for crash/rerun tests.

Set ``OPSLOOP_FAULT`` to ``<point>`` or ``<point>:<action>[:<n>]`` where action is ``raise``
(default) or ``kill`` (``os._exit(137)``, as if the worker was preempted) and ``n`` is the
number of times the point must be passed before it fires (default 1 = the first time).
Only tests set it; production never does, and an unknown point name is harmless.
"""

from __future__ import annotations

import os

from opsloop.errors import InjectedFault

ENV_VAR = "OPSLOOP_FAULT"
_hits: dict[str, int] = {}

POINTS = (
    "after_extract",
    "after_stage_load",
    "mid_merge",
    "after_merge_before_state",
    "after_scoring_before_merge",
    "mid_crm_push",
    "after_push_before_sync_state",
    "during_cost_write",
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
    raise InjectedFault(f"injected fault at {point}")


def reset() -> None:
    """Forget how often each point was passed (tests call this between runs)."""
    _hits.clear()
