"""WindowPacer: at most `limit` requests in any rolling window, learnt from HubSpot's headers."""

from __future__ import annotations

import threading
import time

import pytest

from opsloop.crm.pacing import INTERVAL_HEADER, MARGIN_SHARE, MAX_HEADER, REMAINING_HEADER, WindowPacer, paced


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _pacer(clock: FakeClock) -> WindowPacer:
    return WindowPacer(clock=clock, sleep=clock.sleep)


def test_without_a_window_it_never_waits() -> None:
    clock = FakeClock()
    pacer = _pacer(clock)
    pacer.observe({"X-HubSpot-RateLimit-Daily": "250000"})  # no window headers: nothing to keep to
    assert [pacer.wait() for _ in range(500)] == [0.0] * 500
    assert clock.slept == [] and pacer.paced == 0.0


def test_the_request_after_the_limit_waits_for_the_oldest_to_leave_the_window() -> None:
    clock = FakeClock()
    pacer = _pacer(clock)
    pacer.wait()  # the first request goes out before any answer announced the window: it still counts
    pacer.observe({MAX_HEADER: "3", INTERVAL_HEADER: "10000"})
    assert (pacer.limit, pacer.window) == (3, 10.0)
    clock.now += 1.0
    assert pacer.wait() == 0.0
    clock.now += 1.0
    assert pacer.wait() == 0.0  # three in the window now (at 100, 101, 102)
    clock.now += 1.0
    waited = pacer.wait()  # the fourth, at 103: the one sent at 100 must leave first
    assert abs(waited - (100 + 10 * (1 + MARGIN_SHARE) - 103)) < 1e-9
    assert abs(pacer.paced - waited) < 1e-9
    t4 = clock.now
    waited = pacer.wait()  # the fifth: now the one sent at 101 must leave
    assert abs(clock.now - (101 + 10 * (1 + MARGIN_SHARE))) < 1e-9 and waited > 0
    assert clock.now > t4
    clock.now += 60
    assert pacer.wait() == 0.0  # a quiet minute: the window is empty again


def test_a_request_counts_for_the_window_plus_the_margin() -> None:
    """Just past one window after the oldest send, that one still counts (the margin: the vendor's
    clock and the edges of its window)."""
    clock = FakeClock()
    pacer = WindowPacer(limit=3, window=10.0, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        pacer.wait()  # all at 100
    clock.now = 100 + 10 + 10 * MARGIN_SHARE / 2
    assert pacer.wait() > 0 and abs(clock.now - (100 + 10 * (1 + MARGIN_SHARE))) < 1e-9


def test_requests_others_spent_before_the_first_answer_are_waited_out() -> None:
    clock = FakeClock()
    pacer = _pacer(clock)
    pacer.wait()  # ours, at 100
    clock.now += 0.5
    # the answer to it: 5 per 10 s, 1 left, so 3 requests in the window are not ours
    pacer.observe({MAX_HEADER: "5", INTERVAL_HEADER: "10000", REMAINING_HEADER: "1"})
    assert pacer.wait() == 0.0  # the last free place
    waited = pacer.wait()  # the window is full: ours from 100 leaves first
    assert abs(clock.now - (100 + 10 * (1 + MARGIN_SHARE))) < 1e-9 and waited > 0
    # later answers do not add to it (the pacer's own count is the better one from then on)
    pacer.observe({MAX_HEADER: "5", INTERVAL_HEADER: "10000", REMAINING_HEADER: "0"})
    assert pacer.wait() > 0 and abs(clock.now - (100.5 + 10 * (1 + MARGIN_SHARE))) < 1e-9


def test_bad_or_partial_headers_are_ignored_and_a_new_window_replaces_the_old() -> None:
    clock = FakeClock()
    pacer = _pacer(clock)
    for headers in (
        {MAX_HEADER: "100"},
        {INTERVAL_HEADER: "10000"},
        {MAX_HEADER: "0", INTERVAL_HEADER: "10000"},
        {MAX_HEADER: "many", INTERVAL_HEADER: "10000"},
        {MAX_HEADER: "100", INTERVAL_HEADER: "-5"},
        None,
    ):
        pacer.observe(headers)
        assert (pacer.limit, pacer.window) == (None, None), headers
    pacer.observe({MAX_HEADER: "190", INTERVAL_HEADER: "10000"})
    pacer.observe({MAX_HEADER: "2", INTERVAL_HEADER: "500"})  # e.g. another tier's limits
    assert (pacer.limit, pacer.window) == (2, 0.5)
    pacer.wait()
    pacer.wait()
    assert pacer.wait() > 0.49


def test_threads_sending_at_once_never_exceed_the_window() -> None:
    """Real threads, real clock and sleep: 4 senders, 40 requests, at most 5 in any 0.2 s."""
    local = threading.local()

    def clock() -> float:
        local.last = time.monotonic()  # the reading wait() records its request at is its last one
        return local.last

    pacer = WindowPacer(limit=5, window=0.2, clock=clock)
    sent: list[float] = []
    lock = threading.Lock()

    def sender() -> None:
        for _ in range(10):
            pacer.wait()
            with lock:
                sent.append(local.last)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == 40
    sent.sort()
    gaps = [sent[i + 5] - sent[i] for i in range(len(sent) - 5)]
    assert min(gaps) >= 0.2, min(gaps)  # the sixth request of any six came a whole window after the first
    assert sent[-1] - sent[0] >= (40 / 5 - 1) * 0.2
    assert pacer.paced > 0


def test_an_answered_request_counts_from_its_answer() -> None:
    """The vendor counted it when it arrived, at the latest when its answer came: a request that took
    4 s to be answered still counts 10 s after that, not 10 s after it was let go."""
    clock = FakeClock()
    pacer = WindowPacer(limit=1, window=10.0, clock=clock, sleep=clock.sleep)
    pacer.wait()  # let go at 100
    clock.now = 104.0
    pacer.answered()
    clock.now = 111.0  # past 100 + the window, not past 104 + the window
    assert pacer.wait() > 0 and abs(clock.now - (104 + 10 * (1 + MARGIN_SHARE))) < 1e-9
    pacer.answered()  # at once this time
    clock.now = 104 + 2 * 10 * (1 + MARGIN_SHARE)
    assert pacer.wait() == 0.0


def test_a_paced_call_that_fails_counts_from_when_it_failed() -> None:
    """A refused or broken request may have been counted too: :func:`paced` moves it to when the
    call raised, and the next request waits for that, not for the send."""
    clock = FakeClock()
    pacer = WindowPacer(limit=1, window=10.0, clock=clock, sleep=clock.sleep)

    def refused() -> tuple[None, int, dict[str, str]]:
        clock.now += 3.0  # 3 s on the way, then refused
        raise ConnectionError("reset")

    with pytest.raises(ConnectionError):
        paced(pacer, refused)()
    clock.now = 111.0
    assert pacer.wait() > 0 and abs(clock.now - (103 + 10 * (1 + MARGIN_SHARE))) < 1e-9


def test_threads_answers_move_only_their_own_request() -> None:
    """Each thread's answer moves the request that thread sent, not another thread's."""
    clock = FakeClock()
    pacer = WindowPacer(limit=2, window=10.0, clock=clock, sleep=clock.sleep)
    other = threading.Thread(target=pacer.wait)
    other.start()
    other.join()  # another thread's request, at 100, never answered here
    pacer.wait()  # ours, at 100
    clock.now = 105.0
    pacer.answered()  # ours counts from 105 now; the other thread's still from 100
    clock.now = 111.0
    assert pacer.wait() == 0.0  # the other thread's request left the window at 110.2
    assert pacer.wait() > 0 and abs(clock.now - (105 + 10 * (1 + MARGIN_SHARE))) < 1e-9
