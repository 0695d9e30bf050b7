"""HubSpot sink: batch upsert by a unique id property in chunks of 100.

Custom properties are created when missing (``number`` for scores, ``enumeration``/``select`` for
known value sets such as next best action, ``datetime``, ``string``); an enumeration that lacks a
value being pushed gets the option added first. The unique id property is created with
``hasUniqueValue``. A 207 answer's ``errors[]`` become per-record failures; a 400 for the whole
batch is terminal with HubSpot's message. HubSpot answers ``None`` for an unexpected 2xx — that is
treated as an error, never as success. Every call is paced under the app's ten-secondly limit, as
its answers announce it (:mod:`opsloop.crm.pacing`).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlencode

import orjson
import pyarrow as pa
import urllib3

from opsloop.crm.base import BatchResult, FieldSpec, SchemaCheck, SinkBase, rechunk
from opsloop.crm.clients import classify_hubspot, hubspot_timeout
from opsloop.crm.pacing import paced
from opsloop.crm.payload import VALUE_PREFIX
from opsloop.crm.retry import RetryPolicy
from opsloop.errors import TerminalError

BATCH_SIZE = 100
_TYPES: dict[str, tuple[str, str]] = {
    "number": ("number", "number"),
    "enumeration": ("enumeration", "select"),
    "datetime": ("datetime", "date"),
    "bool": ("bool", "booleancheckbox"),
    "string": ("string", "text"),
}


def _values(col: pa.Array | pa.ChunkedArray) -> list[Any]:
    """A column as HubSpot property values: null → "" (an empty string clears the property),
    booleans as "true"/"false", numbers as JSON numbers, strings as given."""
    if pa.types.is_boolean(col.type):
        return [("true" if v else "false") if v is not None else "" for v in col.to_pylist()]
    values = col.to_pylist()
    if col.null_count:
        return ["" if v is None else v for v in values]
    return values


class _JsonReady(dict[str, Any]):
    """A request body already made of JSON types (str, float, None, lists, dicts). The client's
    model walk (``sanitize_for_serialization``, a recursive call per value — a fifth of a batch
    call's client CPU) is skipped for it, and it is encoded by orjson instead of ``json.dumps``
    (8 against 120-130 µs for 100 records; compact UTF-8 instead of ASCII escapes, the same JSON)."""


def _pass_ready_bodies(api_client: Any) -> None:
    """Let ``api_client`` (this instance only) send :class:`_JsonReady` bodies as they are: no
    model walk, and orjson bytes handed to the client's own urllib3 pool. Everything else — other
    bodies, or one orjson refuses — takes the library's path unchanged. A non-2xx answer raises the
    library's own exception for its status (what ``RESTClientObject.request`` raises)."""
    walk = api_client.sanitize_for_serialization

    def sanitize(obj: Any) -> Any:
        return obj if isinstance(obj, _JsonReady) else walk(obj)

    api_client.sanitize_for_serialization = sanitize
    rest = api_client.rest_client
    library_request = rest.request
    rest_module = importlib.import_module(type(rest).__module__)  # e.g. hubspot.crm.objects.rest
    errors = importlib.import_module(rest_module.__name__.rsplit(".", 1)[0] + ".exceptions")

    def request(
        method: str,
        url: str,
        query_params: Any = None,
        headers: Any = None,
        body: Any = None,
        post_params: Any = None,
        _preload_content: bool = True,
        _request_timeout: Any = None,
    ) -> Any:
        encoded = None
        if isinstance(body, _JsonReady) and not post_params:
            with contextlib.suppress(TypeError):  # refused: the library's json.dumps decides (and words the error)
                encoded = orjson.dumps(body)
        if encoded is None:
            return library_request(
                method, url, query_params, headers, body, post_params, _preload_content, _request_timeout
            )
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        if query_params:
            url += "?" + urlencode(query_params)
        t = _request_timeout
        timeout = (
            urllib3.Timeout(connect=t[0], read=t[1])
            if isinstance(t, tuple)
            else urllib3.Timeout(total=t)
            if t
            else None
        )
        try:
            r = rest.pool_manager.request(
                method.upper(), url, body=encoded, preload_content=_preload_content, timeout=timeout, headers=headers
            )
        except urllib3.exceptions.SSLError as exc:
            raise errors.ApiException(status=0, reason=f"{type(exc).__name__}\n{exc}") from exc
        if _preload_content:
            r = rest_module.RESTResponse(r)
        if not 200 <= r.status <= 299:
            known = {401: errors.UnauthorizedException, 403: errors.ForbiddenException, 404: errors.NotFoundException}
            other = errors.ServiceException if 500 <= r.status <= 599 else errors.ApiException
            raise known.get(r.status, other)(http_resp=r)
        return r

    rest.request = request


def _label(name: str) -> str:
    return name.replace("_", " ").strip().capitalize()


class HubSpotSink(SinkBase):
    vendor = "HubSpot"

    def __init__(
        self,
        client: Any,
        block: str,
        obj: str,
        id_property: str,
        *,
        policy: RetryPolicy | None = None,
        group_name: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(block, obj, id_property, policy)
        self.batch_api = client.crm.objects.batch_api  # built once: every access builds a new ApiClient
        _pass_ready_bodies(self.batch_api.api_client)
        self.properties_api = client.crm.properties.core_api
        self.timeout = hubspot_timeout(client)
        self.group_name = group_name or {
            "contacts": "contactinformation",
            "companies": "companyinformation",
            "deals": "dealinformation",
        }.get(obj, "contactinformation")
        self.sleep = sleep

    # -- plumbing ------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], tuple[Any, int, Any]], what: str) -> Any:
        """Call a ``*_with_http_info`` method, paced under the rolling window (every attempt); note
        the window and the daily-limit headers; return the data."""
        data, status, headers = self.counted_call(paced(self.pacer, fn), classify_hubspot, what)
        daily, left = headers.get("X-HubSpot-RateLimit-Daily"), headers.get("X-HubSpot-RateLimit-Daily-Remaining")
        if daily is not None and left is not None:
            self.budget.limit, self.budget.used = int(daily), int(daily) - int(left)
        if data is None and status != 204:
            raise TerminalError(f"{self.block}: HubSpot {what} answered HTTP {status} with no usable body")
        return data

    def _raw(self, method: Callable[..., Any], *args: Any) -> tuple[Any, int, Any]:
        """Call without the client's model deserialisation (it parses every timestamp with dateutil,
        most of a batch call's client CPU): the raw urllib3 response, JSON-decoded here. Only 200
        and 207 count as success — for any other 2xx the client itself would return None."""
        resp = method(*args, _request_timeout=self.timeout, _preload_content=False)
        try:
            raw = resp.data
            status, headers = int(resp.status), resp.headers
        finally:
            resp.release_conn()
        if status not in (200, 207):
            return None, status, headers
        return orjson.loads(raw), status, headers

    # -- schema --------------------------------------------------------------------------------
    def ensure_schema(self, fields: list[FieldSpec], values: dict[str, set[str]], create: bool) -> SchemaCheck:
        obj = self.object
        listing = self._call(
            lambda: self.properties_api.get_all_with_http_info(obj, _request_timeout=self.timeout),
            f"read {obj} properties",
        )
        have = {p.name: p for p in listing.results}
        check = SchemaCheck()
        idp = have.get(self.external_id_field)
        if idp is None:
            check.missing.append(self.external_id_field)
            if create:
                self._create(self.external_id_field, "string", (), unique=True)
                check.created.append(self.external_id_field)
        elif not (idp.has_unique_value or self.external_id_field == "email"):
            raise TerminalError(
                f"{self.block}: HubSpot {obj} property {self.external_id_field!r} exists but is not "
                "unique (hasUniqueValue=false), so it cannot be the upsert idProperty"
            )
        for f in fields:
            wanted = sorted(set(f.options) | values.get(f.column, set())) if f.kind == "enumeration" else []
            prop = have.get(f.crm_name)
            if prop is None:
                check.missing.append(f.crm_name)
                if create:
                    self._create(f.crm_name, f.kind, tuple(wanted))
                    check.created.append(f.crm_name)
                continue
            if prop.type == "enumeration":
                known = [o.value for o in (prop.options or [])]
                extra = [v for v in wanted if v not in known]
                if extra:
                    check.instructions.append(f"{f.crm_name}: add options {extra}")
                    if create:
                        self._add_options(f.crm_name, prop.options or [], extra)
                        check.updated.append(f.crm_name)
        return check

    def _create(self, name: str, kind: str, options: tuple[str, ...], unique: bool = False) -> None:
        from hubspot.crm.properties import OptionInput, PropertyCreate

        type_, field_type = _TYPES[kind]
        body = PropertyCreate(
            name=name,
            label=_label(name),
            type=type_,
            field_type=field_type,
            group_name=self.group_name,
            has_unique_value=unique or None,
            description="Written by opsloop (reverse ETL).",
            options=[OptionInput(label=o, value=o, display_order=i, hidden=False) for i, o in enumerate(options)]
            or None,
        )
        try:
            self._call(
                lambda: self.properties_api.create_with_http_info(self.object, body, _request_timeout=self.timeout),
                f"create property {self.object}.{name}",
            )
        except TerminalError as exc:
            if "HTTP 409" not in str(exc):  # created concurrently (or by a retried request): fine
                raise

    def _add_options(self, name: str, current: list[Any], extra: list[str]) -> None:
        from hubspot.crm.properties import OptionInput, PropertyUpdate

        opts = [
            OptionInput(label=o.label, value=o.value, display_order=o.display_order, hidden=bool(o.hidden))
            for o in current
        ]
        opts += [OptionInput(label=v, value=v, display_order=len(opts) + i, hidden=False) for i, v in enumerate(extra)]
        self._call(
            lambda: self.properties_api.update_with_http_info(
                self.object, name, PropertyUpdate(options=opts), _request_timeout=self.timeout
            ),
            f"add options to {self.object}.{name}",
        )

    # -- push ----------------------------------------------------------------------------------
    def plan_calls(self, n: int) -> int:
        return math.ceil(max(n, 0) / BATCH_SIZE)

    def push(self, tables: Iterable[pa.Table], total: int) -> Iterator[BatchResult]:
        yield from self.pipelined(rechunk(tables, BATCH_SIZE), self._body, self._send, self._parse)

    def _body(self, t: pa.Table) -> dict[str, Any]:
        idp = self.external_id_field
        names = [c[len(VALUE_PREFIX) :] for c in t.column_names if c.startswith(VALUE_PREFIX)]
        cols = [_values(t.column(VALUE_PREFIX + n)) for n in names]
        props = [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)] if cols else None
        ids = t.column("external_id").to_pylist()
        return _JsonReady(
            inputs=[
                {"idProperty": idp, "id": i, "properties": p}
                for i, p in zip(ids, props if props is not None else [{} for _ in ids], strict=True)
            ]
        )

    def _send(self, t: pa.Table, body: dict[str, Any]) -> Any:
        return self._call(
            lambda: self._raw(self.batch_api.upsert, self.object, body),
            f"batch upsert {self.object} ({t.num_rows} records)",
        )

    def _parse(self, t: pa.Table, data: Any) -> BatchResult:
        idp = self.external_id_field
        n = t.num_rows
        status: list[str | None] = ["failed"] * n
        crm_id: list[str | None] = [None] * n
        codes: list[str | None] = ["MISSING_RESULT"] * n
        messages: list[str | None] = ["HubSpot returned no result for this input"] * n
        ids = t.column("external_id").to_pylist()
        pos: dict[str, int] = {}

        def positions() -> dict[str, int]:
            """Input row by lower-cased id property value, built on first use (HubSpot usually
            answers in input order, which needs none)."""
            if not pos:
                pos.update((str(k).lower(), i) for i, k in enumerate(ids))
            return pos

        def position(key: Any) -> int | None:
            return positions().get(str(key or "").lower())

        done: set[int] = set()
        for j, item in enumerate(data.get("results") or []):
            key = (item.get("properties") or {}).get(idp)
            i = j if j < n and key is not None and key == ids[j] else position(key)
            if i is not None:
                status[i] = "created" if item.get("new") else "updated"
                crm_id[i], codes[i], messages[i] = str(item.get("id")), None, None
                done.add(i)
        for err in data.get("errors") or []:
            err_ids = (err.get("context") or {}).get("ids") or []
            code = str(err.get("subCategory") or err.get("category") or "ERROR")
            targets = [position(k) for k in err_ids] if err_ids else [i for i in positions().values() if i not in done]
            for i in targets:
                if i is not None and i not in done:
                    codes[i], messages[i] = code, str(err.get("message"))[:1000]
                    done.add(i)
        return BatchResult(t, status, crm_id, codes, messages, "batch")
