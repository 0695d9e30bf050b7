"""Salesforce Bulk API 2.0 ingest jobs: Open → UploadComplete → InProgress → JobComplete | Failed | Aborted.

The uploaded CSV is processed when the client sets ``UploadComplete`` (in 10,000-row batches, each
one transaction); the job then reports ``InProgress`` for ``bulk_inprogress_polls`` status reads
before ``JobComplete``. Empty cells leave a field unchanged, ``#N/A`` clears it. An unknown column
fails the whole job (``InvalidBatch : Field name not found : X``) with every row unprocessed.
Results: ``successfulResults`` (``sf__Id, sf__Created`` + columns), ``failedResults``
(``sf__Id, sf__Error`` + columns), ``unprocessedrecords`` — paths matched case-insensitively.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sandbox.app import BadRequest, Router, read_json
from sandbox.defaults import SALESFORCE
from sandbox.runtime import Sandbox
from sandbox.sf_core import FieldError, canonical_fields, write_rows
from sandbox.util import json_response, sf_error, sf_time

V = r"/services/data/v(?P<ver>\d+\.\d)"
DELIMITERS = {"COMMA": ",", "TAB": "\t", "PIPE": "|", "SEMICOLON": ";", "CARET": "^", "BACKQUOTE": "`"}
OPERATIONS = ("insert", "update", "upsert", "delete", "hardDelete")
BATCH = 10_000
MAX_UPLOAD = 150 * 1024 * 1024


def _job(sb: Sandbox, job_id: str) -> dict[str, Any]:
    info = sb.store.job_get(job_id)
    if info is None:
        raise BadRequest(sf_error(404, "NOT_FOUND", f"The requested resource does not exist: job {job_id}"))
    return info


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def _state_error(info: dict[str, Any], wanted: str) -> BadRequest:
    return BadRequest(sf_error(400, "INVALIDJOBSTATE", f"Job {info['id']} is {info['state']}; {wanted}"))


def register(r: Router) -> None:
    @r.add(SALESFORCE, "POST", V + r"/jobs/ingest", "sf.bulk_create", write=True)
    async def create(sb: Sandbox, req: Request, ver: str) -> Response:
        body = await read_json(req, SALESFORCE)
        if not isinstance(body, dict):
            raise BadRequest(sf_error(400, "JSON_PARSER_ERROR", "expected a JSON object"))
        obj = sb.canonical_object(SALESFORCE, str(body.get("object", "")))
        op = body.get("operation")
        if obj is None:
            raise BadRequest(
                sf_error(400, "INVALIDJOB", f"Entity '{body.get('object')}' is not supported by the Bulk API.")
            )
        if op not in OPERATIONS:
            raise BadRequest(sf_error(400, "INVALIDJOB", f"Invalid operation '{op}'; one of {list(OPERATIONS)}"))
        ext = body.get("externalIdFieldName")
        if op == "upsert":
            d = sb.fields(SALESFORCE, obj).get(str(ext or "").lower())
            if d is None or not (d.get("externalId") or d["name"] == "Id"):
                raise BadRequest(
                    sf_error(400, "INVALIDJOB", f"External ID field not found or not an external id: {ext}")
                )
            ext = d["name"]
        delim = body.get("columnDelimiter", "COMMA")
        ending = body.get("lineEnding", "LF")
        if delim not in DELIMITERS or ending not in ("LF", "CRLF") or body.get("contentType", "CSV") != "CSV":
            raise BadRequest(
                sf_error(
                    400,
                    "INVALIDJOB",
                    f"contentType must be CSV, lineEnding LF|CRLF and columnDelimiter one of {sorted(DELIMITERS)}",
                )
            )
        n = sb.store.next_seq("bulkjob")
        now = sf_time(sb.now_ms())
        info: dict[str, Any] = {
            "id": f"750SB{n:013d}",
            "operation": op,
            "object": obj,
            "createdById": "005SANDBOX000001",
            "createdDate": now,
            "systemModstamp": now,
            "state": "Open",
            "externalIdFieldName": ext,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": float(ver),
            "jobType": "V2Ingest",
            "contentUrl": f"services/data/v{ver}/jobs/ingest/750SB{n:013d}/batches",
            "lineEnding": ending,
            "columnDelimiter": delim,
            "numberRecordsProcessed": 0,
            "numberRecordsFailed": 0,
            "retries": 0,
            "totalProcessingTime": 0,
            "apiActiveProcessingTime": 0,
            "apexProcessingTime": 0,
            "_polls_left": 0,
        }
        sb.store.job_put(info)
        return json_response(_public(info))

    @r.add(SALESFORCE, "GET", V + r"/jobs/ingest", "sf.bulk_list")
    async def list_jobs(sb: Sandbox, req: Request, ver: str) -> Response:
        return json_response(
            {"done": True, "records": [_public(j) for j in sb.store.job_list()], "nextRecordsUrl": None}
        )

    @r.add(SALESFORCE, "PUT", V + r"/jobs/ingest/(?P<job_id>\w+)/batches", "sf.bulk_upload", write=True)
    async def upload(sb: Sandbox, req: Request, ver: str, job_id: str) -> Response:
        info = _job(sb, job_id)
        if info["state"] != "Open":
            raise _state_error(info, "data can only be uploaded to an Open job")
        if sb.store.job_blob(job_id, "upload") is not None:
            raise _state_error(info, "a job accepts one upload; create another job for more data")
        data = await req.body()
        if len(data) > MAX_UPLOAD:
            raise BadRequest(sf_error(400, "INVALIDBATCH", "upload exceeds 150 MB"))
        sb.store.job_put(info, upload=data)
        return Response(status_code=201)

    @r.add(SALESFORCE, "PATCH", V + r"/jobs/ingest/(?P<job_id>\w+)", "sf.bulk_state", write=True)
    async def set_state(sb: Sandbox, req: Request, ver: str, job_id: str) -> Response:
        info = _job(sb, job_id)
        body = await read_json(req, SALESFORCE)
        wanted = (body or {}).get("state")
        if wanted == "UploadComplete":
            if info["state"] != "Open":
                raise _state_error(info, "only an Open job can be closed")
            _process(sb, info)
        elif wanted == "Aborted":
            if info["state"] in ("JobComplete", "Failed", "Aborted"):
                raise _state_error(info, "a finished job cannot be aborted")
            if info["state"] == "Open":
                data = sb.store.job_blob(job_id, "upload") or b""
                sb.store.job_put(info, unprocessed=data)
            info["state"] = "Aborted"
        else:
            raise BadRequest(sf_error(400, "INVALIDJOBSTATE", f"unsupported state change {wanted!r}"))
        info["systemModstamp"] = sf_time(sb.now_ms())
        sb.store.job_put(info)
        return json_response(_public(info))

    @r.add(SALESFORCE, "GET", V + r"/jobs/ingest/(?P<job_id>\w+)", "sf.bulk_get")
    async def get_job(sb: Sandbox, req: Request, ver: str, job_id: str) -> Response:
        info = _job(sb, job_id)
        if info["state"] == "InProgress":
            if info["_polls_left"] > 0:
                info["_polls_left"] -= 1
            else:
                info["state"] = "JobComplete"
            sb.store.job_put(info)
        return json_response(_public(info))

    @r.add(SALESFORCE, "DELETE", V + r"/jobs/ingest/(?P<job_id>\w+)", "sf.bulk_delete", write=True)
    async def delete_job(sb: Sandbox, req: Request, ver: str, job_id: str) -> Response:
        info = _job(sb, job_id)
        if info["state"] not in ("JobComplete", "Failed", "Aborted", "UploadComplete"):
            raise _state_error(info, "only a finished job can be deleted")
        sb.store.job_delete(job_id)
        return Response(status_code=204)

    @r.add(
        SALESFORCE,
        "GET",
        V + r"/jobs/ingest/(?P<job_id>\w+)/(?P<kind>successfulResults|failedResults|"
        r"unprocessedrecords)",
        "sf.bulk_results",
        flags=re.IGNORECASE,
    )
    async def results(sb: Sandbox, req: Request, ver: str, job_id: str, kind: str) -> Response:
        _job(sb, job_id)
        blob_name = {"successfulresults": "success", "failedresults": "failed", "unprocessedrecords": "unprocessed"}
        data = sb.store.job_blob(job_id, blob_name[kind.lower()]) or b""
        return Response(
            data,
            media_type="text/csv; charset=UTF-8",
            headers={"Sforce-Locator": "null", "Sforce-NumberOfRecords": "0"},
        )


def _read_csv(data: bytes, info: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    text = data.decode("utf-8-sig")
    delimiter = DELIMITERS[info["columnDelimiter"]]
    if '"' in text or "\r" in text or "\0" in text:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = [row for row in reader if row]
    else:  # nothing quoted, LF line ends: each line splits on the delimiter exactly as csv.reader reads it
        rows = [line.split(delimiter) for line in text.split("\n") if line]
    return (rows[0], rows[1:]) if rows else ([], [])


def _write_csv(header: list[str], rows: list[list[Any]]) -> bytes:
    """Every field quoted (as csv.writer with QUOTE_ALL writes it), LF line ends."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    lines: list[str] = []
    for row in (header, *rows):
        line = '","'.join(row)
        if line.count('"') == 2 * len(row) - 2:  # no field holds a quote (and every field is text)
            lines.append('"' + line + '"\n')
        else:  # a quote to double, or an empty row: csv.writer's own form
            w.writerow(row)
            lines.append(buf.getvalue())
            buf.seek(0)
            buf.truncate()
    return "".join(lines).encode()


def _process(sb: Sandbox, info: dict[str, Any]) -> None:
    upload = sb.store.job_blob(info["id"], "upload") or b""
    header, rows = _read_csv(upload, info)
    op = info["operation"]
    if op == "hardDelete":
        op = "delete"
    try:
        if not header:
            raise FieldError("INVALIDBATCH", "InvalidBatch : no data uploaded", [])
        names = canonical_fields(sb, info["object"], header)
        if op == "upsert" and info["externalIdFieldName"] not in names.values():
            raise FieldError("INVALIDBATCH", f"InvalidBatch : Field name not found : {info['externalIdFieldName']}", [])
        if op in ("update", "delete") and "Id" not in names.values():
            raise FieldError("INVALIDBATCH", "InvalidBatch : Field name not found : Id", [])
    except FieldError as exc:
        msg = (
            str(exc)
            if str(exc).startswith("InvalidBatch")
            else f"InvalidBatch : Field name not found : {exc.fields[0] if exc.fields else '?'}"
        )
        info.update(state="Failed", errorMessage=msg, numberRecordsProcessed=0, numberRecordsFailed=0)
        sb.store.job_put(info, unprocessed=upload)
        return
    canon = [names[h] for h in header]
    width = len(canon)
    ok_rows: list[list[Any]] = []
    bad_rows: list[list[Any]] = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        shape_errors: dict[int, str] = {}
        dicts: list[dict[str, Any]] = []
        for i, row in enumerate(chunk):
            if len(row) != width:
                shape_errors[i] = f"TOO_MANY_OR_FEW_COLUMNS:wrong number of columns ({len(row)} of {width}): --"
                continue
            if "" in row or "#N/A" in row:  # empty: leave unchanged; #N/A: clear
                dicts.append({c: (None if v == "#N/A" else v) for c, v in zip(canon, row, strict=True) if v != ""})
            else:
                dicts.append(dict(zip(canon, row, strict=True)))
        results = write_rows(sb, info["object"], dicts, op, info["externalIdFieldName"]) if dicts else []
        done = iter(results)
        for i, row in enumerate(chunk):
            if shape_errors and i in shape_errors:
                bad_rows.append(["", shape_errors[i], *row])
                continue
            res = next(done)
            if res.success:
                ok_rows.append([res.id or "", "true" if res.created else "false", *row])
            else:
                errs = " ".join(
                    f"{e['statusCode']}:{e['message']}:{','.join(e.get('fields') or [])} --" for e in res.errors
                )
                bad_rows.append([res.id or "", errs, *row])
    info.update(
        state="InProgress",
        numberRecordsProcessed=len(rows),
        numberRecordsFailed=len(bad_rows),
        totalProcessingTime=len(rows) // 10,
        apiActiveProcessingTime=len(rows) // 20,
        _polls_left=int(sb.settings.get("bulk_inprogress_polls") or 0),
    )
    sb.store.job_put(
        info,
        success=_write_csv(["sf__Id", "sf__Created", *header], ok_rows),
        failed=_write_csv(["sf__Id", "sf__Error", *header], bad_rows),
        unprocessed=_write_csv(header, []),
    )
