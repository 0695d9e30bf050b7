"""``/__control/*``: the test and demo API (never metered, never authenticated, never faulted).

GET  health | settings | requests[?log=N&vendor=] | records?vendor&object[&limit&offset&include_deleted]
     | schema?vendor&object | faults | record_failures | jobs
POST reset | settings {…} | budget {vendor, daily_limit?, used?}
     | rate_limit {ten_second_limit, window_ms?, retry_after?}
     | seed {vendor, object, count, start?, fields?, modstamp?, step_ms?}
     | records {vendor, object, records:[…]} (load as-is, system fields allowed)
     | delete {vendor, object, ids, hard?} | schema {vendor, object, fields:[…], drop:[…]}
     | fault {path, method, status, body, headers, count, skip, delay, vendor}
     | record_failures {vendor, object, field, values|regex, error_code, message, count}
DELETE faults | record_failures
"""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sandbox import defaults
from sandbox.defaults import HUBSPOT, SALESFORCE
from sandbox.records import Rec
from sandbox.runtime import Fault, RecordRule, Sandbox
from sandbox.sf_core import SYSTEM_LOWER, new_ids
from sandbox.util import hs_time, json_response, parse_ts, sf_time


class ControlError(Exception):
    pass


def _vendor_obj(sb: Sandbox, body: dict[str, Any], create: bool = False) -> tuple[str, str]:
    vendor = str(body.get("vendor", ""))
    if vendor not in (SALESFORCE, HUBSPOT):
        raise ControlError(f"vendor must be 'salesforce' or 'hubspot', got {vendor!r}")
    obj = str(body.get("object", ""))
    canon = sb.canonical_object(vendor, obj)
    if canon is None and not create:
        raise ControlError(f"{vendor} has no object {obj!r}; known: {sb.store.objects(vendor)}")
    return vendor, canon or obj


def flat(sb: Sandbox, vendor: str, obj: str, rec: Rec) -> dict[str, Any]:
    """A record as tests want to see it: every field, system fields included."""
    if vendor == SALESFORCE:
        return {
            "Id": rec.id,
            "IsDeleted": rec.deleted,
            "CreatedDate": sf_time(rec.created),
            "LastModifiedDate": sf_time(rec.modstamp),
            "SystemModstamp": sf_time(rec.modstamp),
            **rec.data,
        }
    props = {
        "hs_object_id": rec.id,
        "createdate": hs_time(rec.created),
        "lastmodifieddate": hs_time(rec.modstamp),
        "hs_lastmodifieddate": hs_time(rec.modstamp),
        **rec.data,
    }
    return {"id": rec.id, "archived": rec.deleted, "properties": props}


def load_records(
    sb: Sandbox, vendor: str, obj: str, records: list[dict[str, Any]], modstamp: int | None, step_ms: int = 0
) -> list[str]:
    now = sb.now_ms() if modstamp is None else modstamp
    fs = sb.fields(vendor, obj)
    writes: list[Rec] = []
    sf_new = iter(new_ids(sb, obj, sum(1 for r in records if not r.get("Id")))) if vendor == SALESFORCE else None
    for i, raw in enumerate(records):
        stamp = now + i * step_ms
        if vendor == SALESFORCE:
            data = {
                fs[k.lower()]["name"]: v
                for k, v in raw.items()
                if k.lower() not in SYSTEM_LOWER | {"id"} and v is not None and _known(fs, k, vendor, obj)
            }
            rid = raw.get("Id") or next(sf_new)  # type: ignore[arg-type]
            mod = parse_ts(raw["SystemModstamp"]) if raw.get("SystemModstamp") else stamp
            created = parse_ts(raw["CreatedDate"]) if raw.get("CreatedDate") else mod
            deleted = bool(raw.get("IsDeleted"))
        else:
            props = dict(raw.get("properties") or {k: v for k, v in raw.items() if k not in ("id", "archived")})
            mod = parse_ts(props.pop("hs_lastmodifieddate")) if props.get("hs_lastmodifieddate") else stamp
            created = parse_ts(props.pop("createdate")) if props.get("createdate") else mod
            props.pop("lastmodifieddate", None)
            props.pop("hs_object_id", None)
            data = {
                fs[k.lower()]["name"]: str(v) for k, v in props.items() if v is not None and _known(fs, k, vendor, obj)
            }
            rid = str(raw.get("id") or sb.store.next_seq("hs:object", start=1001))
            deleted = bool(raw.get("archived"))
        writes.append(Rec(str(rid), created, mod, deleted, data))
    with sb.store.tx() as tx:
        tx.write(vendor, obj, writes, sb.key_fields(vendor, obj))
    return [w.id for w in writes]


def _known(fs: dict[str, Any], name: str, vendor: str, obj: str) -> bool:
    if name.lower() not in fs:
        raise ControlError(f"{vendor} {obj} has no field {name!r}; add it with POST /__control/schema")
    return True


def _schema_def(vendor: str, spec: dict[str, Any]) -> dict[str, Any]:
    if vendor == SALESFORCE:
        return defaults.sf_field(
            spec["name"],
            spec.get("type", "string"),
            external_id=bool(spec.get("externalId")),
            required=bool(spec.get("required")),
            unique=bool(spec.get("unique")),
            picklist=spec.get("picklist"),
            restricted=bool(spec.get("restricted")),
            length=int(spec.get("length", 255)),
        )
    return defaults.hs_property(
        spec["name"],
        spec.get("type", "string"),
        spec.get("fieldType", "text"),
        unique=bool(spec.get("hasUniqueValue")),
        hubspot_defined=False,
        options=spec.get("options"),
        group=spec.get("groupName", "contactinformation"),
    )


async def handle(sb: Sandbox, req: Request) -> Response:
    try:
        return await _dispatch(sb, req)
    except ControlError as exc:
        return json_response({"error": str(exc)}, 400)
    except (KeyError, TypeError, ValueError) as exc:
        return json_response({"error": f"bad control request: {type(exc).__name__}: {exc}"}, 400)


async def _dispatch(sb: Sandbox, req: Request) -> Response:
    action = req.url.path.removeprefix("/__control").strip("/")
    method = req.method
    q = req.query_params
    body: dict[str, Any] = (await req.json() if (await req.body()) else {}) if method in ("POST", "PUT") else {}
    if action == "health":
        return json_response(
            {"status": "ok", "pid": os.getpid(), "state_dir": str(sb.state_dir), "vendors": [SALESFORCE, HUBSPOT]}
        )
    if action == "reset" and method == "POST":
        sb.reset()
        return json_response({"reset": True})
    if action == "settings":
        if method == "POST":
            return json_response(sb.update_settings(body))
        return json_response(sb.settings)
    if action == "budget" and method == "POST":
        vendor = body["vendor"]
        if "daily_limit" in body:
            sb.update_settings({f"{vendor}_daily_limit": int(body["daily_limit"])})
        if "used" in body:
            sb.usage(vendor)
            sb.counters[vendor]["api_usage"] = int(body["used"])
            sb._dirty = True
        return json_response({"used": sb.usage(vendor), "limit": sb.daily_limit(vendor)})
    if action == "rate_limit" and method == "POST":
        sb.window.clear()
        changes: dict[str, Any] = {"hubspot_ten_second_limit": int(body["ten_second_limit"])}
        if body.get("window_ms") is not None:
            changes["hubspot_rate_window_ms"] = int(body["window_ms"])
        if body.get("retry_after") is not None:
            changes["hubspot_retry_after"] = bool(body["retry_after"])
        return json_response(sb.update_settings(changes))
    if action == "requests":
        out: dict[str, Any] = {
            v: {**sb.counters[v], "api_usage": sb.usage(v), "daily_limit": sb.daily_limit(v)}
            for v in (SALESFORCE, HUBSPOT)
        }
        n = int(q.get("log", "0"))
        if n:
            entries = [e for e in sb.log if not q.get("vendor") or e["vendor"] == q.get("vendor")]
            out["log"] = entries[-n:]
        return json_response(out)
    if action == "records" and method == "GET":
        vendor, obj = _vendor_obj(sb, dict(q))
        where = "" if q.get("include_deleted") in ("1", "true") else "AND deleted = 0"
        limit, offset = int(q.get("limit", "-1")), int(q.get("offset", "0"))
        recs = sb.store.select(vendor, obj, where, (), "rid", limit, offset)
        return json_response(
            {"total": sb.store.count(vendor, obj, where), "records": [flat(sb, vendor, obj, r) for r in recs]}
        )
    if action == "records" and method == "POST":
        vendor, obj = _vendor_obj(sb, body)
        stamp = parse_ts(body["modstamp"]) if body.get("modstamp") else None
        ids = load_records(sb, vendor, obj, list(body["records"]), stamp, int(body.get("step_ms", 0)))
        return json_response({"ids": ids})
    if action == "seed" and method == "POST":
        vendor, obj = _vendor_obj(sb, body)
        start, count = int(body.get("start", 1)), int(body["count"])
        template: dict[str, Any] = body.get("fields") or {}
        seeds: list[dict[str, Any]] = []
        for i in range(start, start + count):
            base = defaults.seed_values(vendor, obj, i)
            base.update({k: (v.format(i=i) if isinstance(v, str) else v) for k, v in template.items()})
            seeds.append(base)
        stamp = parse_ts(body["modstamp"]) if body.get("modstamp") else None
        ids = load_records(sb, vendor, obj, seeds, stamp, int(body.get("step_ms", 0)))
        return json_response(
            {"count": len(ids), "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}
        )
    if action == "delete" and method == "POST":
        vendor, obj = _vendor_obj(sb, body)
        ids = [str(i) for i in body["ids"]]
        with sb.store.tx() as tx:
            if body.get("hard"):
                tx.delete_hard(vendor, obj, ids)
            else:
                now = sb.now_ms()
                recs = list(sb.store.get_many(vendor, obj, ids).values())
                for r in recs:
                    r.deleted, r.modstamp = True, now
                tx.write(vendor, obj, recs, sb.key_fields(vendor, obj))
        return json_response({"deleted": len(ids)})
    if action == "schema":
        if method == "POST":
            vendor, obj = _vendor_obj(sb, body, create=True)
            if vendor == SALESFORCE and sb.canonical_object(vendor, obj) is None:
                for f in defaults.salesforce_objects()["Account"][:5]:
                    sb.store.put_field(vendor, obj, f)
            for spec in body.get("fields") or []:
                sb.store.put_field(vendor, obj, _schema_def(vendor, spec))
            for name in body.get("drop") or []:
                sb.store.drop_field(vendor, obj, name)
            sb.store.reindex(vendor, obj, sb.key_fields(vendor, obj))
        else:
            vendor, obj = _vendor_obj(sb, dict(q))
        return json_response({"vendor": vendor, "object": obj, "fields": list(sb.fields(vendor, obj).values())})
    if action == "fault" and method == "POST":
        fault = Fault(**{k: v for k, v in body.items() if k != "hits"})
        sb.faults.append(fault)
        return json_response(fault.public())
    if action == "faults":
        if method == "DELETE":
            sb.faults.clear()
        return json_response([f.public() for f in sb.faults])
    if action == "record_failures":
        if method == "POST":
            sb.rules.append(RecordRule(**body))
        elif method == "DELETE":
            sb.rules.clear()
        return json_response([r.__dict__ for r in sb.rules])
    if action == "jobs":
        return json_response(sb.store.job_list())
    return json_response({"error": f"unknown control endpoint {method} /__control/{action}"}, 404)
