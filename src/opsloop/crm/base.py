"""The CRM sink protocol and its value types.

A sink pushes already-mapped payloads keyed by an external id, a batch at a time: it receives the
staged candidates as Arrow tables (``external_id``, one ``f:<crm field>`` column per mapped field,
…) and reports one :class:`BatchResult` per request or job — the rows it attempted and, aligned
with them, the status / CRM id / error of each. Per-record rejections (a 207 item, a Bulk
``failedResults`` row) are data, not exceptions; request-level errors raise Terminal/TransientError
(via :mod:`opsloop.crm.retry`). A sink never spends more API calls than its ``call_budget``: when
the next request would exceed it, it raises :class:`BudgetCapReached` *before* sending, so the
runner can stop cleanly and leave the rest for the next run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import pyarrow as pa

from opsloop.crm.pacing import WindowPacer
from opsloop.crm.retry import RetryPolicy, RetryStats, call_with_retry

T = TypeVar("T")
FieldKind = Literal["number", "enumeration", "string", "datetime", "bool"]


class BudgetCapReached(Exception):
    """The next call would exceed the sink's ``call_budget`` (sync.apiBudgetShare)."""


@dataclass(frozen=True)
class FieldSpec:
    """One mapped column: prediction column → CRM field, with the kind the CRM field should have."""

    column: str
    crm_name: str
    kind: FieldKind
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PushRecord:
    """One entity's payload (used for the few rows the review queue holds back)."""

    entity: str
    external_id: str
    payload: dict[str, Any]
    payload_hash: str
    attempt: int = 1
    bucket: str | None = None


Outcome: TypeAlias = "list[str | None] | pa.Array"  # per row: a list, or an Arrow string array (big jobs)


@dataclass
class BatchResult:
    """The outcome of one request / job: ``rows`` (the staged candidate rows attempted, in order)
    and, aligned with them, ``status`` (created | updated | failed), CRM id and vendor error —
    each a list, or an Arrow string array (a Bulk job's hundred thousand rows, built column-wise)."""

    rows: pa.Table
    status: Outcome
    crm_id: Outcome
    error_code: Outcome
    error_message: Outcome
    api: str = ""

    def __len__(self) -> int:
        return int(self.rows.num_rows)

    def arrays(self) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
        """(status, crm_id, error_code, error_message) as Arrow string arrays."""
        return outcome_arrays([self])

    @classmethod
    def failed(cls, rows: pa.Table, code: str, message: str, api: str) -> BatchResult:
        n = rows.num_rows
        return cls(rows, ["failed"] * n, [None] * n, [code] * n, [message] * n, api)


OUTCOMES = ("status", "crm_id", "error_code", "error_message")


def _outcome_array(values: Outcome) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(values, pa.string())


def outcome_arrays(results: Iterable[BatchResult]) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """(status, crm_id, error_code, error_message) of ``results``, concatenated in order, as Arrow
    string arrays. Outcomes held as lists (one request's) are joined first and converted once:
    a flush of a thousand 100-record requests makes four arrays, not four thousand."""
    parts: list[list[pa.Array]] = [[], [], [], []]
    pending: list[list[str | None]] = [[], [], [], []]
    for r in results:
        for i, name in enumerate(OUTCOMES):
            values = getattr(r, name)
            if isinstance(values, list):
                pending[i] += values
                continue
            if pending[i]:
                parts[i].append(pa.array(pending[i], pa.string()))
                pending[i] = []
            parts[i].append(_outcome_array(values))
    out = []
    for i in range(4):
        if pending[i] or not parts[i]:
            parts[i].append(pa.array(pending[i], pa.string()))
        out.append(parts[i][0] if len(parts[i]) == 1 else pa.concat_arrays(parts[i]))
    return out[0], out[1], out[2], out[3]


@dataclass
class Budget:
    """What the CRM told us about its daily allocation (None = unknown)."""

    used: int | None = None
    limit: int | None = None

    @property
    def left(self) -> int | None:
        if self.used is None or self.limit is None:
            return None
        return max(0, self.limit - self.used)


@dataclass
class SchemaCheck:
    """Result of checking the destination's fields: what exists, what was created, what is missing."""

    missing: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)


class CrmSink(Protocol):
    vendor: str
    object: str
    external_id_field: str
    stats: RetryStats
    budget: Budget
    pacer: WindowPacer
    call_budget: int | None

    def ensure_schema(self, fields: list[FieldSpec], values: dict[str, set[str]], create: bool) -> SchemaCheck: ...

    def plan_calls(self, n: int) -> int: ...

    def push(self, tables: Iterable[pa.Table], total: int) -> Iterator[BatchResult]: ...


class SinkBase:
    """Shared plumbing: call counting against ``call_budget`` and value formatting."""

    vendor = ""
    pipeline_depth = 3  # requests in flight in :meth:`pipelined`

    def __init__(self, block: str, obj: str, external_id_field: str, policy: RetryPolicy | None = None) -> None:
        self.block = block
        self.object = obj
        self.external_id_field = external_id_field
        self.policy = policy or RetryPolicy()
        self.stats = RetryStats()
        self.budget = Budget()
        self.pacer = WindowPacer()  # idle until a vendor announces a request window (HubSpot does)
        self.call_budget: int | None = None
        self.sleep: Callable[[float], None] = time.sleep  # backoff waits (tests pass a fake clock)

    def pipelined(
        self,
        chunks: Iterable[pa.Table],
        build: Callable[[pa.Table], Any],
        send: Callable[[pa.Table, Any], Any],
        parse: Callable[[pa.Table, Any], BatchResult],
        depth: int | None = None,
    ) -> Iterator[BatchResult]:
        """Push ``chunks`` with up to ``depth`` (default :attr:`pipeline_depth`) requests in flight,
        handing back one :class:`BatchResult` per chunk strictly in chunk order.

        ``send`` (the HTTP call with its retries and budget check) runs on worker threads; ``build``
        and ``parse`` run here, so the CRM works on request k+1 while this thread parses the answer
        to k (and the caller records it) and builds k+2. Every call in flight is waited for before
        this generator ends — on success, on an error (the first failed request's exception is
        raised, in order, after the results before it were handed back) and when the consumer stops
        early — so no request outlives the push.

        Safety: each request is an upsert by external id, i.e. idempotent. A crash (or a stop)
        can leave up to ``depth`` requests that reached the CRM but whose answers were never handed
        back (on top of results the caller received and had not flushed to the sync log yet); their
        records are not marked confirmed, so the next run's diff selects them again and re-pushes
        the same values — a second, harmless upsert. ``depth=1`` sends a request only after the
        previous one's results were handed back (nothing unrecorded beyond the one in flight). The
        call budget is checked atomically per call (:meth:`claim_call`), so concurrent requests
        never exceed it; a request refused for the budget raises :class:`BudgetCapReached` in its
        turn, after every earlier request's results."""
        depth = max(1, int(depth or self.pipeline_depth))
        it = iter(chunks)
        pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix=f"{self.vendor.lower()}-push")
        flight: deque[tuple[pa.Table, Future[Any]]] = deque()
        try:
            chunk = next(it, None)
            body = build(chunk) if chunk is not None else None
            while chunk is not None or flight:
                while chunk is not None and len(flight) < depth:
                    flight.append((chunk, pool.submit(send, chunk, body)))
                    chunk = next(it, None)
                    body = build(chunk) if chunk is not None else None
                done, fut = flight.popleft()
                answer = fut.result()
                yield parse(done, answer)
        finally:
            for _, fut in flight:
                fut.cancel()  # not started yet: never sent
            pool.shutdown(wait=True)

    def counted_call(self, fn: Callable[[], T], classify: Callable[[BaseException], Any], what: str) -> T:
        """``fn()`` as one API call: claimed against the call budget (:meth:`claim_call`), then retried
        under the sink's policy (:func:`~opsloop.crm.retry.call_with_retry`), sleeping with ``self.sleep``."""
        self.claim_call()
        return call_with_retry(
            fn,
            classify,
            what=what,
            block=self.block,
            vendor=self.vendor,
            policy=self.policy,
            stats=self.stats,
            sleep=self.sleep,
            counted=True,
        )

    def claim_call(self) -> None:
        """Check one more call against the call budget and count it, atomically (requests may be
        sent from several threads); pass ``counted=True`` to ``call_with_retry`` afterwards."""
        with self.stats.lock:
            self.reserve(1)
            self.stats.calls += 1

    def reserve(self, calls: int) -> None:
        """Raise BudgetCapReached if ``calls`` more requests would exceed the call budget."""
        if self.call_budget is not None and self.stats.calls + calls > self.call_budget:
            raise BudgetCapReached(
                f"{self.block}: {calls} more call(s) would exceed the run's API budget of {self.call_budget}"
            )


def iso_z(value: datetime | date) -> str:
    """``2026-01-02T03:04:05.000Z`` (UTC) — the form both CRMs document."""
    if isinstance(value, datetime):
        value = value.astimezone(UTC) if value.tzinfo is not None else value
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return value.isoformat()


def rechunk(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Re-slice a stream of tables into tables of exactly ``size`` rows (the last may be shorter)."""
    pending: list[pa.Table] = []
    have = 0
    for t in tables:
        pending.append(t)
        have += t.num_rows
        if have < size:
            continue
        whole = pa.concat_tables(pending).combine_chunks()
        start = 0
        while have - start >= size:
            yield whole.slice(start, size)
            start += size
        pending = [whole.slice(start)] if start < have else []
        have -= start
    if have:
        yield pa.concat_tables(pending).combine_chunks()
