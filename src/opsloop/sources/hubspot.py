"""HubSpot source (hubspot-api-client): CRM search by ``hs_lastmodifieddate ≥ watermark − lag``.

200 records per page, sorted by ``hs_lastmodifieddate`` ascending. A search can page through at
most 10,000 results; when a window reaches that cap the next window starts at the last
modification stamp seen (≥, so records sharing that stamp are read again and the MERGE keeps them
single) — a window that cannot move forward (more than 10,000 records with one stamp) is an error,
not a silent gap. Archived (deleted) records come from the objects list with ``archived=true``.
Searches are throttled to the documented 5 requests per second, and every call (properties,
search and archived pages, retries included) is paced under the app's rolling window as its answers
announce it (:mod:`opsloop.crm.pacing`, as the push does); 429s (with ``Retry-After``) and 5xx go
through the shared retry policy, since the client retries neither POSTs nor 429s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar

import pyarrow as pa

from opsloop.crm.clients import classify_hubspot, hubspot_timeout
from opsloop.crm.pacing import WindowPacer, paced
from opsloop.crm.retry import DEFAULT_POLICY, RetryPolicy, VendorFailure
from opsloop.errors import TerminalError
from opsloop.sources.crm import TS, CrmSource, ObjectSchema, parse_time
from opsloop.spec import PipelineSpec, SourceSpec, TableSpec

T = TypeVar("T")
PAGE = 200
CAP = 10_000
STAMP = "hs_lastmodifieddate"


def arrow_type(hs_type: str) -> pa.DataType:
    return {"number": pa.float64(), "bool": pa.bool_(), "datetime": TS, "date": pa.date32()}.get(hs_type, pa.string())


class HubSpotSource(CrmSource):
    vendor = "HubSpot"

    def __init__(
        self,
        spec: PipelineSpec,
        source: SourceSpec,
        client: Any,
        block: str,
        policy: RetryPolicy = DEFAULT_POLICY,
        searches_per_second: float = 5.0,
    ) -> None:
        super().__init__(spec, source, client, block, policy)
        self.min_interval = 1.0 / searches_per_second if searches_per_second > 0 else 0.0
        self._last_search = 0.0
        self.windows = 0
        self.pacer = WindowPacer()  # idle until an answer announces the app's request window
        self._search_api = client.crm.objects.search_api  # build API objects once (each access = new pool)
        self._basic_api = client.crm.objects.basic_api
        self._props_api = client.crm.properties.core_api

    def classify(self, exc: BaseException) -> VendorFailure | None:
        return classify_hubspot(exc)

    def paced_call(self, fn: Callable[[], tuple[T, int, Any]], what: str) -> T:
        """Call a ``*_with_http_info`` method under the rolling window, with retries; return the data."""
        data, _status, _headers = self.call(paced(self.pacer, fn), what)
        return data

    def describe(self, table: TableSpec) -> list[tuple[str, pa.DataType]]:
        res = self.paced_call(
            lambda: self._props_api.get_all_with_http_info(table.name, _request_timeout=hubspot_timeout(self.client)),
            f"properties of {table.name}",
        )
        return [(p.name, arrow_type(p.type)) for p in res.results if p.name not in (STAMP, "hs_object_id")]

    def _throttle(self) -> None:
        wait = self._last_search + self.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_search = time.monotonic()

    def _search(self, table: TableSpec, props: list[str], start_ms: int | None, after: int) -> Any:
        from hubspot.crm.objects import PublicObjectSearchRequest

        groups = [{"filters": [{"propertyName": STAMP, "operator": "GTE", "value": str(start_ms)}]}] if start_ms else []
        req = PublicObjectSearchRequest(
            filter_groups=groups,
            sorts=[{"propertyName": STAMP, "direction": "ASCENDING"}],
            properties=props,
            limit=PAGE,
            after=str(after) if after else None,
        )
        self._throttle()
        return self.paced_call(
            lambda: self._search_api.do_search_with_http_info(
                table.name, public_object_search_request=req, _request_timeout=hubspot_timeout(self.client)
            ),
            f"search {table.name}",
        )

    def pages(self, table: TableSpec, obj: ObjectSchema, start: datetime | None) -> Iterator[list[dict[str, Any]]]:
        props = [*obj.fields, STAMP]
        window = int(start.timestamp() * 1000) if start is not None else None
        while True:
            self.windows += 1
            after, last = 0, None
            while True:
                res = self._search(table, props, window, after)
                rows = [self._row(r) for r in res.results or []]
                if rows:
                    last = max(r["__stamp"] for r in rows if r["__stamp"] is not None)
                    yield rows
                nxt = res.paging.next.after if res.paging and res.paging.next else None
                if nxt is None:
                    break
                after = int(nxt)
                if after + PAGE > CAP:  # the next page would pass the 10,000-result cap: new window
                    break
            if nxt is None:
                break
            new_window = int(last.timestamp() * 1000) if last else None
            if new_window is None or (window is not None and new_window <= window):
                raise TerminalError(
                    f"{self.block}: more than {CAP} {table.name} share {STAMP} {last}; the search cannot page "
                    "past them — narrow the object or contact HubSpot support"
                )
            window = new_window
        if start is not None:
            yield from self._archived(table, start)

    def _archived(self, table: TableSpec, start: datetime) -> Iterator[list[dict[str, Any]]]:
        after: str | None = None
        while True:
            res = self.paced_call(self._archived_page(table, after), f"archived {table.name}")
            rows = []
            for r in res.results or []:
                when = parse_time(getattr(r, "archived_at", None) or r.updated_at)
                if when is not None and when >= start:
                    rows.append({"__id": r.id, "__stamp": when, "__deleted": True})
            if rows:
                yield rows
            after = res.paging.next.after if res.paging and res.paging.next else None
            if after is None:
                return

    def _archived_page(self, table: TableSpec, after: str | None) -> Callable[[], tuple[Any, int, Any]]:
        timeout = hubspot_timeout(self.client)
        return lambda: self._basic_api.get_page_with_http_info(
            table.name, limit=100, after=after, archived=True, _request_timeout=timeout
        )

    @staticmethod
    def _row(rec: Any) -> dict[str, Any]:
        props = dict(rec.properties or {})
        row = {k: v for k, v in props.items() if k not in (STAMP, "hs_object_id")}
        row["__id"] = rec.id
        row["__stamp"] = parse_time(props.get(STAMP)) or parse_time(rec.updated_at)
        row["__deleted"] = bool(getattr(rec, "archived", False))
        return row


__all__ = ["DEFAULT_POLICY", "HubSpotSource"]
