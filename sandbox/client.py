"""Python helpers for tests and the demo: start a sandbox process, drive its ``/__control`` API.

server = SandboxServer.start(tmp / "sbx")            # free port, http (tls=True for https)
sbx = SandboxClient(server.url)
sbx.reset(); sbx.seed("salesforce", "Contact", 1000)
sbx.fault(r"/composite/sobjects", method="PATCH", status=503, count=2)
sbx.records("hubspot", "contacts")                  # every record, system fields included
server.stop()
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

SALESFORCE_TOKEN = "00DSANDBOX!sandbox-session"  # noqa: S105 - public sandbox token
HUBSPOT_TOKEN = "pat-sandbox-token"  # noqa: S105 - public sandbox token
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SandboxClient:
    """Thin wrapper over ``/__control``; every method returns the decoded JSON answer."""

    def __init__(self, url: str, verify: bool | str = True) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.verify = verify
        self.salesforce_token = SALESFORCE_TOKEN
        self.hubspot_token = HUBSPOT_TOKEN

    def _call(self, method: str, action: str, body: Any = None, **params: Any) -> Any:
        resp = self.http.request(
            method, f"{self.url}/__control/{action}", json=body, params=params or None, timeout=120
        )
        if resp.status_code >= 400:
            raise RuntimeError(f"sandbox control {method} {action} failed ({resp.status_code}): {resp.text[:500]}")
        return resp.json()

    # -- lifecycle / settings ------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "health"))

    def reset(self) -> None:
        self._call("POST", "reset")

    def settings(self, **changes: Any) -> dict[str, Any]:
        """Read settings, or change them (``hubspot_ten_second_limit=10``, ``bulk_inprogress_polls=3``,
        ``clock_freeze_ms=…``, ``salesforce_tokens=[…]``, ``query_batch_size=200`` …)."""
        return dict(self._call("POST", "settings", changes) if changes else self._call("GET", "settings"))

    def budget(self, vendor: str, daily_limit: int | None = None, used: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"vendor": vendor}
        if daily_limit is not None:
            body["daily_limit"] = daily_limit
        if used is not None:
            body["used"] = used
        return dict(self._call("POST", "budget", body))

    def rate_limit(self, ten_second_limit: int, window_ms: int | None = None, retry_after: bool | None = None) -> None:
        """HubSpot requests allowed per rolling window (0 = unlimited); ``window_ms`` shortens the
        window (HubSpot's is 10 s; the answers' ``X-HubSpot-RateLimit-Interval-Milliseconds`` says
        it); ``retry_after=False`` answers its 429s without ``Retry-After``, as HubSpot may."""
        body = {"ten_second_limit": ten_second_limit, "window_ms": window_ms, "retry_after": retry_after}
        self._call("POST", "rate_limit", body)

    # -- data ----------------------------------------------------------------------------------
    def seed(
        self,
        vendor: str,
        obj: str,
        count: int,
        start: int = 1,
        fields: dict[str, Any] | None = None,
        modstamp: str | int | None = None,
        step_ms: int = 0,
    ) -> dict[str, Any]:
        """Create ``count`` records numbered from ``start``; ``fields`` values may use ``{i}``
        (``{"Customer_Id__c": "C{i:07d}"}`` is the Contact default)."""
        body = {
            "vendor": vendor,
            "object": obj,
            "count": count,
            "start": start,
            "fields": fields or {},
            "modstamp": modstamp,
            "step_ms": step_ms,
        }
        return dict(self._call("POST", "seed", body))

    def load(
        self, vendor: str, obj: str, records: list[dict[str, Any]], modstamp: str | int | None = None, step_ms: int = 0
    ) -> list[str]:
        """Write records as given (system fields such as SystemModstamp / hs_lastmodifieddate allowed)."""
        body = {"vendor": vendor, "object": obj, "records": records, "modstamp": modstamp, "step_ms": step_ms}
        return list(self._call("POST", "records", body)["ids"])

    def records(
        self, vendor: str, obj: str, include_deleted: bool = False, limit: int = -1, offset: int = 0
    ) -> list[dict[str, Any]]:
        params = {
            "vendor": vendor,
            "object": obj,
            "limit": limit,
            "offset": offset,
            "include_deleted": "true" if include_deleted else "false",
        }
        return list(self._call("GET", "records", **params)["records"])

    def count(self, vendor: str, obj: str, include_deleted: bool = False) -> int:
        params = {"vendor": vendor, "object": obj, "limit": 0, "include_deleted": str(include_deleted).lower()}
        return int(self._call("GET", "records", **params)["total"])

    def by_key(self, vendor: str, obj: str, key: str) -> dict[str, dict[str, Any]]:
        """Live records keyed by the value of ``key`` (a Salesforce field or a HubSpot property)."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.records(vendor, obj):
            values = rec.get("properties", rec)
            if values.get(key) is not None:
                out[str(values[key])] = values
        return out

    def delete(self, vendor: str, obj: str, ids: list[str], hard: bool = False) -> None:
        """Soft delete (Salesforce IsDeleted / HubSpot archived, modstamp bumped) or hard delete."""
        self._call("POST", "delete", {"vendor": vendor, "object": obj, "ids": ids, "hard": hard})

    # -- schema --------------------------------------------------------------------------------
    def schema(self, vendor: str, obj: str) -> list[dict[str, Any]]:
        return list(self._call("GET", "schema", vendor=vendor, object=obj)["fields"])

    def add_fields(self, vendor: str, obj: str, fields: list[dict[str, Any]]) -> None:
        """Salesforce: ``{name, type, externalId, required, unique, picklist, restricted}``;
        HubSpot: ``{name, type, fieldType, hasUniqueValue, options}``. A new object is created."""
        self._call("POST", "schema", {"vendor": vendor, "object": obj, "fields": fields})

    def drop_fields(self, vendor: str, obj: str, names: list[str]) -> None:
        self._call("POST", "schema", {"vendor": vendor, "object": obj, "drop": names})

    # -- faults --------------------------------------------------------------------------------
    def fault(
        self,
        path: str = ".*",
        method: str | None = None,
        status: int | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        count: int = 1,
        skip: int = 0,
        delay: float = 0.0,
        vendor: str | None = None,
    ) -> dict[str, Any]:
        """Answer matching requests (regex on path+query) with ``status``/``body``/``headers`` after
        ``delay`` s; ``skip`` matches pass first, then ``count`` hit (-1 = forever)."""
        return dict(
            self._call(
                "POST",
                "fault",
                {
                    "path": path,
                    "method": method,
                    "status": status,
                    "body": body,
                    "headers": headers or {},
                    "count": count,
                    "skip": skip,
                    "delay": delay,
                    "vendor": vendor,
                },
            )
        )

    def faults(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "faults"))

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    def fail_records(
        self,
        vendor: str,
        obj: str,
        field: str,
        values: list[str] | None = None,
        regex: str | None = None,
        error_code: str = "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        message: str = "rejected by a sandbox validation rule",
        count: int = -1,
    ) -> None:
        """Writes of records whose ``field`` (or upsert key) matches fail per record (207 / Bulk failedResults)."""
        self._call(
            "POST",
            "record_failures",
            {
                "vendor": vendor,
                "object": obj,
                "field": field,
                "values": values or [],
                "regex": regex,
                "error_code": error_code,
                "message": message,
                "count": count,
            },
        )

    def clear_record_failures(self) -> None:
        self._call("DELETE", "record_failures")

    # -- metering ------------------------------------------------------------------------------
    def requests(self, log: int = 0, vendor: str | None = None) -> dict[str, Any]:
        """Counters per vendor: requests, api_usage, writes, routes{name: n}, status{code: n}."""
        params: dict[str, Any] = {"log": log}
        if vendor:
            params["vendor"] = vendor
        return dict(self._call("GET", "requests", **params))

    def writes(self, vendor: str) -> int:
        """Successful write requests (upserts, collections, bulk job calls, batch writes…) so far."""
        return int(self.requests()[vendor]["writes"])

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "jobs"))


@dataclass
class SandboxServer:
    """A sandbox child process (``python -m sandbox serve``) on a free loopback port."""

    url: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    ca_cert: Path | None = None
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        tls: bool = False,
        port: int | None = None,
        extra_args: list[str] | None = None,
        timeout: float = 30.0,
    ) -> SandboxServer:
        state_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        args = ["--port", str(port), "--state-dir", str(state_dir), *(extra_args or [])]
        cert: Path | None = None
        if tls:
            from sandbox.tls import make_self_signed

            cert, key = make_self_signed(state_dir / "tls")
            args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        log_path = state_dir / "sandbox.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox", "serve", *args], stdout=log, stderr=log, env=env, cwd=REPO
            )
        scheme = "https" if tls else "http"
        server = cls(f"{scheme}://127.0.0.1:{port}", state_dir, proc, cert, log_path, args)
        server.wait_ready(timeout)
        return server

    def client(self) -> SandboxClient:
        return SandboxClient(self.url, verify=str(self.ca_cert) if self.ca_cert else True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        probe = self.client()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text()[-2000:] if self.log_path else ""
                raise RuntimeError(f"sandbox exited with {self.process.returncode}:\n{tail}")
            try:
                probe.health()
                return
            except (requests.RequestException, RuntimeError):
                time.sleep(0.1)
        raise TimeoutError(f"sandbox at {self.url} not ready after {timeout}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port and state dir (state must survive)."""
        self.stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path or os.devnull, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandbox", "serve", *self.args], stdout=log, stderr=log, env=env, cwd=REPO
            )
        self.wait_ready()
