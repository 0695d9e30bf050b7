"""Salesforce REST routes: versions, limits, describe, query/queryAll, sObject rows, Collections, OAuth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from sandbox import soql
from sandbox.app import BadRequest, Router, read_json
from sandbox.defaults import SALESFORCE
from sandbox.runtime import Sandbox
from sandbox.sf_core import FieldError, RowResult, record_json, typed, write_rows
from sandbox.util import json_response, parse_ts, sf_error

V = r"/services/data/v(?P<ver>\d+\.\d)"
MAX_COLLECTION = 200
_PUSHDOWN = {
    "systemmodstamp": "modstamp",
    "lastmodifieddate": "modstamp",
    "createddate": "created",
    "id": "id",
    "isdeleted": "deleted",
}


def _object(sb: Sandbox, name: str) -> str:
    obj = sb.canonical_object(SALESFORCE, name)
    if obj is None:
        raise BadRequest(sf_error(404, "NOT_FOUND", f"The requested resource does not exist: sObject type '{name}'"))
    return obj


def _field_error(exc: FieldError, status: int = 400) -> BadRequest:
    return BadRequest(sf_error(status, exc.code, str(exc), exc.fields))


def register(r: Router) -> None:
    @r.add(SALESFORCE, "GET", r"/services/data", "sf.versions", auth=False, billable=False)
    async def versions(sb: Sandbox, req: Request) -> Response:
        return json_response(
            [{"label": f"v{v}", "url": f"/services/data/v{v}.0", "version": f"{v}.0"} for v in range(46, 63)]
        )

    @r.add(SALESFORCE, "GET", V, "sf.resources")
    async def resources(sb: Sandbox, req: Request, ver: str) -> Response:
        base = f"/services/data/v{ver}"
        return json_response(
            {k: f"{base}/{k}" for k in ("sobjects", "query", "queryAll", "limits", "composite", "jobs")}
        )

    @r.add(SALESFORCE, "GET", V + r"/limits", "sf.limits")
    async def limits(sb: Sandbox, req: Request, ver: str) -> Response:
        used, cap = sb.usage(SALESFORCE), sb.daily_limit(SALESFORCE)
        return json_response(
            {
                "DailyApiRequests": {"Max": cap, "Remaining": max(0, cap - used - 1)},
                "DailyBulkV2QueryJobs": {"Max": 10000, "Remaining": 10000},
            }
        )

    @r.add(SALESFORCE, "GET", V + r"/sobjects", "sf.describe_global")
    async def describe_global(sb: Sandbox, req: Request, ver: str) -> Response:
        objs = [
            {
                "name": o,
                "label": o,
                "custom": o.endswith("__c"),
                "queryable": True,
                "createable": True,
                "updateable": True,
                "urls": {"sobject": f"/services/data/v{ver}/sobjects/{o}"},
            }
            for o in sb.store.objects(SALESFORCE)
        ]
        return json_response({"encoding": "UTF-8", "maxBatchSize": 200, "sobjects": objs})

    @r.add(SALESFORCE, "GET", V + r"/sobjects/(?P<obj>\w+)/describe", "sf.describe")
    async def describe(sb: Sandbox, req: Request, ver: str, obj: str) -> Response:
        name = _object(sb, obj)
        fields = list(sb.fields(SALESFORCE, name).values())
        return json_response(
            {
                "name": name,
                "label": name,
                "custom": name.endswith("__c"),
                "queryable": True,
                "createable": True,
                "updateable": True,
                "fields": fields,
            }
        )

    @r.add(SALESFORCE, "GET", V + r"/(?P<kind>query|queryAll)", "sf.query")
    async def query(sb: Sandbox, req: Request, ver: str, kind: str) -> Response:
        q = parse_qs(req.url.query).get("q", [""])[0]
        if not q:
            raise BadRequest(sf_error(400, "MALFORMED_QUERY", "A query string has to be specified"))
        return _run_query(sb, req, ver, q, include_deleted=kind == "queryAll")

    @r.add(SALESFORCE, "GET", V + r"/(?P<kind>query|queryAll)/(?P<locator>01g\w+)-(?P<pos>\d+)", "sf.query_more")
    async def query_more(sb: Sandbox, req: Request, ver: str, kind: str, locator: str, pos: str) -> Response:
        cur = sb.cursors.get(locator)
        if cur is None:
            raise BadRequest(sf_error(400, "INVALID_QUERY_LOCATOR", "invalid query locator"))
        return _page(sb, cur, locator, int(pos), ver, kind)

    @r.add(SALESFORCE, "PATCH", V + r"/sobjects/(?P<obj>\w+)/(?P<field>\w+)/(?P<value>[^/]+)", "sf.upsert", write=True)
    async def upsert(sb: Sandbox, req: Request, ver: str, obj: str, field: str, value: str) -> Response:
        name = _object(sb, obj)
        body = await read_json(req, SALESFORCE)
        ext = _ext_field(sb, name, field)
        if not isinstance(body, dict):
            raise BadRequest(sf_error(400, "JSON_PARSER_ERROR", "expected a JSON object"))
        try:
            res = write_rows(sb, name, [{**body, ext: value}], "upsert", ext)[0]
        except FieldError as exc:
            raise _field_error(exc) from exc
        return _single(res, created_status=201, updated_status=200)

    @r.add(SALESFORCE, "GET", V + r"/sobjects/(?P<obj>\w+)/(?P<field>\w+)/(?P<value>[^/]+)", "sf.get_by_ext")
    async def get_by_ext(sb: Sandbox, req: Request, ver: str, obj: str, field: str, value: str) -> Response:
        name = _object(sb, obj)
        ext = _ext_field(sb, name, field)
        ids = sb.store.lookup(SALESFORCE, name, ext, [value]).get(value.lower(), [])
        recs = [r for r in sb.store.get_many(SALESFORCE, name, ids).values() if not r.deleted]
        if not recs:
            raise BadRequest(sf_error(404, "NOT_FOUND", "The requested resource does not exist"))
        if len(recs) > 1:
            return json_response([f"/services/data/v{ver}/sobjects/{name}/{r.id}" for r in recs], 300)
        return json_response(record_json(sb, name, recs[0], ver))

    @r.add(SALESFORCE, "GET", V + r"/sobjects/(?P<obj>\w+)/(?P<id>\w{15,18})", "sf.get")
    async def get(sb: Sandbox, req: Request, ver: str, obj: str, id: str) -> Response:
        name = _object(sb, obj)
        rec = sb.store.get(SALESFORCE, name, id)
        if rec is None or rec.deleted:
            raise BadRequest(sf_error(404, "NOT_FOUND", "The requested resource does not exist"))
        return json_response(record_json(sb, name, rec, ver))

    @r.add(SALESFORCE, "PATCH", V + r"/sobjects/(?P<obj>\w+)/(?P<id>\w{15,18})", "sf.update", write=True)
    async def update(sb: Sandbox, req: Request, ver: str, obj: str, id: str) -> Response:
        name = _object(sb, obj)
        body = await read_json(req, SALESFORCE)
        try:
            res = write_rows(sb, name, [{**body, "Id": id}], "update")[0]
        except FieldError as exc:
            raise _field_error(exc) from exc
        return _single(res, created_status=204, updated_status=204)

    @r.add(SALESFORCE, "DELETE", V + r"/sobjects/(?P<obj>\w+)/(?P<id>\w{15,18})", "sf.delete", write=True)
    async def delete(sb: Sandbox, req: Request, ver: str, obj: str, id: str) -> Response:
        name = _object(sb, obj)
        res = write_rows(sb, name, [{"Id": id}], "delete")[0]
        return _single(res, created_status=204, updated_status=204)

    @r.add(SALESFORCE, "POST", V + r"/sobjects/(?P<obj>\w+)", "sf.create", write=True)
    async def create(sb: Sandbox, req: Request, ver: str, obj: str) -> Response:
        name = _object(sb, obj)
        body = await read_json(req, SALESFORCE)
        try:
            res = write_rows(sb, name, [body], "insert")[0]
        except FieldError as exc:
            raise _field_error(exc) from exc
        return _single(res, created_status=201, updated_status=201, with_created=False)

    @r.add(
        SALESFORCE, "PATCH", V + r"/composite/sobjects/(?P<obj>\w+)/(?P<field>\w+)", "sf.collections_upsert", write=True
    )
    async def collections_upsert(sb: Sandbox, req: Request, ver: str, obj: str, field: str) -> Response:
        name = _object(sb, obj)
        ext = _ext_field(sb, name, field)
        records, all_or_none = await _collection(req, name)
        try:
            results = write_rows(sb, name, records, "upsert", ext, all_or_none)
        except FieldError as exc:
            raise _field_error(exc) from exc
        return json_response([r.as_dict() for r in results])

    @r.add(SALESFORCE, "PATCH", V + r"/composite/sobjects", "sf.collections_update", write=True)
    async def collections_update(sb: Sandbox, req: Request, ver: str) -> Response:
        return await _collection_by_type(sb, req, "update")

    @r.add(SALESFORCE, "POST", V + r"/composite/sobjects", "sf.collections_create", write=True)
    async def collections_create(sb: Sandbox, req: Request, ver: str) -> Response:
        return await _collection_by_type(sb, req, "insert")

    @r.add(SALESFORCE, "POST", r"/services/oauth2/token", "sf.oauth_token", auth=False, billable=False)
    async def oauth_token(sb: Sandbox, req: Request) -> Response:
        form = parse_qs((await req.body()).decode())
        grant = form.get("grant_type", [""])[0]
        refresh = form.get("refresh_token", [""])[0]
        allowed = sb.settings.get("oauth_refresh_tokens") or []
        if grant not in ("refresh_token", "client_credentials") or (
            grant == "refresh_token" and (not refresh or (allowed and refresh not in allowed))
        ):
            return json_response({"error": "invalid_grant", "error_description": "expired access/refresh token"}, 400)
        if not form.get("client_id", [""])[0]:
            return json_response({"error": "invalid_client_id", "error_description": "client identifier invalid"}, 400)
        token = (sb.settings.get("salesforce_tokens") or ["*"])[0]
        base = f"{req.url.scheme}://{req.url.netloc}"
        return json_response(
            {
                "access_token": token,
                "instance_url": base,
                "id": f"{base}/id/00DSANDBOX/005SANDBOX",
                "token_type": "Bearer",
                "issued_at": str(sb.now_ms()),
                "signature": "sandbox",
            }
        )


def _ext_field(sb: Sandbox, obj: str, field: str) -> str:
    d = sb.fields(SALESFORCE, obj).get(field.lower())
    if d is None or not (d.get("externalId") or d.get("idLookup")):
        raise BadRequest(
            sf_error(404, "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {field}")
        )
    return str(d["name"])


def _single(res: RowResult, created_status: int, updated_status: int, with_created: bool = True) -> Response:
    if not res.success:
        err = res.errors[0]
        status = 404 if err["statusCode"] == "INVALID_CROSS_REFERENCE_KEY" else 400
        return sf_error(status, err["statusCode"], err["message"], err.get("fields"))
    status = created_status if res.created else updated_status
    if status == 204:
        return Response(status_code=204)
    return json_response(res.as_dict(with_created), status)


async def _collection(req: Request, obj: str) -> tuple[list[dict[str, Any]], bool]:
    body = await read_json(req, SALESFORCE)
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise BadRequest(sf_error(400, "JSON_PARSER_ERROR", 'expected {"allOrNone": …, "records": [...]}'))
    records = body["records"]
    if len(records) > MAX_COLLECTION:
        raise BadRequest(
            sf_error(
                400,
                "EXCEEDED_ID_LIMIT",
                f"You cannot submit more than {MAX_COLLECTION} records in a single sObject Collections request",
            )
        )
    obj_low = obj.lower()
    for rec in records:
        t = (rec.get("attributes") or {}).get("type")
        if not t:
            raise BadRequest(sf_error(400, "INVALID_TYPE", "Must send a concrete entity type.", ["attributes"]))
        if obj and t.lower() != obj_low:
            raise BadRequest(sf_error(400, "INVALID_TYPE", f"record type {t} does not match the URI type {obj}"))
    return records, bool(body.get("allOrNone"))


async def _collection_by_type(sb: Sandbox, req: Request, op: str) -> Response:
    records, all_or_none = await _collection(req, "")
    types = {(r.get("attributes") or {}).get("type", "") for r in records}
    if len(types) > 1:
        raise BadRequest(sf_error(400, "INVALID_TYPE", "the sandbox supports one sObject type per request"))
    if not records:
        return json_response([])
    name = _object(sb, types.pop())
    rows = [{("Id" if k.lower() == "id" else k): v for k, v in r.items()} for r in records]
    try:
        results = write_rows(sb, name, rows, op, all_or_none=all_or_none)
    except FieldError as exc:
        raise _field_error(exc) from exc
    return json_response([r.as_dict(with_created=False) for r in results])


def _run_query(sb: Sandbox, req: Request, ver: str, text: str, include_deleted: bool) -> Response:
    try:
        q = soql.parse(text)
    except soql.SoqlError as exc:
        raise BadRequest(sf_error(400, exc.code, str(exc))) from exc
    obj = sb.canonical_object(SALESFORCE, q.obj)
    if obj is None:
        raise BadRequest(sf_error(400, "INVALID_TYPE", f"sObject type '{q.obj}' is not supported."))
    fs = sb.fields(SALESFORCE, obj)
    for n in [*q.fields, *(c.field for c in q.where), *(o[0] for o in q.order)]:
        if n.lower() not in fs:
            raise BadRequest(
                sf_error(
                    400,
                    "INVALID_FIELD",
                    f"No such column '{n}' on entity '{obj}'. If you are "
                    "attempting to use a custom field, be sure to append the '__c' after the custom "
                    "field name.",
                    [n],
                )
            )
    for c in q.where:
        c.field = fs[c.field.lower()]["name"]
        if c.kind == "datetime" or (c.kind == "date" and fs[c.field.lower()]["type"] == "datetime"):
            c.value = parse_ts(c.value)
    where, params, rest = ["AND deleted = 0"] if not include_deleted else [], [], []
    for c in q.where:
        col = _PUSHDOWN.get(c.field.lower())
        if col and c.op in ("=", "!=", "<", "<=", ">", ">=") and c.value is not None:
            where.append(f"AND {col} {c.op} ?")
            params.append(int(c.value) if isinstance(c.value, bool) else c.value)
        else:
            rest.append(c)
    order_sql = None
    if not q.order:
        order_sql = "rid"
    elif len(q.order) == 1 and q.order[0][0].lower() in _PUSHDOWN:
        order_sql = f"{_PUSHDOWN[q.order[0][0].lower()]} {'DESC' if q.order[0][1] else 'ASC'}, rid"
    if not rest and order_sql:
        rids = sb.store.select_rids(
            SALESFORCE, obj, " ".join(where), tuple(params), order_sql, -1 if q.limit is None else q.limit + q.offset
        )[q.offset :]
    else:
        rids = _filter_sort(sb, obj, q, " ".join(where), tuple(params), rest)
    batch = 2000
    opts = req.headers.get("sforce-query-options", "")
    if "batchsize=" in opts.lower():
        batch = max(200, min(2000, int(opts.lower().split("batchsize=")[1].split(",")[0].strip())))
    batch = min(batch, int(sb.settings.get("query_batch_size") or 2000))
    cur = {"obj": obj, "rids": rids, "fields": [fs[f.lower()]["name"] for f in q.fields], "batch": batch}
    locator = sb.put_cursor(cur) if len(rids) > batch else ""
    return _page(sb, cur, locator, 0, ver, "queryAll" if include_deleted else "query")


def _filter_sort(
    sb: Sandbox, obj: str, q: soql.Query, where: str, params: tuple[Any, ...], rest: list[soql.Cond]
) -> list[int]:
    fs = sb.fields(SALESFORCE, obj)
    hits: list[tuple[dict[str, Any], int]] = []
    for recs in _chunks(sb, obj, where, params):
        for rec in recs:
            vals = {d["name"]: typed(d, rec) for d in fs.values()}
            if soql.matches(vals, rest):
                hits.append(({o: vals[fs[o.lower()]["name"]] for o, _ in q.order}, rec.rid or 0))
    for name, desc in reversed(q.order):
        hits.sort(key=_order_key(name), reverse=desc)
    rids = [rid for _, rid in hits][q.offset :]
    return rids if q.limit is None else rids[: q.limit]


def _order_key(name: str) -> Callable[[tuple[dict[str, Any], int]], tuple[bool, Any]]:
    """Sort key on field ``name`` of a hit (nulls first)."""
    return lambda h: (h[0][name] is not None, h[0][name] if h[0][name] is not None else 0)


def _chunks(sb: Sandbox, obj: str, where: str, params: tuple[Any, ...]) -> Any:
    last = 0
    while True:
        recs = sb.store.select(SALESFORCE, obj, f"{where} AND rid > ?", (*params, last), "rid", 5000)
        if not recs:
            return
        yield recs
        last = recs[-1].rid or 0


def _page(sb: Sandbox, cur: dict[str, Any], locator: str, pos: int, ver: str, kind: str) -> Response:
    rids = cur["rids"]
    end = min(len(rids), pos + cur["batch"])
    recs = sb.store.by_rids(rids[pos:end])
    body: dict[str, Any] = {
        "totalSize": len(rids),
        "done": end >= len(rids),
        "records": [record_json(sb, cur["obj"], r, ver, cur["fields"]) for r in recs],
    }
    if end < len(rids):
        body["nextRecordsUrl"] = f"/services/data/v{ver}/{kind}/{locator}-{end}"
    return json_response(body)
