"""HubSpot CRM v3 routes: properties, batch upsert/update/create/read, single objects, list, search."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from sandbox import hs_core as core
from sandbox.app import BadRequest, Router, read_json
from sandbox.defaults import HUBSPOT, hs_property
from sandbox.hs_search import search
from sandbox.records import Rec, key_values
from sandbox.runtime import Sandbox
from sandbox.util import hs_error, hs_time, json_response

P = r"/crm/v3/properties/(?P<obj>[\w-]+)"
O = r"/crm/v3/objects/(?P<obj>[\w-]+)"  # noqa: E741
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,99}$")
_TYPES = ("string", "number", "date", "datetime", "enumeration", "bool", "phone_number")


def _inputs(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise BadRequest(hs_error(400, "VALIDATION_ERROR", 'Invalid input JSON: expected {"inputs": [...]}'))
    inputs = body["inputs"]
    if len(inputs) > core.MAX_BATCH:
        raise BadRequest(
            hs_error(
                400, "VALIDATION_ERROR", f"Batch size of {len(inputs)} exceeds the maximum of {core.MAX_BATCH} inputs"
            )
        )
    return inputs


def _write(sb: Sandbox, obj: str, recs: list[Rec]) -> None:
    with sb.store.tx() as tx:
        tx.write(HUBSPOT, obj, recs, sb.key_fields(HUBSPOT, obj))


def _property_json(body: Any, now: int) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(hs_error(400, "VALIDATION_ERROR", "Invalid input JSON"))
    missing = [k for k in ("name", "label", "type", "fieldType", "groupName") if not body.get(k)]
    if missing:
        raise BadRequest(hs_error(400, "VALIDATION_ERROR", f"Missing required fields: {missing}"))
    if not _NAME_RE.match(str(body["name"])):
        raise BadRequest(
            hs_error(
                400,
                "VALIDATION_ERROR",
                f"Property name {body['name']!r} must be lower case "
                "letters, digits and underscores, starting with a letter",
            )
        )
    if body["type"] not in _TYPES:
        raise BadRequest(hs_error(400, "VALIDATION_ERROR", f"type {body['type']!r} is not one of {list(_TYPES)}"))
    prop = hs_property(
        body["name"],
        body["type"],
        body["fieldType"],
        unique=bool(body.get("hasUniqueValue")),
        hubspot_defined=False,
        options=body.get("options") or [],
        group=body["groupName"],
        label=body["label"],
        created=hs_time(now),
    )
    prop["description"] = body.get("description", "")
    prop["formField"] = bool(body.get("formField", False))
    return prop


def register(r: Router) -> None:
    @r.add(HUBSPOT, "POST", P, "hs.property_create", write=True)
    async def property_create(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        prop = _property_json(await read_json(req, HUBSPOT), sb.now_ms())
        if prop["name"].lower() in sb.fields(HUBSPOT, name):
            return hs_error(409, "OBJECT_ALREADY_EXISTS", f"Property named '{prop['name']}' already exists.")
        sb.store.put_field(HUBSPOT, name, prop)
        if prop["hasUniqueValue"]:
            sb.store.reindex(HUBSPOT, name, sb.key_fields(HUBSPOT, name))
        return json_response(prop, 201)

    @r.add(HUBSPOT, "POST", P + r"/batch/create", "hs.property_batch_create", write=True)
    async def property_batch_create(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        started = sb.now_ms()
        results, errors = [], []
        for item in _inputs(await read_json(req, HUBSPOT)):
            prop = _property_json(item, started)
            if prop["name"].lower() in sb.fields(HUBSPOT, name):
                errors.append(
                    core.record_error(
                        f"Property named '{prop['name']}' already exists.", [prop["name"]], "OBJECT_ALREADY_EXISTS"
                    )
                )
                continue
            sb.store.put_field(HUBSPOT, name, prop)
            results.append(prop)
        sb.store.reindex(HUBSPOT, name, sb.key_fields(HUBSPOT, name))
        return json_response(core.batch_envelope(sb, results, errors, started), 207 if errors else 201)

    @r.add(HUBSPOT, "GET", P, "hs.property_list")
    async def property_list(sb: Sandbox, req: Request, obj: str) -> Response:
        return json_response({"results": list(sb.fields(HUBSPOT, core.object_type(sb, obj)).values())})

    @r.add(HUBSPOT, "GET", P + r"/(?P<prop>\w+)", "hs.property_get")
    async def property_get(sb: Sandbox, req: Request, obj: str, prop: str) -> Response:
        d = sb.fields(HUBSPOT, core.object_type(sb, obj)).get(prop.lower())
        if d is None:
            return hs_error(404, "OBJECT_NOT_FOUND", f"Unable to find property {prop}")
        return json_response(d)

    @r.add(HUBSPOT, "PATCH", P + r"/(?P<prop>\w+)", "hs.property_update", write=True)
    async def property_update(sb: Sandbox, req: Request, obj: str, prop: str) -> Response:
        name = core.object_type(sb, obj)
        d = sb.fields(HUBSPOT, name).get(prop.lower())
        if d is None:
            return hs_error(404, "OBJECT_NOT_FOUND", f"Unable to find property {prop}")
        body = await read_json(req, HUBSPOT) or {}
        allowed = (
            "label",
            "description",
            "groupName",
            "options",
            "displayOrder",
            "hidden",
            "formField",
            "type",
            "fieldType",
        )
        d = {**d, **{k: v for k, v in body.items() if k in allowed}, "updatedAt": hs_time(sb.now_ms())}
        sb.store.put_field(HUBSPOT, name, d)
        return json_response(d)

    @r.add(HUBSPOT, "DELETE", P + r"/(?P<prop>\w+)", "hs.property_archive", write=True)
    async def property_archive(sb: Sandbox, req: Request, obj: str, prop: str) -> Response:
        name = core.object_type(sb, obj)
        if not sb.store.drop_field(HUBSPOT, name, prop):
            return hs_error(404, "OBJECT_NOT_FOUND", f"Unable to find property {prop}")
        return Response(status_code=204)

    @r.add(HUBSPOT, "POST", O + r"/batch/upsert", "hs.batch_upsert", write=True)
    async def batch_upsert(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        inputs = _inputs(await read_json(req, HUBSPOT))
        started = sb.now_ms()
        props = core.validate_batch(sb, name, inputs)
        canon = {p: core.unique_property(sb, name, p) for p in {i.get("idProperty") for i in inputs}}
        id_props = [canon[i.get("idProperty")] for i in inputs]
        keys = [str(i.get("id", "")) for i in inputs]
        if any(not k for k in keys):
            return hs_error(400, "VALIDATION_ERROR", "every input needs an id")
        lowered = [k.lower() for k in keys]
        if len(set(lowered)) != len(lowered):
            seen = Counter(lowered)
            dup = sorted({k for k, low in zip(keys, lowered, strict=True) if seen[low] > 1})
            return hs_error(400, "VALIDATION_ERROR", f"Duplicate IDs found in batch input: {dup}")
        found: dict[tuple[str, str], Rec] = {}
        for idp in set(id_props):
            vals = keys if len(canon) == 1 else [k for k, p in zip(keys, id_props, strict=True) if p == idp]
            found.update({(idp, v): rec for v, rec in core.find(sb, name, idp, vals).items()})
        key_fields = sb.key_fields(HUBSPOT, name)
        # a key property written (other than the id property a record was matched on): compare keys
        written_keys = set().union(*props) & set(key_fields)
        old_keys = (
            {rec.id: key_values(rec, key_fields) for rec in found.values()} if written_keys else None
        )  # taken before any change
        results, errors, writes = [], [], []
        fresh = iter(
            core.new_ids(
                sb,
                sum(
                    1 for low, i in zip(lowered, id_props, strict=True) if (i, low) not in found and i != "hs_object_id"
                ),
            )
        )
        for key, low, idp, p in zip(keys, lowered, id_props, props, strict=True):
            rec = found.get((idp, low))
            is_new = rec is None
            if rec is None:
                if idp == "hs_object_id":
                    errors.append(core.record_error(f"Object with id {key} not found", [key], "OBJECT_NOT_FOUND"))
                    continue
                rec = core.new_record(sb, started, next(fresh))
                p = {**p, idp: key}
            if sb.rules:
                merged = {**rec.data, **{k: v for k, v in p.items() if v is not None}}
                rule = sb.record_failure(HUBSPOT, name, merged, key)
                if rule is not None:
                    errors.append(core.record_error(rule.message, [key], code=rule.error_code))
                    continue
            core.apply(rec, p, started)
            writes.append(rec)
            results.append(core.written(rec, p, idp, key, is_new))
        existing = {rec.id for rec in found.values()}
        with sb.store.tx() as tx:
            if old_keys is not None:
                tx.write(HUBSPOT, name, writes, key_fields, old_keys)
            else:  # only new records (their id property) get key index rows
                tx.write(HUBSPOT, name, writes, key_fields, reindex=[r for r in writes if r.id not in existing])
        return json_response(core.batch_envelope(sb, results, errors, started), 207 if errors else 200)

    @r.add(HUBSPOT, "POST", O + r"/batch/update", "hs.batch_update", write=True)
    async def batch_update(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        inputs = _inputs(await read_json(req, HUBSPOT))
        started = sb.now_ms()
        props = core.validate_batch(sb, name, inputs)
        results, errors, writes = [], [], []
        for item, p in zip(inputs, props, strict=True):
            idp = core.unique_property(sb, name, item.get("idProperty"))
            key = str(item.get("id", ""))
            rec = core.find(sb, name, idp, [key]).get(key.lower())
            if rec is None:
                errors.append(
                    core.record_error(
                        f"Could not get some {name} objects, they may be deleted or not "
                        f"exist. Check that ids are valid.",
                        [key],
                        "OBJECT_NOT_FOUND",
                    )
                )
                continue
            rule = sb.record_failure(HUBSPOT, name, {**rec.data, **p}, key)
            if rule is not None:
                errors.append(core.record_error(rule.message, [key], code=rule.error_code))
                continue
            writes.append(core.apply(rec, p, started))
            results.append(core.render(sb, name, rec, list(p)))
        _write(sb, name, writes)
        return json_response(core.batch_envelope(sb, results, errors, started), 207 if errors else 200)

    @r.add(HUBSPOT, "POST", O + r"/batch/create", "hs.batch_create", write=True)
    async def batch_create(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        inputs = _inputs(await read_json(req, HUBSPOT))
        started = sb.now_ms()
        props = core.validate_batch(sb, name, inputs)
        results, writes = [], []
        fresh = iter(core.new_ids(sb, len(props)))
        for p in props:
            rec = core.apply(core.new_record(sb, started, next(fresh)), p, started)
            writes.append(rec)
            results.append(core.render(sb, name, rec, list(p)))
        _write(sb, name, writes)
        return json_response(core.batch_envelope(sb, results, [], started), 201)

    @r.add(HUBSPOT, "POST", O + r"/batch/read", "hs.batch_read")
    async def batch_read(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        body = await read_json(req, HUBSPOT)
        inputs = _inputs(body)
        started = sb.now_ms()
        idp = core.unique_property(sb, name, body.get("idProperty"))
        keys = [str(i.get("id", "")) for i in inputs]
        found = core.find(sb, name, idp, keys)
        results = [core.render(sb, name, found[k.lower()], body.get("properties")) for k in keys if k.lower() in found]
        missing = [k for k in keys if k.lower() not in found]
        errors = (
            [core.record_error(f"Could not get some {name} objects", missing, "OBJECT_NOT_FOUND")] if missing else []
        )
        return json_response(core.batch_envelope(sb, results, errors, started), 207 if errors else 200)

    @r.add(HUBSPOT, "POST", O + r"/search", "hs.search")
    async def do_search(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        return json_response(search(sb, name, await read_json(req, HUBSPOT) or {}))

    @r.add(HUBSPOT, "GET", O, "hs.get_page")
    async def get_page(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        qs = parse_qs(req.url.query)
        limit = int(qs.get("limit", ["10"])[0])
        if not 1 <= limit <= 100:
            return hs_error(400, "VALIDATION_ERROR", f"limit must be between 1 and 100, got {limit}")
        after = int(qs.get("after", ["0"])[0] or 0)
        archived = qs.get("archived", ["false"])[0].lower() == "true"
        names = [p for v in qs.get("properties", []) for p in v.split(",") if p] or None
        recs = sb.store.select(HUBSPOT, name, "AND deleted = ? AND rid >= ?", (int(archived), after), "rid", limit + 1)
        body: dict[str, Any] = {"results": [core.render(sb, name, rec, names) for rec in recs[:limit]]}
        if len(recs) > limit:
            nxt = str(recs[limit].rid)
            body["paging"] = {"next": {"after": nxt, "link": f"{req.url.path}?after={nxt}"}}
        return json_response(body)

    @r.add(HUBSPOT, "POST", O, "hs.create", write=True)
    async def create(sb: Sandbox, req: Request, obj: str) -> Response:
        name = core.object_type(sb, obj)
        body = await read_json(req, HUBSPOT) or {}
        started = sb.now_ms()
        p = core.validate_batch(sb, name, [body])[0]
        for key in sb.key_fields(HUBSPOT, name):
            if p.get(key) and core.find(sb, name, key, [str(p[key])]):
                return hs_error(409, "CONFLICT", f"Contact already exists. Existing ID: {p[key]}")
        rec = core.apply(core.new_record(sb, started), p, started)
        _write(sb, name, [rec])
        return json_response(core.render(sb, name, rec, list(p)), 201)

    @r.add(HUBSPOT, "GET", O + r"/(?P<key>[^/]+)", "hs.get")
    async def get(sb: Sandbox, req: Request, obj: str, key: str) -> Response:
        name = core.object_type(sb, obj)
        qs = parse_qs(req.url.query)
        idp = core.unique_property(sb, name, qs.get("idProperty", [None])[0])
        rec = core.find(sb, name, idp, [key]).get(key.lower())
        if rec is None:
            return hs_error(404, "OBJECT_NOT_FOUND", f"Object not found. objectId are usually numeric: {key}")
        names = [p for v in qs.get("properties", []) for p in v.split(",") if p] or None
        return json_response(core.render(sb, name, rec, names))

    @r.add(HUBSPOT, "PATCH", O + r"/(?P<key>[^/]+)", "hs.update", write=True)
    async def update(sb: Sandbox, req: Request, obj: str, key: str) -> Response:
        name = core.object_type(sb, obj)
        idp = core.unique_property(sb, name, parse_qs(req.url.query).get("idProperty", [None])[0])
        body = await read_json(req, HUBSPOT) or {}
        p = core.validate_batch(sb, name, [body])[0]
        rec = core.find(sb, name, idp, [key]).get(key.lower())
        if rec is None:
            return hs_error(404, "OBJECT_NOT_FOUND", f"resource not found: {key}")
        rule = sb.record_failure(HUBSPOT, name, {**rec.data, **p}, key)
        if rule is not None:
            return hs_error(400, "VALIDATION_ERROR", rule.message, subCategory=rule.error_code)
        started = sb.now_ms()
        _write(sb, name, [core.apply(rec, p, started)])
        return json_response(core.render(sb, name, rec, list(p)))

    @r.add(HUBSPOT, "DELETE", O + r"/(?P<key>[^/]+)", "hs.archive", write=True)
    async def archive(sb: Sandbox, req: Request, obj: str, key: str) -> Response:
        name = core.object_type(sb, obj)
        rec = core.find(sb, name, "hs_object_id", [key]).get(key.lower())
        if rec is not None:
            rec.deleted, rec.modstamp = True, sb.now_ms()
            _write(sb, name, [rec])
        return Response(status_code=204)
