"""A loopback BigQuery REST endpoint that records what the real client sends and answers with
recorded job resources (tests/support/bq_recorded_jobs.json).

It shows what no emulator returns: job labels, ``maximumBytesBilled``, the load job config, the
job ids, bytes billed / slot ms / dml stats — and lets a test inject API errors. It speaks:
jobs.insert (query), multipart and resumable uploads (load), jobs.get, jobs.getQueryResults,
datasets insert/get and tables insert/get/patch/delete. DDL and loads update a small table
registry (so ``get_table`` answers like BigQuery after a CREATE TABLE or a load); query results
come from ``results`` (regex on the SQL → rows), everything else returns no rows.
"""

from __future__ import annotations

import copy
import io
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pyarrow.parquet as pq
import sqlglot
from sqlglot import exp

RECORDED = json.loads((Path(__file__).with_name("bq_recorded_jobs.json")).read_text())
# the columns of opsloop's INFORMATION_SCHEMA.JOBS history query, as BigQuery's schema of its result
JOB_HISTORY_FIELDS = [
    {"name": n, "type": t}
    for n, t in (
        ("flow_run_id", "STRING"),
        ("task", "STRING"),
        ("jobs", "INTEGER"),
        ("bytes_processed", "INTEGER"),
        ("bytes_billed", "INTEGER"),
        ("slot_ms", "INTEGER"),
    )
]
_API = "/bigquery/v2/projects/"
_UPLOAD = "/upload/bigquery/v2/projects/"


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, list[str]]
    body: Any = None
    data_bytes: int = 0
    status: int = 200


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    reason: str
    times: int | None = 1  # None = always


@dataclass
class BigQueryRecorder:
    project: str = "opsloop-rec"
    location: str = "EU"
    requests: list[Recorded] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, tuple[list[dict[str, str]], list[list[Any]]]] = field(default_factory=dict)
    job_errors: dict[str, str] = field(default_factory=dict)  # SQL regex → errorResult reason
    faults: list[Fault] = field(default_factory=list)
    cap_in_error: int = 0
    _uploads: dict[str, tuple[dict[str, Any], io.BytesIO]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    # -- control ---------------------------------------------------------------------------
    def start(self) -> str:
        recorder = self

        class Handler(_Handler):
            rec = recorder

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fail(self, method: str, path_regex: str, reason: str, times: int | None = 1) -> None:
        """Answer matching requests with the recorded error ``reason`` (``times`` = None: always)."""
        self.faults.append(Fault(method, re.compile(path_regex), reason, times))

    # -- views for assertions -----------------------------------------------------------------
    def job_inserts(self) -> list[Recorded]:
        """Every jobs.insert attempt (query POSTs and upload initiations), conflicts included."""
        return [
            r
            for r in self.requests
            if r.method == "POST"
            and (r.path.endswith("/jobs") or r.path.startswith(_UPLOAD))
            and isinstance(r.body, dict)
            and "configuration" in r.body
        ]

    def inserted_jobs(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Job resources the recorder created (one per distinct job id), in order."""
        return [j for j in self.jobs.values() if kind is None or kind in j["configuration"]]

    # -- behaviour ----------------------------------------------------------------------------
    def _fault(self, method: str, path: str) -> str | None:
        for f in self.faults:
            if f.method == method and f.pattern.search(path) and (f.times is None or f.times > 0):
                if f.times is not None:
                    f.times -= 1
                return f.reason
        return None

    def error_body(self, reason: str, **fmt: Any) -> tuple[int, dict[str, Any]]:
        err = RECORDED["errors"][reason]
        message = err["message"].format(cap=self.cap_in_error, **fmt)
        return err["code"], {
            "error": {
                "code": err["code"],
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason}],
                "status": err["status"],
            }
        }

    def create_job(self, resource: dict[str, Any], data: bytes | None = None) -> tuple[int, dict[str, Any]]:
        ref = resource.get("jobReference", {})
        job_id = ref.get("jobId") or f"job_{uuid.uuid4().hex}"
        with self._lock:
            if job_id in self.jobs:
                return self.error_body("duplicate", what=f"Job {self.project}:{self.location}.{job_id}")
            cfg = resource["configuration"]
            now = int(time.time() * 1000)
            if "load" in cfg:
                job = copy.deepcopy(RECORDED["jobs"]["LOAD"])
                rows = pq.ParquetFile(io.BytesIO(data or b"")).metadata.num_rows if data else 0
                job["statistics"]["load"].update(
                    inputFileBytes=str(len(data or b"")), outputRows=str(rows), outputBytes=str(rows * 48)
                )
                self._apply_load(cfg["load"], rows)
            else:
                sql = cfg["query"]["query"]
                kind = sql.lstrip().split(None, 1)[0].upper()
                kind = "DDL" if kind in ("CREATE", "ALTER") else kind if kind in RECORDED["jobs"] else "SELECT"
                job = copy.deepcopy(RECORDED["jobs"][kind])
                if kind == "DDL":
                    self._apply_ddl(sql)
                for pattern, reason in self.job_errors.items():
                    if re.search(pattern, sql):
                        err = self.error_body(reason)[1]["error"]
                        job["status"]["errorResult"] = {
                            "reason": reason,
                            "location": "query",
                            "message": err["message"],
                        }
                        job["status"]["errors"] = [job["status"]["errorResult"]]
            job["id"] = f"{self.project}:{self.location}.{job_id}"
            job["selfLink"] = f"{self.url}{_API}{self.project}/jobs/{job_id}?location={self.location}"
            job["jobReference"] = {"projectId": self.project, "jobId": job_id, "location": self.location}
            job["configuration"] = {**copy.deepcopy(cfg), "jobType": "LOAD" if "load" in cfg else "QUERY"}
            job["statistics"].update(creationTime=str(now), startTime=str(now + 12), endTime=str(now + 1400))
            self.jobs[job_id] = job
            running = copy.deepcopy(job)  # jobs.insert answers RUNNING; jobs.get then says DONE
            running["status"] = {"state": "RUNNING"}
            running["statistics"] = {"creationTime": str(now), "startTime": str(now + 12)}
            return 200, running

    def _apply_load(self, load: dict[str, Any], rows: int) -> None:
        dest = load["destinationTable"]
        key = f"{dest['datasetId']}.{dest['tableId']}"
        fields = load.get("schema", {}).get("fields") or self.tables.get(key, {}).get("schema", {}).get("fields", [])
        if load.get("writeDisposition") == "WRITE_TRUNCATE" or key not in self.tables:
            self.tables[key] = self._table_resource(dest["datasetId"], dest["tableId"], fields, rows)
        else:
            self.tables[key]["numRows"] = str(int(self.tables[key]["numRows"]) + rows)

    def _apply_ddl(self, sql: str) -> None:
        tree = sqlglot.parse_one(sql, read="bigquery")
        table = tree.find(exp.Table)
        assert table is not None
        key = f"{table.db}.{table.name}"
        cols = [
            {"name": c.name, "type": c.args["kind"].sql("bigquery").upper(), "mode": "NULLABLE"}
            for c in tree.find_all(exp.ColumnDef)
        ]
        if isinstance(tree, exp.Create) and key not in self.tables:
            res = self._table_resource(table.db, table.name, cols, 0)
            part = re.search(r"PARTITION BY (?:DATE\()?`(\w+)`", sql)
            if part:
                res["timePartitioning"] = {"type": "DAY", "field": part.group(1)}
            clus = re.search(r"CLUSTER BY (.+)$", sql, re.M)
            if clus:
                res["clustering"] = {"fields": re.findall(r"`(\w+)`", clus.group(1))}
            self.tables[key] = res
        elif isinstance(tree, exp.Alter) and key in self.tables:
            self.tables[key]["schema"]["fields"].extend(cols)

    def _table_resource(self, dataset: str, table: str, fields: list[dict[str, Any]], rows: int) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        return {
            "kind": "bigquery#table",
            "etag": uuid.uuid4().hex[:22] + "==",
            "id": f"{self.project}:{dataset}.{table}",
            "tableReference": {"projectId": self.project, "datasetId": dataset, "tableId": table},
            "schema": {"fields": list(fields)},
            "numRows": str(rows),
            "numBytes": str(rows * 48),
            "creationTime": now,
            "lastModifiedTime": now,
            "type": "TABLE",
            "location": self.location,
        }

    def query_results(self, job_id: str) -> tuple[int, dict[str, Any]]:
        job = self.jobs.get(job_id)
        if job is None:
            return self.error_body("notFound")
        err = job["status"].get("errorResult")
        if err:
            status, body = self.error_body(err["reason"])
            return status, body
        sql = job["configuration"].get("query", {}).get("query", "")
        fields, rows = next(((f, r) for pattern, (f, r) in self.results.items() if re.search(pattern, sql)), ([], []))
        q = job["statistics"].get("query", {})
        body: dict[str, Any] = {
            "kind": "bigquery#getQueryResultsResponse",
            "etag": job["etag"],
            "jobReference": job["jobReference"],
            "jobComplete": True,
            "totalRows": str(len(rows)),
            "rows": [{"f": [{"v": None if v is None else str(v)} for v in row]} for row in rows],
            "totalBytesProcessed": q.get("totalBytesProcessed", "0"),
            "cacheHit": q.get("cacheHit", False),
        }
        if fields:
            body["schema"] = {"fields": fields}
        if "numDmlAffectedRows" in q:
            body["numDmlAffectedRows"] = q["numDmlAffectedRows"]
        return 200, body


class _Handler(BaseHTTPRequestHandler):
    rec: BigQueryRecorder
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        params = parse_qs(url.query)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rec = self.rec
        body: Any = None
        data = b""
        if url.path.startswith(_UPLOAD) and params.get("uploadType") == ["multipart"]:
            body, data = _split_multipart(raw, self.headers.get("Content-Type", ""))
        elif raw and method != "PUT":
            body = json.loads(raw)
        entry = Recorded(method, url.path, params, body, len(data) or (len(raw) if method == "PUT" else 0))
        rec.requests.append(entry)
        status, out, headers = self._route(method, url.path, params, body, data, raw)
        entry.status = status
        self._send(status, out, headers)

    def _route(
        self, method: str, path: str, params: dict[str, list[str]], body: Any, data: bytes, raw: bytes
    ) -> tuple[int, Any, dict[str, str] | None]:
        rec = self.rec
        reason = rec._fault(method, path)
        if reason:
            return (*rec.error_body(reason), None)
        if path.startswith(_UPLOAD):
            if params.get("uploadType") == ["multipart"]:
                return (*rec.create_job(body, data), None)
            if method == "POST":  # resumable: initiate, the job is created when the bytes are complete
                upload_id = uuid.uuid4().hex
                rec._uploads[upload_id] = (body, io.BytesIO())
                loc = f"{rec.url}{path}?uploadType=resumable&upload_id={upload_id}"
                return 200, None, {"Location": loc}
            meta, buf = rec._uploads[params["upload_id"][0]]
            buf.write(raw)
            total = self.headers.get("Content-Range", "").rsplit("/", 1)[-1]
            if total == "*" or buf.tell() < int(total):
                return 308, None, {"Range": f"bytes=0-{buf.tell() - 1}"}
            return (*rec.create_job(meta, buf.getvalue()), None)
        parts = path[len(_API) :].split("/") if path.startswith(_API) else []
        if parts[1:] == ["jobs"] and method == "POST":
            return (*rec.create_job(body), None)
        if len(parts) == 3 and parts[1] == "jobs":
            job = rec.jobs.get(parts[2])
            return (200, job, None) if job else (*rec.error_body("notFound"), None)
        if len(parts) == 3 and parts[1] == "queries":
            return (*rec.query_results(parts[2]), None)
        if parts[1:] == ["datasets"] and method == "POST":
            ds = body["datasetReference"]["datasetId"]
            if ds in rec.datasets:
                return (*rec.error_body("duplicate", what=f"Dataset {rec.project}:{ds}"), None)
            rec.datasets[ds] = {**body, "id": f"{rec.project}:{ds}", "location": body.get("location") or rec.location}
            return 200, rec.datasets[ds], None
        if len(parts) == 3 and parts[1] == "datasets":
            ds_res = rec.datasets.get(parts[2])
            return (200, ds_res, None) if ds_res else (*rec.error_body("notFound"), None)
        if len(parts) == 4 and parts[1] == "datasets" and parts[3] == "tables" and method == "POST":
            ref = body["tableReference"]
            key = f"{ref['datasetId']}.{ref['tableId']}"
            rec.tables[key] = {
                **rec._table_resource(ref["datasetId"], ref["tableId"], body.get("schema", {}).get("fields", []), 0),
                **{k: v for k, v in body.items() if k != "tableReference"},
            }
            return 200, rec.tables[key], None
        if len(parts) == 5 and parts[1] == "datasets" and parts[3] == "tables":
            key = f"{parts[2]}.{parts[4]}"
            if key not in rec.tables:
                return (*rec.error_body("notFound"), None)
            if method == "DELETE":
                del rec.tables[key]
                return 204, None, None
            if method == "PATCH":
                rec.tables[key].update(body)
            return 200, rec.tables[key], None
        return 404, {"error": {"code": 404, "message": f"recorder: no route for {method} {path}"}}, None

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def _split_multipart(raw: bytes, content_type: str) -> tuple[dict[str, Any], bytes]:
    """multipart/related: part 1 = job resource (JSON), part 2 = the file bytes."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    assert boundary, content_type
    sep = b"--" + boundary.group(1).encode()
    parts = [p for p in raw.split(sep) if p.strip() not in (b"", b"--")]
    meta_part, data_part = parts[0], parts[1]
    meta = json.loads(meta_part.split(b"\r\n\r\n", 1)[1].strip())
    data = data_part.split(b"\r\n\r\n", 1)[1]
    return meta, data.removesuffix(b"\r\n")
