"""Client-side pacing under HubSpot's rolling request window (the "ten-secondly" limit).

HubSpot allows an app 100–250 requests per rolling 10 s, depending on the tier (HubSpot's usage
guidelines, as the CRM wire contract quotes them). Every answer says so in ``X-HubSpot-RateLimit-Max`` and
``-Interval-Milliseconds``. A push with requests in flight on several threads can send more than
that. Retrying the 429s does deliver every record, but each 429 is an error response: HubSpot asks
that errors stay under 5 % of an app's requests. HubSpot is not documented to send ``Retry-After``,
so the retries also back off blindly (``benchmarks/crm_pacing.py`` measures both ways; figures in
docs/benchmarks.md).

:class:`WindowPacer` keeps the times of this client's own requests. Before each request it waits
until one more fits the window the last answer announced. What others had spent of the window when
the pacer started comes from the first answer's ``-Remaining``. It changes nothing until an answer
has carried both window headers (with the limit off, the sandbox sends neither). 429s caused by
other clients of the same app later on are still retried by :func:`opsloop.crm.retry.call_with_retry`.

The vendor counts a request from when it arrives, which the client cannot see: somewhere between
the moment the pacer let it go and the moment its answer came back. A request counts from the
first until it is answered, then from the second — never from earlier than the vendor could have
counted it, however long it took to leave (a new TLS connection, a busy machine, threads taking
turns) or to arrive.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

A = TypeVar("A", bound=tuple[Any, ...])

MAX_HEADER = "X-HubSpot-RateLimit-Max"
INTERVAL_HEADER = "X-HubSpot-RateLimit-Interval-Milliseconds"
REMAINING_HEADER = "X-HubSpot-RateLimit-Remaining"
# slack added to each wait, as a share of the window (the vendor's clock and its window's edges)
MARGIN_SHARE = 0.02
KEEP = 10_000  # send times kept at most (vendors' limits are in the hundreds); bounds memory with no window known


def _count(value: Any) -> int | None:
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def _positive_int(value: Any) -> int | None:
    n = _count(value)
    return n if n else None


class WindowPacer:
    """At most ``limit`` requests in any ``window`` seconds, for requests sent from any thread.

    ``limit`` and ``window`` come from the answers' headers (:meth:`observe`), or from the
    constructor. :meth:`wait` blocks, under one lock, until one more request fits. It then records
    the request, as sent now; :meth:`answered`, on the same thread, moves it to when its answer
    came. ``paced`` is the total time waited."""

    def __init__(
        self,
        limit: int | None = None,
        window: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limit = limit
        self.window = window
        self.paced = 0.0
        self._clock = clock
        self._sleep = sleep
        # when each request counts from: [time], a list so that its answer can move it
        self._sent: deque[list[float]] = deque(maxlen=KEEP)
        self._mine = threading.local()  # the request this thread sent last, until answered
        self._lock = threading.Lock()

    def observe(self, headers: Mapping[str, Any] | None) -> None:
        """Take the window from an answer's headers (both must be there and valid to count).

        The first answer that announces a window also says how much of it is spent
        (``-Remaining``): requests this pacer did not send (another client of the app, a push just
        before this one) are counted as sent now, so they are waited out instead of refused."""
        if not headers:
            return
        limit, window_ms = _positive_int(headers.get(MAX_HEADER)), _positive_int(headers.get(INTERVAL_HEADER))
        if limit is None or window_ms is None:
            return
        with self._lock:
            first = not (self.limit and self.window)
            self.limit, self.window = limit, window_ms / 1000
            left = _count(headers.get(REMAINING_HEADER))
            if first and left is not None:
                now = self._clock()
                self._trim(now)
                self._sent.extend([now] for _ in range(max(0, limit - left - len(self._sent))))

    def _span(self) -> float:
        """How long a request counts: the window plus the margin."""
        return (self.window or 0.0) * (1 + MARGIN_SHARE)

    def _trim(self, now: float) -> None:
        """Forget the requests that no longer count at ``now`` (under the lock). An answer moves a
        request's time later, so the deque is not always in time order: an old one that lasted long
        keeps younger ones in it a little longer (:meth:`_delay` does not count those)."""
        sent, oldest = self._sent, now - self._span()
        while sent and sent[0][0] <= oldest:
            sent.popleft()

    def _delay(self, now: float) -> float:
        """Seconds until one more request fits the window at ``now`` (under the lock)."""
        limit = self.limit
        if not limit or not self.window:
            return 0.0
        self._trim(now)
        oldest = now - self._span()
        counted = sorted(t for (t,) in self._sent if t > oldest)
        if len(counted) < limit:
            return 0.0
        # the request `limit` places back must leave the window first
        return max(0.0, counted[len(counted) - limit] + self._span() - now)

    def wait(self) -> float:
        """Block until one more request fits, record it as sent now, and return the seconds waited.
        Other threads queue on the lock meanwhile: they would have to wait as long anyway."""
        with self._lock:
            now = self._clock()
            pause = self._delay(now)
            if pause > 0:
                self._sleep(pause)
                self.paced += pause
                now = self._clock()
            entry = [now]
            self._sent.append(entry)  # also before a window is known: the first answer's request counts too
            self._mine.entry = entry
            return pause

    def answered(self) -> None:
        """The request this thread sent last got its answer (or failed) now: the vendor counted it
        at the latest now, so it counts from now (its own clock, read under the lock)."""
        entry = getattr(self._mine, "entry", None)
        if entry is None:
            return
        self._mine.entry = None
        with self._lock:
            entry[0] = max(entry[0], self._clock())


def paced(pacer: WindowPacer, call: Callable[[], A]) -> Callable[[], A]:
    """``call`` (a client's ``*_with_http_info`` method: data, status, headers) as one paced attempt:
    it waits until the request fits the window, then takes the window its answer announces. Pass
    the result to the retry loop, so every attempt — retries too — is paced."""

    def attempt() -> A:
        pacer.wait()
        try:
            answer = call()
        finally:
            pacer.answered()  # a refused or failed request counted too, at the latest now
        pacer.observe(answer[2])
        return answer

    return attempt
