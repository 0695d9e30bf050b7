"""The ASGI app: one catch-all endpoint that routes, authenticates, meters and fault-injects.

Order for every vendor request: fault injection (delay and/or canned answer) → route → bearer
token (401) → daily budget (Salesforce 403 ``REQUEST_LIMIT_EXCEEDED`` / HubSpot 429 ``DAILY``) →
HubSpot ten-secondly window (429 ``TEN_SECONDLY_ROLLING`` + ``Retry-After``) → handler → limit
headers (``Sforce-Limit-Info`` / ``X-HubSpot-RateLimit-*``) → counters and request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.defaults import HUBSPOT, SALESFORCE
from sandbox.runtime import Fault, Sandbox
from sandbox.util import hs_error, json_response, loads, sf_error

log = logging.getLogger("sandbox")

Handler = Callable[..., Awaitable[Response]]


@dataclass
class RouteDef:
    vendor: str
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    name: str
    write: bool = False
    auth: bool = True
    billable: bool = True


class Router:
    def __init__(self) -> None:
        self.routes: list[RouteDef] = []

    def add(
        self,
        vendor: str,
        method: str,
        pattern: str,
        name: str,
        *,
        write: bool = False,
        auth: bool = True,
        billable: bool = True,
        flags: int = 0,
    ) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.routes.append(
                RouteDef(vendor, method, re.compile(pattern + r"/?$", flags), fn, name, write, auth, billable)
            )
            return fn

        return deco

    def match(self, vendor: str, method: str, path: str) -> tuple[RouteDef, dict[str, str]] | None:
        for r in self.routes:
            if r.vendor == vendor and r.method == method:
                m = r.pattern.match(path)
                if m:
                    return r, {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
        return None


class BadRequest(Exception):
    """Raised by handlers for a request-level vendor error; becomes the vendor's error body."""

    def __init__(self, response: Response) -> None:
        super().__init__("bad request")
        self.response = response


async def read_json(request: Request, vendor: str) -> Any:
    raw = await request.body()
    try:
        return loads(raw or b"null")
    except ValueError as exc:
        if vendor == SALESFORCE:
            raise BadRequest(sf_error(400, "JSON_PARSER_ERROR", f"Unexpected character: {exc}")) from exc
        raise BadRequest(hs_error(400, "VALIDATION_ERROR", "Invalid input JSON on line 1")) from exc


def _vendor_of(path: str) -> str | None:
    if path.startswith("/services/"):
        return SALESFORCE
    if path.startswith("/crm/"):
        return HUBSPOT
    return None


def _fault_response(f: Fault, vendor: str) -> Response:
    body = f.body
    if body is None:
        status = f.status or 500
        if vendor == SALESFORCE:
            code = "REQUEST_LIMIT_EXCEEDED" if status == 403 else "UNKNOWN_EXCEPTION"
            body = [{"message": f"injected fault ({status})", "errorCode": code}]
        elif status == 429:
            body = {
                "status": "error",
                "message": "You have reached your ten_secondly_rolling limit.",
                "errorType": "RATE_LIMIT",
                "policyName": "TEN_SECONDLY_ROLLING",
                "category": "RATE_LIMITS",
            }
        else:
            body = {"status": "error", "message": f"injected fault ({status})", "category": "INTERNAL_ERROR"}
    if isinstance(body, str):
        return Response(body, status_code=f.status or 500, headers=dict(f.headers), media_type="text/plain")
    return json_response(body, f.status or 500, dict(f.headers))


def _token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-sfdc-session", "").strip()


def _token_ok(sb: Sandbox, vendor: str, token: str) -> bool:
    allowed = sb.settings.get(f"{vendor}_tokens") or []
    return bool(token) and ("*" in allowed or token in allowed)


def _limit_headers(sb: Sandbox, vendor: str, remaining: int) -> dict[str, str]:
    used, limit = sb.usage(vendor), sb.daily_limit(vendor)
    if vendor == SALESFORCE:
        return {"Sforce-Limit-Info": f"api-usage={used}/{limit}"}
    out = {"X-HubSpot-RateLimit-Daily": str(limit), "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, limit - used))}
    ten = int(sb.settings.get("hubspot_ten_second_limit") or 0)
    if ten > 0:
        out.update(
            {
                "X-HubSpot-RateLimit-Interval-Milliseconds": str(round(sb.rate_window() * 1000)),
                "X-HubSpot-RateLimit-Max": str(ten),
                "X-HubSpot-RateLimit-Remaining": str(max(0, remaining)),
            }
        )
    return out


async def _vendor_request(sb: Sandbox, router: Router, request: Request, vendor: str) -> Response:
    raw = request.scope.get("raw_path") or b""
    path = raw.decode("latin-1") if raw else request.url.path
    method = request.method
    target = path + (f"?{request.url.query}" if request.url.query else "")
    found = router.match(vendor, method, path)
    name = found[0].name if found else "unknown"
    fault = sb.take_fault(vendor, method, target)
    if fault is not None and fault.delay:
        await asyncio.sleep(fault.delay)
    write = bool(found and found[0].write)
    billable, remaining = False, -1
    if fault is not None and fault.status:
        resp = _fault_response(fault, vendor)
    elif found is None:
        resp = (
            sf_error(404, "NOT_FOUND", "The requested resource does not exist")
            if vendor == SALESFORCE
            else hs_error(404, "OBJECT_NOT_FOUND", f"resource not found: {method} {path}")
        )
    else:
        route, params = found
        resp, billable, remaining = await _guarded(sb, route, params, request, vendor)
    sb.count(vendor, name, resp.status_code, write, billable, fault is not None and bool(fault.status))
    if not (found and not found[0].billable):
        for k, v in _limit_headers(sb, vendor, remaining).items():
            resp.headers.setdefault(k, v)
    sb.record(
        {
            "vendor": vendor,
            "method": method,
            "path": path,
            "target": target[:300],
            "route": name,
            "status": resp.status_code,
            "injected": fault is not None and bool(fault.status),
            "write": write,
            "at": time.time(),
        }
    )
    return resp


async def _guarded(
    sb: Sandbox, route: RouteDef, params: dict[str, str], request: Request, vendor: str
) -> tuple[Response, bool, int]:
    remaining = -1
    if route.auth and not _token_ok(sb, vendor, _token(request)):
        if vendor == SALESFORCE:
            return sf_error(401, "INVALID_SESSION_ID", "Session expired or invalid"), False, remaining
        return (
            hs_error(
                401,
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found. This API supports "
                "OAuth 2.0 authentication and you can find more details at "
                "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
            ),
            False,
            remaining,
        )
    if route.billable and sb.usage(vendor) >= sb.daily_limit(vendor):
        if vendor == SALESFORCE:
            return sf_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."), False, remaining
        body = {
            "status": "error",
            "message": "You have reached your daily limit.",
            "errorType": "RATE_LIMIT",
            "policyName": "DAILY",
            "category": "RATE_LIMITS",
        }
        return json_response(body, 429), False, remaining
    if vendor == HUBSPOT and route.billable:
        ok, remaining, wait = sb.admit()
        if not ok:
            body = {
                "status": "error",
                "message": "You have reached your ten_secondly_rolling limit.",
                "errorType": "RATE_LIMIT",
                "policyName": "TEN_SECONDLY_ROLLING",
                "groupName": "sandbox-app",
                "category": "RATE_LIMITS",
            }
            send_after = sb.settings.get("hubspot_retry_after", True)
            after = {"Retry-After": str(max(1, math.ceil(wait)))} if send_after else {}
            return json_response(body, 429, after), False, 0
    try:
        resp = await route.handler(sb, request, **params)
    except BadRequest as exc:
        resp = exc.response
    except Exception as exc:  # a sandbox bug must still answer like the vendor would
        log.exception("handler %s failed", route.name)
        resp = (
            sf_error(500, "UNKNOWN_EXCEPTION", f"sandbox error: {exc}")
            if vendor == SALESFORCE
            else hs_error(500, "INTERNAL_ERROR", f"sandbox error: {exc}")
        )
    return resp, route.billable, remaining


def create_app(state_dir: Path, overrides: dict[str, Any] | None = None) -> Starlette:
    from sandbox import control, hubspot, salesforce, sf_bulk

    sb = Sandbox(state_dir, overrides)
    router = Router()
    salesforce.register(router)
    sf_bulk.register(router)
    hubspot.register(router)

    async def endpoint(request: Request) -> Response:
        path = request.url.path
        if path.startswith("/__control"):
            return await control.handle(sb, request)
        vendor = _vendor_of(path)
        if vendor is None:
            return json_response({"error": f"no such sandbox resource: {path}"}, 404)
        return await _vendor_request(sb, router, request, vendor)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def flusher() -> None:
            while True:
                await asyncio.sleep(1.0)
                sb.flush()

        task = asyncio.create_task(flusher())
        try:
            yield
        finally:
            task.cancel()
            sb.flush()
            sb.store.close()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)], lifespan=lifespan)
    app.state.sandbox = sb
    return app
