"""One retry policy for every CRM call (Salesforce and HubSpot alike).

Neither vendor client retries a POST or a 429 by itself (see docs/crm-wire-contract.md), so every
call the sinks and sources make goes through :func:`call_with_retry`:

* 429, 5xx and connection errors / timeouts are retried with capped exponential backoff; a
  ``Retry-After`` header is honoured (capped at ``retry_after_cap``);
* 400 / 401 / 403 / 404 / 409 are terminal and raised at once with the vendor's message;
* a spent daily budget (Salesforce 403 ``REQUEST_LIMIT_EXCEEDED``, HubSpot 429 ``DAILY``) is a
  :class:`CrmBudgetExhausted` — terminal, because waiting seconds will not refill a daily quota;
* every error raised names the block, the vendor call and the vendor's code and message.

Vendor exceptions are classified by a ``classify`` callable from :mod:`opsloop.crm.clients`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from opsloop.errors import TerminalError, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")


class CrmBudgetExhausted(TerminalError):
    """The CRM's daily API allocation is spent; the push stops and resumes on the next run."""


@dataclass(frozen=True)
class VendorFailure:
    """A vendor error, classified: ``transient`` ones are retried."""

    transient: bool
    status: int | None
    code: str
    message: str
    retry_after: float | None = None
    budget: bool = False

    def describe(self) -> str:
        status = f"HTTP {self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}".strip()


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter; ``Retry-After`` wins when the server sends it."""

    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    retry_after_cap: float = 60.0
    max_total_seconds: float = 600.0
    jitter: float = 0.2

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.retry_after_cap))
        backoff = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return backoff * (1 + self.jitter * random.random())  # noqa: S311 - jitter, not crypto


DEFAULT_POLICY = RetryPolicy()


@dataclass
class RetryStats:
    """How many calls were made and how many of them were retries (for the run report).

    Updated under ``lock`` by :func:`call_with_retry`, so calls made on several threads (a sink
    with requests in flight on worker threads) are all counted."""

    calls: int = 0
    retries: int = 0
    slept: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def call_with_retry(
    fn: Callable[[], T],
    classify: Callable[[BaseException], VendorFailure | None],
    *,
    what: str,
    block: str,
    vendor: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    stats: RetryStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
    counted: bool = False,
) -> T:
    """Call ``fn`` until it succeeds, a terminal error occurs or the policy gives up.

    ``classify`` returns None for exceptions that are not vendor errors (they propagate as-is).
    ``counted``: the caller already counted the first attempt in ``stats.calls`` (when it checked
    its call budget — see ``SinkBase.claim_call``); retries are counted here.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        if stats is not None and not (counted and attempt == 1):
            with stats.lock:
                stats.calls += 1
        try:
            return fn()
        except (TerminalError, TransientError):
            raise
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            where = f"{block}: {vendor} {what}"
            if failure.budget:
                raise CrmBudgetExhausted(f"{where}: daily API budget exhausted — {failure.describe()}") from exc
            if not failure.transient:
                raise TerminalError(f"{where} failed: {failure.describe()}") from exc
            wait = policy.delay(attempt, failure.retry_after)
            if attempt >= policy.max_attempts or time.monotonic() - started + wait > policy.max_total_seconds:
                raise TransientError(f"{where} still failing after {attempt} attempt(s): {failure.describe()}") from exc
            log.warning("%s: %s — retry %d in %.2fs", where, failure.describe(), attempt, wait)
            if stats is not None:
                with stats.lock:
                    stats.retries += 1
                    stats.slept += wait
            sleep(wait)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (an HTTP date is treated as 'unknown' → backoff)."""
    if value is None or value == "":
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
