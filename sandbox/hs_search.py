"""HubSpot CRM search: filterGroups (OR of AND-ed filters), one sort, limit ≤ 200, 10,000-result cap.

Filters and sorts on ``hs_lastmodifieddate`` / ``lastmodifieddate`` / ``createdate`` /
``hs_object_id`` run in SQLite; anything else is evaluated in Python on the property values.
"""

from __future__ import annotations

import re
from typing import Any

from sandbox import hs_core as core
from sandbox.app import BadRequest
from sandbox.defaults import HUBSPOT
from sandbox.records import Rec
from sandbox.runtime import Sandbox
from sandbox.util import hs_error, parse_ts

MAX_LIMIT = 200
MAX_RESULTS = 10_000
_COLS = {
    "hs_lastmodifieddate": "modstamp",
    "lastmodifieddate": "modstamp",
    "createdate": "created",
    "hs_object_id": "CAST(id AS INTEGER)",
}
_SQL_OPS = {"EQ": "=", "NEQ": "!=", "LT": "<", "LTE": "<=", "GT": ">", "GTE": ">="}


def _bad(message: str) -> BadRequest:
    return BadRequest(hs_error(400, "VALIDATION_ERROR", message))


def _num(prop: str, value: Any) -> int:
    try:
        return int(value) if prop == "hs_object_id" else parse_ts(value)
    except ValueError as exc:
        raise _bad(f"{value!r} is not a valid value for {prop}") from exc


def _sql_group(filters: list[dict[str, Any]]) -> tuple[str, list[Any]] | None:
    parts, params = [], []
    for f in filters:
        prop, op = f.get("propertyName", ""), f.get("operator", "EQ")
        col = _COLS.get(prop)
        if col is None:
            return None
        if op in _SQL_OPS:
            parts.append(f"{col} {_SQL_OPS[op]} ?")
            params.append(_num(prop, f.get("value")))
        elif op == "BETWEEN":
            parts.append(f"{col} BETWEEN ? AND ?")
            params += [_num(prop, f.get("value")), _num(prop, f.get("highValue"))]
        else:
            return None
    return "(" + " AND ".join(parts or ["1=1"]) + ")", params


def _typed(defn: dict[str, Any] | None, value: Any) -> Any:
    if value is None or defn is None:
        return value
    if defn["type"] == "number" or defn["name"] == "hs_object_id":
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if defn["type"] in ("datetime", "date"):
        try:
            return parse_ts(value)
        except ValueError:
            return None
    return str(value).lower()


def _match(defn: dict[str, Any] | None, actual: Any, f: dict[str, Any]) -> bool:
    op = f.get("operator", "EQ")
    if op == "HAS_PROPERTY":
        return actual not in (None, "")
    if op == "NOT_HAS_PROPERTY":
        return actual in (None, "")
    a = _typed(defn, actual)
    if op in ("IN", "NOT_IN"):
        hit = a is not None and a in {_typed(defn, v) for v in f.get("values") or []}
        return hit if op == "IN" else not hit
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        pattern = re.escape(str(f.get("value", "")).lower()).replace(r"\*", ".*")
        hit = a is not None and re.search(rf"(^|\W){pattern}($|\W)", str(a)) is not None
        return hit if op == "CONTAINS_TOKEN" else not hit
    b = _typed(defn, f.get("value"))
    if op == "EQ":
        return bool(a == b)
    if op == "NEQ":
        return bool(a != b)
    if a is None or b is None:
        return False
    if op == "BETWEEN":
        hi = _typed(defn, f.get("highValue"))
        return hi is not None and b <= a <= hi
    try:
        return bool({"LT": a < b, "LTE": a <= b, "GT": a > b, "GTE": a >= b}[op])
    except (KeyError, TypeError):
        raise _bad(f"unsupported operator {op!r}") from None


def search(sb: Sandbox, obj: str, body: dict[str, Any]) -> dict[str, Any]:
    limit = int(body.get("limit") or 10)
    after = int(body.get("after") or 0)
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if after >= MAX_RESULTS:
        raise _bad(
            f"Search results are limited to {MAX_RESULTS:,} per query (after={after}); narrow the query, "
            "e.g. with an hs_lastmodifieddate window"
        )
    groups = body.get("filterGroups") or []
    if (
        len(groups) > 5
        or any(len(g.get("filters") or []) > 10 for g in groups)
        or sum(len(g.get("filters") or []) for g in groups) > 25
    ):
        raise _bad("at most 5 filterGroups, 10 filters per group and 25 filters in total")
    sorts = body.get("sorts") or []
    if len(sorts) > 1:
        raise _bad("only one sort is supported")
    sort = sorts[0] if sorts else None
    if isinstance(sort, str):
        sort = {"propertyName": sort.lstrip("-"), "direction": "DESCENDING" if sort.startswith("-") else "ASCENDING"}
    fs = sb.fields(HUBSPOT, obj)
    for g in groups:
        for f in g.get("filters") or []:
            if str(f.get("propertyName", "")).lower() not in fs:
                raise _bad(f"There was a problem with the request: property {f.get('propertyName')!r} does not exist")
    compiled = [_sql_group(g.get("filters") or []) for g in groups]
    where, params = "AND deleted = 0", []
    python_groups: list[list[dict[str, Any]]] = []
    if compiled and all(c is not None for c in compiled):
        where += " AND (" + " OR ".join(c[0] for c in compiled if c) + ")"
        for c in compiled:
            params += c[1] if c else []
    else:
        python_groups = [g.get("filters") or [] for g in groups]
    prop = str(sort["propertyName"]) if sort else "hs_object_id"
    desc = bool(sort and str(sort.get("direction", "ASCENDING")).upper().startswith("DESC"))
    text = str(body.get("query") or "").lower()
    if prop in _COLS and not python_groups and not text:
        order = f"{_COLS[prop]} {'DESC' if desc else 'ASC'}, rid"
        total = sb.store.count(HUBSPOT, obj, where, tuple(params))
        page = sb.store.select(HUBSPOT, obj, where, tuple(params), order, limit, after)
    else:
        hits = [r for r in _scan(sb, obj, where, tuple(params)) if _keep(fs, r, python_groups, text)]
        defn = fs.get(prop.lower())
        hits.sort(
            key=lambda r: (
                _typed(defn, core.value_of(r, prop)) is not None,
                _typed(defn, core.value_of(r, prop)) or 0,
                r.rid or 0,
            ),
            reverse=desc,
        )
        total, page = len(hits), hits[after : after + limit]
    out: dict[str, Any] = {"total": total, "results": [core.render(sb, obj, r, body.get("properties")) for r in page]}
    if after + limit < total:
        out["paging"] = {"next": {"after": str(after + limit)}}
    return out


def _keep(fs: dict[str, dict[str, Any]], rec: Rec, groups: list[list[dict[str, Any]]], text: str) -> bool:
    if text and not any(text in str(v).lower() for v in rec.data.values()):
        return False
    if not groups:
        return True
    return any(
        all(
            _match(fs.get(str(f.get("propertyName", "")).lower()), core.value_of(rec, str(f["propertyName"])), f)
            for f in g
        )
        for g in groups
    )


def _scan(sb: Sandbox, obj: str, where: str, params: tuple[Any, ...]) -> list[Rec]:
    out: list[Rec] = []
    last = 0
    while True:
        recs = sb.store.select(HUBSPOT, obj, f"{where} AND rid > ?", (*params, last), "rid", 5000)
        if not recs:
            return out
        out.extend(recs)
        last = recs[-1].rid or 0
