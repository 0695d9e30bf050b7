"""Salesforce sink: sObject Collections upsert (≤ 200 per call) below ``sync.bulkThreshold``,
Bulk API 2.0 ingest jobs at or above it.

Bulk jobs are driven through the REST endpoints directly (not simple-salesforce's ``bulk2``
helper, which shuffles CSV columns, writes ``None`` as "leave unchanged", formats datetimes with a
space and aborts the whole job on one failed status poll): explicit column order, ``#N/A`` to
clear a field, ISO timestamps, every call (polls included) retried on its own, and the
successful / failed / unprocessed result CSVs parsed back to one result per record.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from opsloop.crm.base import (
    FieldSpec,
    PushRecord,
    RecordResult,
    SchemaCheck,
    SinkBase,
    chunked,
)
from opsloop.crm.clients import classify_salesforce
from opsloop.crm.retry import RetryPolicy, call_with_retry
from opsloop.errors import TerminalError, TransientError

T = TypeVar("T")
COLLECTION_SIZE = 200
BULK_CALLS_PER_JOB = 7  # create, upload, close, ~2 polls, successful + failed results
_USAGE_RE = re.compile(r"api-usage=(\d+)/(\d+)")
_SF_TYPES = {
    "number": "Number(18, 6)",
    "string": "Text(255)",
    "enumeration": "Picklist or Text(255)",
    "datetime": "Date/Time",
    "bool": "Checkbox",
}


def _csv_value(value: Any) -> str:
    if value is None or value == "":
        return "#N/A"  # Bulk 2.0: empty = leave unchanged, #N/A = set null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class SalesforceSink(SinkBase):
    vendor = "Salesforce"

    def __init__(
        self,
        sf: Any,
        block: str,
        obj: str,
        external_id_field: str,
        *,
        bulk_threshold: int = 2000,
        bulk_job_rows: int = 100_000,
        policy: RetryPolicy | None = None,
        poll_interval: float = 0.2,
        poll_max_interval: float = 5.0,
        job_timeout: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(block, obj, external_id_field, policy)
        self.sf = sf
        self.classify = classify_salesforce(sf.session)
        self.bulk_threshold = bulk_threshold
        self.bulk_job_rows = bulk_job_rows
        self.poll_interval = poll_interval
        self.poll_max_interval = poll_max_interval
        self.job_timeout = job_timeout
        self.sleep = sleep
        self.columns: list[str] = []
        self.jobs: list[str] = []

    # -- plumbing ------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], what: str) -> T:
        self.reserve(1)
        try:
            return call_with_retry(
                fn,
                self.classify,
                what=what,
                block=self.block,
                vendor=self.vendor,
                policy=self.policy,
                stats=self.stats,
                sleep=self.sleep,
            )
        finally:
            m = _USAGE_RE.search(str(getattr(self.sf.session, "last_headers", {}).get("Sforce-Limit-Info", "")))
            if m:
                self.budget.used, self.budget.limit = int(m.group(1)), int(m.group(2))

    def _raw(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        """A request simple-salesforce has no helper for (CSV upload / CSV results)."""
        from simple_salesforce.util import exception_handler

        resp = self.sf.session.request(
            method, self.sf.base_url + path, headers={**self.sf.headers, **kwargs.pop("headers", {})}, **kwargs
        )
        if resp.status_code >= 300:
            exception_handler(resp, name=path)
        if resp.status_code != expect:
            raise TerminalError(
                f"{self.block}: Salesforce {method} {path} answered {resp.status_code}, expected {expect}"
            )
        return resp

    # -- schema --------------------------------------------------------------------------------
    def ensure_schema(self, fields: list[FieldSpec], values: dict[str, set[str]], create: bool) -> SchemaCheck:
        """Check the object has every mapped field and an External ID upsert key. Salesforce fields
        are an admin's job: missing ones are reported with the exact names (TerminalError unless
        ``create`` is False, i.e. a dry run)."""
        self.columns = [f.crm_name for f in fields]
        desc = self._call(lambda: self.sf.restful(f"sobjects/{self.object}/describe/"), f"describe {self.object}")
        have = {f["name"].lower(): f for f in desc["fields"]}
        check = SchemaCheck()
        ext = have.get(self.external_id_field.lower())
        if ext is None or not (ext.get("externalId") or ext.get("idLookup")):
            check.missing.append(self.external_id_field)
            check.instructions.append(f"{self.object}.{self.external_id_field}: Text(255), External ID, Unique")
        for f in fields:
            d = have.get(f.crm_name.lower())
            if d is None:
                check.missing.append(f.crm_name)
                check.instructions.append(f"{self.object}.{f.crm_name}: {_SF_TYPES[f.kind]}")
            elif d.get("restrictedPicklist"):
                allowed = {p["value"] for p in d.get("picklistValues", [])}
                extra = sorted(values.get(f.column, set()) - allowed)
                if extra:
                    check.missing.append(f"{f.crm_name} picklist values {extra}")
                    check.instructions.append(f"{self.object}.{f.crm_name}: add picklist values {extra}")
        if check.missing and create:
            raise TerminalError(
                f"{self.block}: Salesforce {self.object} is missing field(s) {', '.join(check.missing)} — ask an "
                f"admin to create: {'; '.join(check.instructions)} (or fix the destination's fieldMap)"
            )
        return check

    # -- push ----------------------------------------------------------------------------------
    def plan_calls(self, n: int) -> int:
        if n <= 0:
            return 0
        if n >= self.bulk_threshold:
            return math.ceil(n / self.bulk_job_rows) * BULK_CALLS_PER_JOB
        return math.ceil(n / COLLECTION_SIZE)

    def push(self, records: Iterable[PushRecord], total: int) -> Iterator[list[RecordResult]]:
        if total >= self.bulk_threshold:
            for job in chunked(records, self.bulk_job_rows):
                self.reserve(BULK_CALLS_PER_JOB)
                yield self._bulk_job(job)
        else:
            for chunk in chunked(records, COLLECTION_SIZE):
                yield self._collection(chunk)

    def _collection(self, chunk: list[PushRecord]) -> list[RecordResult]:
        ext = self.external_id_field
        body = {
            "allOrNone": False,
            "records": [{"attributes": {"type": self.object}, **r.payload, ext: r.external_id} for r in chunk],
        }
        path = f"composite/sobjects/{self.object}/{ext}"
        out = self._call(
            lambda: self.sf.restful(path, method="PATCH", json=body),
            f"collections upsert {self.object} ({len(chunk)} records)",
        )
        if not isinstance(out, list) or len(out) != len(chunk):
            raise TerminalError(
                f"{self.block}: Salesforce collections upsert returned {type(out).__name__} of "
                f"{len(out) if isinstance(out, list) else '?'} items for {len(chunk)} records"
            )
        results = []
        for rec, item in zip(chunk, out, strict=True):
            if item.get("success"):
                status = "created" if item.get("created") else "updated"
                results.append(RecordResult(rec, status, item.get("id"), api="collections"))
            else:
                err = (item.get("errors") or [{}])[0]
                results.append(
                    RecordResult(
                        rec,
                        "failed",
                        item.get("id"),
                        str(err.get("statusCode", "UNKNOWN")),
                        str(err.get("message", ""))[:1000],
                        api="collections",
                    )
                )
        return results

    def _bulk_job(self, job_rows: list[PushRecord]) -> list[RecordResult]:
        ext = self.external_id_field
        cols = [c for c in self.columns if c.lower() != ext.lower()]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([ext, *cols])
        for r in job_rows:
            w.writerow([r.external_id, *(_csv_value(r.payload.get(c)) for c in cols)])
        data = buf.getvalue().encode("utf-8")
        spec = {
            "object": self.object,
            "operation": "upsert",
            "externalIdFieldName": ext,
            "contentType": "CSV",
            "columnDelimiter": "COMMA",
            "lineEnding": "LF",
        }
        job = self._call(lambda: self.sf.restful("jobs/ingest", method="POST", json=spec), "create bulk job")
        job_id = str(job["id"])
        self.jobs.append(job_id)
        self._call(
            lambda: self._raw(
                "PUT",
                f"jobs/ingest/{job_id}/batches",
                201,
                data=data,
                headers={"Content-Type": "text/csv; charset=UTF-8", "Accept": "application/json"},
            ),
            f"upload bulk job {job_id} ({len(job_rows)} rows)",
        )
        self._call(
            lambda: self.sf.restful(f"jobs/ingest/{job_id}", method="PATCH", json={"state": "UploadComplete"}),
            f"close bulk job {job_id}",
        )
        info = self._wait(job_id)
        by_ext = {r.external_id.lower(): r for r in job_rows}
        done: dict[str, RecordResult] = {}
        if info["state"] != "JobComplete":
            msg = str(info.get("errorMessage") or info["state"])
            return [RecordResult(r, "failed", None, "BULK_JOB_" + info["state"].upper(), msg, "bulk") for r in job_rows]
        for row in self._results(job_id, "successfulResults"):
            rec = by_ext.get(row.get(ext, "").lower())
            if rec is not None:
                status = "created" if row.get("sf__Created", "").lower() == "true" else "updated"
                done[rec.external_id.lower()] = RecordResult(rec, status, row.get("sf__Id") or None, api="bulk")
        if int(info.get("numberRecordsFailed") or 0):
            for row in self._results(job_id, "failedResults"):
                rec = by_ext.get(row.get(ext, "").lower())
                if rec is not None:
                    code, _, msg = str(row.get("sf__Error", "")).partition(":")
                    done[rec.external_id.lower()] = RecordResult(
                        rec, "failed", row.get("sf__Id") or None, code or "UNKNOWN", msg.rstrip(" -")[:1000], "bulk"
                    )
        if int(info.get("numberRecordsProcessed") or 0) < len(job_rows):
            for row in self._results(job_id, "unprocessedrecords"):
                rec = by_ext.get(row.get(ext, "").lower())
                if rec is not None:
                    done[rec.external_id.lower()] = RecordResult(
                        rec, "failed", None, "UNPROCESSED", f"not processed by bulk job {job_id}", "bulk"
                    )
        return [
            done.get(r.external_id.lower())
            or RecordResult(r, "failed", None, "MISSING_RESULT", f"no result row in bulk job {job_id}", "bulk")
            for r in job_rows
        ]

    def _wait(self, job_id: str) -> dict[str, Any]:
        started = time.monotonic()
        interval = self.poll_interval
        while True:
            info = self._call(lambda: self.sf.restful(f"jobs/ingest/{job_id}"), f"poll bulk job {job_id}")
            if info["state"] in ("JobComplete", "Failed", "Aborted"):
                return dict(info)
            if time.monotonic() - started > self.job_timeout:
                with contextlib.suppress(Exception):
                    self._call(
                        lambda: self.sf.restful(f"jobs/ingest/{job_id}", method="PATCH", json={"state": "Aborted"}),
                        f"abort bulk job {job_id}",
                    )
                raise TransientError(
                    f"{self.block}: Salesforce bulk job {job_id} still {info['state']} after "
                    f"{self.job_timeout:.0f}s; aborted, rerun to push the rest"
                )
            self.sleep(interval)
            interval = min(self.poll_max_interval, interval * 1.5)

    def _results(self, job_id: str, kind: str) -> Iterator[dict[str, str]]:
        resp = self._call(
            lambda: self._raw(
                "GET", f"jobs/ingest/{job_id}/{kind}/", 200, headers={"Accept": "text/csv; charset=UTF-8"}
            ),
            f"{kind} of bulk job {job_id}",
        )
        yield from csv.DictReader(io.StringIO(resp.content.decode("utf-8-sig"), newline=""))
