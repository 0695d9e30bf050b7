"""The CRM sink protocol and its value types.

A sink pushes already-mapped payloads (CRM field name → value) keyed by an external id and
reports one :class:`RecordResult` per record. Per-record rejections (a 207 item, a Bulk
``failedResults`` row) are data, not exceptions; request-level errors raise Terminal/TransientError
(via :mod:`opsloop.crm.retry`). A sink never spends more API calls than its ``call_budget``: when
the next request would exceed it, it raises :class:`BudgetCapReached` *before* sending, so the
runner can stop cleanly and leave the rest for the next run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, Protocol

from opsloop.crm.retry import RetryPolicy, RetryStats

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
    entity: str
    external_id: str
    payload: dict[str, Any]
    payload_hash: str
    attempt: int = 1
    bucket: str | None = None
    pending_retry: bool = False  # a _sync_retry row exists for this entity
    payload_json: str = ""  # the canonical JSON the hash was computed from (if known)


@dataclass
class RecordResult:
    record: PushRecord
    status: str  # created | updated | failed
    crm_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    api: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


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
    call_budget: int | None

    def ensure_schema(self, fields: list[FieldSpec], values: dict[str, set[str]], create: bool) -> SchemaCheck: ...

    def plan_calls(self, n: int) -> int: ...

    def push(self, records: Iterable[PushRecord], total: int) -> Iterator[list[RecordResult]]: ...


class SinkBase:
    """Shared plumbing: call counting against ``call_budget`` and value formatting."""

    vendor = ""

    def __init__(self, block: str, obj: str, external_id_field: str, policy: RetryPolicy | None = None) -> None:
        self.block = block
        self.object = obj
        self.external_id_field = external_id_field
        self.policy = policy or RetryPolicy()
        self.stats = RetryStats()
        self.budget = Budget()
        self.call_budget: int | None = None

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


def chunked(items: Iterable[PushRecord], size: int) -> Iterator[list[PushRecord]]:
    chunk: list[PushRecord] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
