"""Shared machinery of the CRM sources (Salesforce, HubSpot): typed pages → Arrow, watermark per object.

A CRM object lands with its fields lower-cased, the vendor id in the stream's first primary-key
column (default ``id``), the vendor's modification stamp in the source's watermark column (default
``updated_at``) and ``_deleted`` for records the vendor reports as deleted/archived. Every vendor
call goes through the one retry policy (:func:`opsloop.crm.retry.call_with_retry`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import pyarrow as pa

from opsloop.crm.retry import DEFAULT_POLICY, RetryPolicy, RetryStats, VendorFailure, call_with_retry
from opsloop.errors import ConfigError
from opsloop.sources.base import DELETED_COL, LoadRequest, Position, Sink
from opsloop.spec import PipelineSpec, SourceSpec, TableSpec
from opsloop.transform.pyvalues import max_time

T = TypeVar("T")
TS = pa.timestamp("us", tz="UTC")


def parse_time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _convert(value: Any, typ: pa.DataType) -> Any:
    if value is None or value == "":
        return None
    if typ == TS:
        return parse_time(value)
    if pa.types.is_date(typ):
        return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
    if pa.types.is_boolean(typ):
        return value if isinstance(value, bool) else str(value).lower() == "true"
    if pa.types.is_integer(typ):
        return int(float(value))
    if pa.types.is_floating(typ):
        return float(value)
    return value if isinstance(value, str) else str(value)


def rows_to_batch(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """Plain dict rows (already renamed) → one typed batch; values that do not convert name the field."""
    arrays = []
    for f in schema:
        try:
            values = [_convert(r.get(f.name), f.type) for r in rows]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"field {f.name!r}: a value does not convert to {f.type}: {exc}") from None
        arrays.append(pa.array(values, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@dataclass
class ObjectSchema:
    """The Arrow schema of one CRM object and how vendor names map to it."""

    fields: list[str]  # vendor field names to request
    schema: pa.Schema  # output columns (key, watermark, fields…, _deleted)
    rename: dict[str, str] = field(default_factory=dict)  # vendor name → column


class CrmSource:
    """Base of the vendor sources: one load per object, watermark = max modification stamp seen."""

    vendor = "crm"

    def __init__(
        self,
        spec: PipelineSpec,
        source: SourceSpec,
        client: Any,
        block: str,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.spec = spec
        self.source = source
        self.client = client
        self.block = block
        self.policy = policy
        self.stats = RetryStats()

    # -- vendor hooks ----------------------------------------------------------------------------
    def classify(self, exc: BaseException) -> VendorFailure | None:
        raise NotImplementedError

    def describe(self, table: TableSpec) -> list[tuple[str, pa.DataType]]:
        """(vendor field name, Arrow type) of the object's readable fields."""
        raise NotImplementedError

    def pages(self, table: TableSpec, obj: ObjectSchema, start: datetime | None) -> Iterator[list[dict[str, Any]]]:
        """Pages of records (changed and deleted) as dicts keyed by vendor field names, plus the
        reserved keys ``__id``, ``__stamp`` and ``__deleted``."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retry(
            fn, self.classify, what=what, block=self.block, vendor=self.vendor, policy=self.policy, stats=self.stats
        )

    def key_column(self, table: TableSpec) -> str:
        return table.primary_key[0] if table.primary_key else "id"

    def stamp_column(self, table: TableSpec) -> str:
        return self.source.watermark_field(table) or "updated_at"

    def object_schema(self, table: TableSpec) -> ObjectSchema:
        key, stamp = self.key_column(table), self.stamp_column(table)
        described = self.describe(table)
        if table.columns:
            by_name = {n.lower(): (n, t) for n, t in described}
            unknown = [c for c in table.columns if c.lower() not in by_name]
            if unknown:
                raise ConfigError(f"sources[{self.source.id}].{table.name}: unknown {self.vendor} field(s) {unknown}")
            described = [by_name[c.lower()] for c in table.columns]
        fields: list[pa.Field] = [pa.field(key, pa.string()), pa.field(stamp, TS)]
        rename, names = {}, [key, stamp]
        for name, typ in described:
            col = name.lower()
            if col in names or col in (DELETED_COL,):
                continue
            rename[name] = col
            names.append(col)
            fields.append(pa.field(col, typ))
        fields.append(pa.field(DELETED_COL, pa.bool_()))
        return ObjectSchema([n for n, _ in described], pa.schema(fields), rename)

    def run(self, sink: Sink, full_refresh: bool = False, since: datetime | None = None) -> dict[str, Any]:
        for table in self.source.objects:
            self._object(table, sink, full_refresh, since)
        return {"mode": "watermark", "api_calls": self.stats.calls, "api_retries": self.stats.retries}

    def _object(self, table: TableSpec, sink: Sink, full_refresh: bool, since: datetime | None) -> None:
        obj = self.object_schema(table)
        state = None if full_refresh else sink.state(table.name)
        before: datetime | None = state.get("watermark") if state else None
        lag: timedelta = self.source.sync.lag
        start = since or (before - lag if before is not None else None)
        key, stamp = self.key_column(table), self.stamp_column(table)
        top: dict[str, datetime | None] = {"value": before}

        def batches() -> Iterator[pa.RecordBatch]:
            for page in self.pages(table, obj, start):
                rows = []
                for rec in page:
                    row = {obj.rename.get(k, k): v for k, v in rec.items() if not k.startswith("__")}
                    row[key], row[stamp], row[DELETED_COL] = rec["__id"], rec["__stamp"], bool(rec.get("__deleted"))
                    rows.append(row)
                batch = rows_to_batch(rows, obj.schema)
                seen = max_time(batch.column(stamp))
                if seen is not None and (top["value"] is None or seen > top["value"]):
                    top["value"] = seen
                yield batch

        sink.load(
            LoadRequest(
                table,
                obj.schema,
                batches(),
                position=lambda: Position(watermark=top["value"]),
                replace=full_refresh,
                kind="incremental" if start is not None else "full",
                position_before=Position(watermark=before),
                keys=(key,),
            )
        )


def crm_reader(spec: PipelineSpec, source: SourceSpec, block: Any) -> CrmSource:
    """The vendor source for a ``type: crm`` source, on the client its credentials block builds."""
    if not hasattr(block, "get_client"):
        raise ConfigError(f"sources[{source.id}].connection: {source.connection!r} is not a CRM credentials block")
    ref = str(getattr(block, "ref", source.connection))
    if source.vendor == "salesforce":
        from opsloop.sources.salesforce import SalesforceSource

        return SalesforceSource(spec, source, block.get_client(), ref)
    if source.vendor == "hubspot":
        from opsloop.sources.hubspot import HubSpotSource

        return HubSpotSource(spec, source, block.get_client(), ref)
    raise ConfigError(f"sources[{source.id}].vendor: {source.vendor!r} is not a CRM vendor")
