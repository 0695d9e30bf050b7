"""HubSpot record semantics: property validation, unique-property matching, rendering.

Any invalid property in a batch (unknown, read-only, bad number / option / date) fails the whole
request with 400 ``VALIDATION_ERROR`` (as HubSpot does); per-record failures from the sandbox's
failure rules or missing ids are reported in a 207 ``errors[]``.
"""

from __future__ import annotations

import json
from typing import Any

from sandbox.app import BadRequest
from sandbox.defaults import HUBSPOT
from sandbox.records import Rec
from sandbox.runtime import Sandbox
from sandbox.util import hs_error, hs_time, parse_ts

SYSTEM = ("hs_object_id", "createdate", "lastmodifieddate", "hs_lastmodifieddate")
DEFAULT_PROPS = {"contacts": ["createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname"]}
MAX_BATCH = 100


def object_type(sb: Sandbox, name: str) -> str:
    aliases = {
        "0-1": "contacts",
        "0-2": "companies",
        "0-3": "deals",
        "contact": "contacts",
        "company": "companies",
        "deal": "deals",
    }
    obj = sb.canonical_object(HUBSPOT, aliases.get(name.lower(), name))
    if obj is None:
        raise BadRequest(hs_error(400, "VALIDATION_ERROR", f"Unable to infer object type from: {name}"))
    return obj


def _invalid(name: str, error: str, message: str) -> dict[str, Any]:
    return {"isValid": False, "message": message, "error": error, "name": name, "localizedErrorMessage": message}


def normalize(defn: dict[str, Any] | None, name: str, value: Any) -> tuple[str | None, dict[str, Any] | None]:
    """(stored value or None to clear, validation problem or None)."""
    if defn is None:
        return None, _invalid(name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')
    if defn.get("modificationMetadata", {}).get("readOnlyValue"):
        return None, _invalid(name, "READ_ONLY_VALUE", f"{name} is a read only property; its value cannot be set.")
    if value is None or value == "":
        return None, None
    t = defn["type"]
    if t == "number":
        try:
            num = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            num = None
        if num is None:
            return None, _invalid(name, "INVALID_DECIMAL", f'"{value}" is not a valid number for property {name}')
        if isinstance(value, str):
            return value.strip(), None
        return (str(int(num)) if num.is_integer() and not isinstance(value, float) else repr(float(value))), None
    if t == "enumeration":
        allowed = [o["value"] for o in defn.get("options", [])]
        parts = str(value).split(";") if defn.get("fieldType") == "checkbox" else [str(value)]
        bad = [p for p in parts if p not in allowed]
        if bad:
            return None, _invalid(
                name, "INVALID_OPTION", f'"{bad[0]}" was not one of the allowed options: [{", ".join(allowed)}]'
            )
        return str(value), None
    if t in ("datetime", "date"):
        try:
            ms = parse_ts(value)
        except ValueError:
            return None, _invalid(name, "INVALID_DATE", f'"{value}" is not a valid date/datetime for {name}')
        if t == "date" and ms % 86_400_000:
            return None, _invalid(name, "INVALID_DATE", f"{value} is not at midnight UTC; {name} is a date property")
        return hs_time(ms), None
    if t == "bool":
        text = str(value).lower()
        if text not in ("true", "false"):
            return None, _invalid(name, "INVALID_BOOLEAN", f'"{value}" is not a valid boolean for {name}')
        return text, None
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if len(text) > 65536:
        return None, _invalid(name, "INVALID_STRING", f"{name}: value longer than 65536 characters")
    return text, None


_SLOW, _NUMBER, _OPTION, _TEXT = range(4)
_Step = tuple[str, int, frozenset[str], dict[str, Any] | None]


def _step(defn: dict[str, Any] | None, name: str) -> _Step:
    """How one property's values are checked: (stored name, fast-path kind, allowed options,
    definition). The fast paths answer the common cases (a float for a number, a known option, a
    plain string for a text property) exactly as :func:`normalize` would; anything else goes to it."""
    if defn is None or defn.get("modificationMetadata", {}).get("readOnlyValue"):
        return (defn["name"] if defn else name, _SLOW, frozenset(), defn)
    t = defn["type"]
    if t == "number":
        return (defn["name"], _NUMBER, frozenset(), defn)
    if t == "enumeration" and defn.get("fieldType") != "checkbox":
        return (defn["name"], _OPTION, frozenset(o["value"] for o in defn.get("options", [])), defn)
    if t not in ("enumeration", "datetime", "date", "bool"):
        return (defn["name"], _TEXT, frozenset(), defn)
    return (defn["name"], _SLOW, frozenset(), defn)


def validate_batch(sb: Sandbox, obj: str, inputs: list[dict[str, Any]]) -> list[dict[str, str | None]]:
    """Normalised properties per input; any problem fails the whole request (400)."""
    props = sb.fields(HUBSPOT, obj)
    out: list[dict[str, str | None]] = []
    problems: list[dict[str, Any]] = []
    plan: dict[str, _Step] = {}
    for item in inputs:
        given = item.get("properties") or {}
        if type(given) is not dict and not isinstance(given, dict):
            raise BadRequest(hs_error(400, "VALIDATION_ERROR", "properties must be an object"))
        norm: dict[str, str | None] = {}
        for k, v in given.items():
            step = plan.get(k)
            if step is None:
                step = plan[k] = _step(props.get(k.lower()), k)
            canon, kind, allowed, defn = step
            t = type(v)  # the common cases, answered as normalize() would (this runs per property per record)
            if kind == _NUMBER:
                if t is float:
                    norm[canon] = repr(v)
                    continue
            elif kind == _OPTION:
                if t is str and v in allowed:
                    norm[canon] = v
                    continue
            elif kind == _TEXT and t is str and v and len(v) <= 65536:
                norm[canon] = v
                continue
            value, problem = normalize(defn, k, v)
            if problem:
                problems.append(problem)
            else:
                norm[canon] = value
        out.append(norm)
    if problems:
        raise BadRequest(
            hs_error(
                400,
                "VALIDATION_ERROR",
                f"Property values were not valid: {json.dumps(problems[:20])}",
                errors=[
                    {"message": p["message"], "code": p["error"], "context": {"propertyName": [p["name"]]}}
                    for p in problems[:20]
                ],
            )
        )
    return out


def unique_property(sb: Sandbox, obj: str, name: str | None) -> str:
    if not name or name == "hs_object_id":
        return "hs_object_id"
    if name.lower() not in {k.lower() for k in sb.key_fields(HUBSPOT, obj)}:
        raise BadRequest(
            hs_error(
                400,
                "VALIDATION_ERROR",
                f"{name} is not a unique value property of {obj}; "
                "idProperty must be hs_object_id or a property with hasUniqueValue",
            )
        )
    return str(sb.fields(HUBSPOT, obj)[name.lower()]["name"])


def find(sb: Sandbox, obj: str, id_property: str, values: list[str]) -> dict[str, Rec]:
    """Live (non-archived) records by id-property value (lower-cased for unique properties)."""
    if id_property == "hs_object_id":
        recs = sb.store.get_many(HUBSPOT, obj, [str(v) for v in values])
        return {k.lower(): r for k, r in recs.items() if not r.deleted}
    out: dict[str, Rec] = {}
    for value, holders in sb.store.lookup_records(HUBSPOT, obj, id_property, values).items():
        if len(holders) == 1:  # the usual case: one record holds the value
            if not holders[0].deleted:
                out[value] = holders[0]
            continue
        live = [r for r in holders if not r.deleted]  # holders come in id order
        if live:
            out[value] = live[0]
    return out


def new_record(sb: Sandbox, now: int, id_: int | None = None) -> Rec:
    return Rec(str(id_ or sb.store.next_seq("hs:object", start=1001)), now, now, False, {})


def new_ids(sb: Sandbox, n: int) -> list[int]:
    """Reserve ``n`` record ids in one go (one sequence write instead of one per record)."""
    if n <= 0:
        return []
    first = sb.store.next_seq("hs:object", n, start=1001)
    return list(range(first, first + n))


def apply(rec: Rec, props: dict[str, str | None], now: int) -> Rec:
    for k, v in props.items():
        if v is None:
            rec.data.pop(k, None)
        else:
            rec.data[k] = v
    rec.modstamp = now
    return rec


def value_of(rec: Rec, name: str) -> str | None:
    if name == "hs_object_id":
        return rec.id
    if name == "createdate":
        return hs_time(rec.created)
    if name in ("lastmodifieddate", "hs_lastmodifieddate"):
        return hs_time(rec.modstamp)
    v = rec.data.get(name)
    return None if v is None else str(v)


def render(sb: Sandbox, obj: str, rec: Rec, names: list[str] | None = None, *, written: bool = False) -> dict[str, Any]:
    """``{id, properties, createdAt, updatedAt, archived}``; ``names`` None → the default set."""
    fs = sb.fields(HUBSPOT, obj)
    if names is None:
        names = list(rec.data) if written else DEFAULT_PROPS.get(obj, list(SYSTEM[:3]))
    wanted = [fs[n.lower()]["name"] for n in names if n.lower() in fs]
    for s in ("createdate", "hs_object_id", "lastmodifieddate"):
        if s not in wanted:
            wanted.append(s)
    out: dict[str, Any] = {
        "id": rec.id,
        "properties": {n: value_of(rec, n) for n in wanted},
        "createdAt": hs_time(rec.created),
        "updatedAt": hs_time(rec.modstamp),
        "archived": rec.deleted,
    }
    if rec.deleted:
        out["archivedAt"] = hs_time(rec.modstamp)
    return out


def written(rec: Rec, props: dict[str, str | None], id_property: str, key: str, is_new: bool) -> dict[str, Any]:
    """A batch-upsert result item: the properties written, the id property and the system ones."""
    created, modified = hs_time(rec.created), hs_time(rec.modstamp)
    out = dict(props)
    out[id_property] = rec.data.get(id_property, key)
    out["hs_object_id"] = rec.id
    out["createdate"] = created
    out["lastmodifieddate"] = modified
    return {
        "id": rec.id,
        "properties": out,
        "createdAt": created,
        "updatedAt": modified,
        "archived": False,
        "new": is_new,
    }


def batch_envelope(sb: Sandbox, results: list[dict[str, Any]], errors: list[dict[str, Any]], started: int) -> Any:
    body: dict[str, Any] = {
        "status": "COMPLETE",
        "results": results,
        "requestedAt": hs_time(started),
        "startedAt": hs_time(started),
        "completedAt": hs_time(sb.now_ms()),
    }
    if errors:
        body["errors"] = errors
        body["numErrors"] = len(errors)
    return body


def record_error(message: str, ids: list[str], category: str = "VALIDATION_ERROR", code: str | None = None) -> Any:
    err: dict[str, Any] = {"status": "error", "category": category, "message": message, "context": {"ids": ids}}
    if code:
        err["subCategory"] = code
    return err
