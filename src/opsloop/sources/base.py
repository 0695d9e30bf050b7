"""What a source hands the loader: one :class:`LoadRequest` per MERGE (a table, or a CDC batch of it).

Sources never touch the warehouse directly. They read their committed position through
:meth:`Sink.state` and call :meth:`Sink.load`, which runs dedup → gates → PII → stage → MERGE
and commits the new position in the same warehouse transaction. A source that must act on its
side after a commit (the CDC slot advance) does so only after ``load`` returned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import pyarrow as pa

from opsloop.spec import TableSpec

# columns a source may add for the loader; never stored unless listed in LoadRequest.keep_meta
LSN_COL, SEQ_COL, DELETED_COL, UNCHANGED_COL = "_lsn", "_seq", "_deleted", "_unchanged"


@dataclass(frozen=True)
class Position:
    """Where a stream's incremental read stands after a load (committed with the data)."""

    watermark: datetime | None = None
    cursor: str | None = None
    extra: dict[str, Any] | None = None

    def extra_json(self) -> str | None:
        return json.dumps(self.extra, sort_keys=True, default=str) if self.extra else None


@dataclass
class LoadRequest:
    """One MERGE into the stream's target.

    * ``batches`` is consumed once, lazily (bounded memory); ``position`` is called after it is
      exhausted, so a watermark source can report the maximum it saw;
    * ``order_by`` / ``tiebreak`` override the destination's ordering (CDC orders by ``_lsn``);
    * ``replace``: the target is dropped first (initial snapshot / full resync);
    * ``kind``: ``snapshot`` | ``incremental`` | ``full`` (row-count history compares like with like).
    """

    table: TableSpec
    schema: pa.Schema
    batches: Iterable[pa.RecordBatch]
    position: Callable[[], Position]
    order_by: tuple[str, ...] | None = None
    tiebreak: str | None = None
    replace: bool = False
    kind: str = "incremental"
    position_before: Position | None = None
    keys: tuple[str, ...] | None = None
    unique: bool = False  # keys unique by construction (a primary key read by COPY): no dedup needed
    notes: list[str] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return self.table.name


@dataclass
class LoadResult:
    stream: str
    rows_read: int = 0
    rows_quarantined: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    seconds: float = 0.0
    quarantined_by_rule: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Sink(Protocol):
    """The loader side, as seen by a source."""

    def state(self, stream: str) -> dict[str, Any] | None:
        """The committed ``_opsloop_state`` row of ``<source>.<stream>`` (None before the first load)."""
        ...

    def load(self, request: LoadRequest) -> LoadResult: ...

    def delete_missing(
        self,
        table: TableSpec,
        key_schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        keys: tuple[str, ...] | None = None,
    ) -> int:
        """Delete (or flag) target rows whose keys are not among ``batches``; returns the count."""
        ...

    def note(self, stream: str, text: str) -> None:
        """A line for the run report (slot lag warning, skipped deletes …)."""
        ...

    def settle(self) -> None:
        """Housekeeping of what is already committed (DuckDB: its checkpoint), for a source to call
        while it waits on its own server; never needed for correctness."""
        ...


def parse_extra(state: dict[str, Any] | None) -> dict[str, Any]:
    if not state or not state.get("extra"):
        return {}
    try:
        value = json.loads(state["extra"])
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
