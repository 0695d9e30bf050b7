"""Salesforce source (simple-salesforce): SOQL by ``SystemModstamp ≥ watermark − lag`` over queryAll.

``queryAll`` returns changed *and* deleted records (``IsDeleted = true``, kept in the recycle bin
for 15 days), so deletes reach the target in the same pass. Pages are driven one by one
(``query`` then ``query_more(nextRecordsUrl)``, what ``query_all_iter`` does inside one generator)
so each page call is retried on its own under the shared retry policy. ``≥`` (floored to the second,
SOQL's literal precision) re-reads the boundary; the MERGE keeps those rows single.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from opsloop.crm.clients import classify_salesforce
from opsloop.crm.retry import VendorFailure
from opsloop.sources.crm import TS, CrmSource, ObjectSchema
from opsloop.spec import TableSpec

SKIP_TYPES = {"address", "location", "base64", "anyType", "complexvalue"}
SYSTEM = ("Id", "SystemModstamp", "IsDeleted")


def arrow_type(sf_type: str) -> pa.DataType:
    if sf_type in ("double", "currency", "percent"):
        return pa.float64()
    if sf_type in ("int", "long"):
        return pa.int64()
    if sf_type == "boolean":
        return pa.bool_()
    if sf_type == "date":
        return pa.date32()
    if sf_type == "datetime":
        return TS
    return pa.string()


class SalesforceSource(CrmSource):
    vendor = "Salesforce"

    def classify(self, exc: BaseException) -> VendorFailure | None:
        return classify_salesforce(getattr(self.client, "session", None))(exc)

    def describe(self, table: TableSpec) -> list[tuple[str, pa.DataType]]:
        sobject = getattr(self.client, table.name)
        desc: dict[str, Any] = self.call(sobject.describe, f"describe {table.name}")
        return [
            (f["name"], arrow_type(f["type"]))
            for f in desc.get("fields", [])
            if f.get("type") not in SKIP_TYPES and f["name"] not in SYSTEM
        ]

    def soql(self, table: TableSpec, obj: ObjectSchema, start: datetime | None) -> str:
        fields = ", ".join([*SYSTEM, *obj.fields])
        where = ""
        if start is not None:  # SOQL datetime literals have second precision: floor, then ≥
            where = f" WHERE SystemModstamp >= {start.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
        return f"SELECT {fields} FROM {table.name}{where} ORDER BY SystemModstamp ASC"

    def pages(self, table: TableSpec, obj: ObjectSchema, start: datetime | None) -> Iterator[list[dict[str, Any]]]:
        sf = self.client
        q = self.soql(table, obj, start)
        page: dict[str, Any] = self.call(lambda: sf.query(q, include_deleted=True), f"queryAll {table.name}")
        while True:
            yield [self._row(r) for r in page.get("records", [])]
            nxt = page.get("nextRecordsUrl")
            if page.get("done", True) or not nxt:
                return
            page = self.call(self._more(nxt), f"queryAll {table.name} (next page)")

    def _more(self, url: str) -> Callable[[], dict[str, Any]]:
        return lambda: self.client.query_more(url, identifier_is_url=True, include_deleted=True)  # type: ignore[no-any-return]

    @staticmethod
    def _row(rec: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in rec.items() if k not in ("attributes", *SYSTEM)}
        row["__id"] = rec.get("Id")
        row["__stamp"] = rec.get("SystemModstamp")
        row["__deleted"] = bool(rec.get("IsDeleted"))
        return row
