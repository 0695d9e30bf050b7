"""Salesforce record semantics shared by REST, sObject Collections and Bulk API 2.0.

``write_rows`` validates field names (request-level ``INVALID_FIELD``), coerces values per field
type, enforces required / read-only fields, external-id matching (case-insensitive) and the
sandbox's per-record failure rules, then writes every successful row in one transaction.
Per-row outcomes come back as ``{id, success, created, errors:[{statusCode, message, fields}]}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox.defaults import SALESFORCE, SF_PREFIX, SF_SYSTEM
from sandbox.records import Rec, key_values
from sandbox.runtime import Sandbox
from sandbox.util import parse_sf_datetime, parse_ts, sf_id, sf_time

SYSTEM_LOWER = {s.lower() for s in SF_SYSTEM}
_SYSTEM_CANON = set(SF_SYSTEM) - {"Id"}  # rows are keyed by canonical names before _apply
_DATETIME_TYPES = ("datetime",)
_NUMBER_TYPES = ("double", "currency", "percent")


class FieldError(Exception):
    """A request-level field problem (unknown field): the whole request / job fails."""

    def __init__(self, code: str, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.code = code
        self.fields = fields


@dataclass(slots=True)
class RowResult:
    id: str | None = None
    success: bool = True
    created: bool = False
    errors: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, code: str, message: str, fields: list[str] | None = None) -> RowResult:
        self.success = False
        self.errors.append({"statusCode": code, "message": message, "fields": fields or []})
        return self

    def as_dict(self, with_created: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "success": self.success, "errors": self.errors}
        if with_created:
            out["created"] = self.created
        return out


def unknown_field(obj: str, name: str) -> FieldError:
    return FieldError(
        "INVALID_FIELD",
        f"No such column '{name}' on sobject of type {obj}. If you are attempting to use a custom field, be sure "
        "to append the '__c' after the custom field name. Please reference your WSDL or the describe call for the "
        "appropriate names.",
        [name],
    )


def canonical_fields(sb: Sandbox, obj: str, names: list[str]) -> dict[str, str]:
    """Map given names (any case) to canonical API names; unknown names raise FieldError."""
    fs = sb.fields(SALESFORCE, obj)
    out: dict[str, str] = {}
    for n in names:
        if n == "attributes":
            continue
        d = fs.get(n.lower())
        if d is None:
            raise unknown_field(obj, n)
        out[n] = d["name"]
    return out


def coerce(defn: dict[str, Any], value: Any) -> Any:
    """Coerce a JSON / CSV value to what the field stores; raises ValueError with SF's wording."""
    if value is None:
        return None
    t = defn["type"]
    name = defn["name"]
    if t in _NUMBER_TYPES or t == "int":
        if isinstance(value, bool):
            raise ValueError(f"{name}: value not of required type: {value}")
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: value not of required type: {value}") from None
        return int(num) if t == "int" else num
    if t == "boolean":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "false", "0"):
            return str(value).lower() in ("true", "1")
        raise ValueError(f"{name}: value not of required type: {value}")
    if t in _DATETIME_TYPES:
        return sf_time(parse_sf_datetime(str(value)))
    if t == "date":
        text = str(value)[:10]
        parse_ts(text)
        return text
    text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    if defn.get("length") and len(text) > int(defn["length"]):
        raise OverflowError(f"{name}: data value too large: {text[:40]} (max length={defn['length']})")
    if defn.get("restrictedPicklist"):
        allowed = {p["value"] for p in defn.get("picklistValues", [])}
        if text not in allowed:
            raise LookupError(f"bad value for restricted picklist field: {text}")
    return text


def coercer(defn: dict[str, Any]) -> Callable[[Any], Any]:
    """:func:`coerce` for one field, with the common cases (a float for a number field, a short
    string for a text field) answered without the general dispatch."""
    t = defn["type"]
    if t in _NUMBER_TYPES:

        def number(value: Any) -> Any:
            kind = type(value)
            if kind is float:
                return value
            if kind is str:
                try:
                    return float(value)
                except ValueError:
                    pass
            return coerce(defn, value)

        return number
    plain_text = t not in (*_NUMBER_TYPES, "int", "boolean", *_DATETIME_TYPES, "date")
    if plain_text and not defn.get("restrictedPicklist"):
        limit = int(defn.get("length") or 0)

        def text(value: Any) -> Any:
            if type(value) is str and (not limit or len(value) <= limit):
                return value
            return coerce(defn, value)

        return text
    return lambda value: coerce(defn, value)


def typed(defn: dict[str, Any], rec: Rec) -> Any:
    """A field's value for comparisons (datetimes as epoch ms)."""
    n = defn["name"].lower()
    if n == "id":
        return rec.id
    if n == "isdeleted":
        return rec.deleted
    if n == "createddate":
        return rec.created
    if n in ("systemmodstamp", "lastmodifieddate"):
        return rec.modstamp
    v = rec.data.get(defn["name"])
    if v is not None and defn["type"] in _DATETIME_TYPES:
        return parse_ts(v)
    return v


def render(defn: dict[str, Any], rec: Rec) -> Any:
    v = typed(defn, rec)
    if defn["type"] in _DATETIME_TYPES and v is not None:
        return sf_time(int(v))
    return v


def record_json(sb: Sandbox, obj: str, rec: Rec, ver: str, names: list[str] | None = None) -> dict[str, Any]:
    fs = sb.fields(SALESFORCE, obj)
    out: dict[str, Any] = {"attributes": {"type": obj, "url": f"/services/data/v{ver}/sobjects/{obj}/{rec.id}"}}
    for n in names or [d["name"] for d in fs.values()]:
        d = fs[n.lower()]
        out[d["name"]] = render(d, rec)
    return out


def new_ids(sb: Sandbox, obj: str, n: int) -> list[str]:
    if n <= 0:
        return []
    prefix = SF_PREFIX.get(obj.lower(), "a00")
    first = sb.store.next_seq(f"sf:{prefix}", n)
    return [sf_id(prefix, first + i) for i in range(n)]


def write_rows(
    sb: Sandbox,
    obj: str,
    rows: list[dict[str, Any]],
    op: str,
    ext_field: str | None = None,
    all_or_none: bool = False,
) -> list[RowResult]:
    """Apply ``op`` (insert | update | upsert | delete) to ``rows``; see the module docstring.

    Every row is validated on its own (external id present and unique in the request and in the
    org, each value coerced to its field's type, read-only / required fields, failure rules); the
    rows that pass are written in one transaction. Plumbing only is shared per request: the field
    plan, one indexed lookup for all external ids, one ``executemany``, and the key index touched
    only for records whose key values can have changed."""
    fs = sb.fields(SALESFORCE, obj)
    given: set[str] = set().union(*rows) if rows else set()
    names = canonical_fields(sb, obj, sorted(given))
    if any(k != v for k, v in names.items()):
        rows = [{names[k]: v for k, v in r.items() if k != "attributes"} for r in rows]
    # else rows keep a Collections record's "attributes": _Plan.apply skips it (no copy per row)
    n = len(rows)
    results = [RowResult() for _ in range(n)]
    existing: dict[str, Rec] = {}
    targets: list[str | None] = [None] * n
    lows: list[str | None] = []
    if op in ("update", "delete"):
        for i, r in enumerate(rows):
            targets[i] = str(r.get("Id") or "") or None
            if targets[i] is None:
                results[i].fail("MISSING_ARGUMENT", "Id not specified in an update call", ["Id"])
        existing = sb.store.get_many(SALESFORCE, obj, [t for t in targets if t])
    elif op == "upsert":
        ext = fs[str(ext_field).lower()]["name"]
        values = [r.get(ext) for r in rows]
        lows = [None if v is None or v == "" else str(v).lower() for v in values]
        found: dict[str, list[str]] = {}
        if ext == "Id":
            existing = sb.store.get_many(SALESFORCE, obj, [str(v) for v in values if v])
            found = {k.lower(): [k] for k, r in existing.items() if not r.deleted}
        else:
            hits = sb.store.lookup_records(SALESFORCE, obj, ext, [x for x in lows if x is not None])
            for key, recs in hits.items():
                if len(recs) == 1:  # the usual case: one record holds the value
                    held = recs[0]
                    existing[held.id] = held
                    if not held.deleted:
                        found[key] = [held.id]
                    continue
                for held in recs:
                    existing[held.id] = held
                live = [held.id for held in recs if not held.deleted]
                if live:
                    found[key] = live
        present = [x for x in lows if x is not None]
        dupes = {k for k, c in Counter(present).items() if c > 1} if len(set(present)) != len(present) else set()
        for i, low in enumerate(lows):
            if low is None:
                results[i].fail("MISSING_ARGUMENT", f"{ext} not specified", [ext])
            elif low in dupes:
                results[i].fail("DUPLICATE_VALUE", f"Duplicate external id specified: {values[i]}", [ext])
            else:
                ids = found.get(low)
                if ids is not None and len(ids) > 1:
                    msg = f"{ext}: more than one record found for external id field: {ids}"
                    results[i].fail("DUPLICATE_EXTERNAL_ID", msg, [ext])
                elif ids is not None:
                    targets[i] = ids[0]
    now = sb.now_ms()
    plan = _Plan(sb, fs, obj, ext_field, {names.get(k, k) for k in given})
    ext_name = fs[ext_field.lower()]["name"] if ext_field and op == "upsert" else None
    fresh = iter(new_ids(sb, obj, sum(1 for t, r in zip(targets, results, strict=True) if t is None and r.success)))
    writes: list[Rec] = []
    keys = sb.key_fields(SALESFORCE, obj)
    key_may_change = any(k in plan.given and k != ext_name for k in keys)
    # the key values records had before this request (taken now: an upsert updates its records in place)
    old_keys = {r.id: key_values(r, keys) for r in existing.values()} if key_may_change else None
    checked = op in ("update", "delete")
    # an upsert's rows target distinct records (a repeated external id fails them all): each row
    # updates its record in place; an update may name one Id twice, each row applies to the record read
    in_place = op == "upsert"
    apply = plan.apply
    for row, res, target, low in zip(rows, results, targets, lows or [None] * n, strict=True):
        if not res.success:
            continue
        old = existing.get(target) if target else None
        if checked and (old is None or (old.deleted and op == "update")):
            res.fail(
                "ENTITY_IS_DELETED" if old else "INVALID_CROSS_REFERENCE_KEY",
                "entity is deleted" if old else f"invalid cross reference id: {target}",
                [],
            )
            continue
        if op == "delete":
            if old is not None:
                res.id = old.id
                writes.append(Rec(old.id, old.created, now, True, dict(old.data), old.rid))
            continue
        skip = None  # matched case-insensitively on the external id: the stored value is kept
        if old is not None and ext_name and str(old.data.get(ext_name, "")).lower() == low:
            skip = ext_name
        rec = apply(row, old, res, skip, in_place)
        if rec is None:
            continue
        if old is None:
            rec.id, rec.created, res.created = next(fresh), now, True
        rec.modstamp = now
        res.id = rec.id
        writes.append(rec)
    if all_or_none and any(not r.success for r in results):
        for rolled in results:
            if rolled.success:
                rolled.success, rolled.id, rolled.created = False, None, False
                rolled.errors.append(
                    {
                        "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                        "message": "Record rolled back because not all records were valid and the request "
                        "was using AllOrNone header",
                        "fields": [],
                    }
                )
        return results
    with sb.store.tx() as tx:
        if old_keys is not None:  # a key may change: compare with the old ones
            tx.write(SALESFORCE, obj, writes, keys, old_keys)
        else:  # rows set no key field but the matched external id: existing records keep their index rows
            tx.write(SALESFORCE, obj, writes, keys, reindex=[r for r in writes if r.id not in existing])
    return results


class _Plan:
    """Per-request preparation for applying rows: a coercer per field present, the required fields,
    whether any system field is being written."""

    def __init__(self, sb: Sandbox, fs: dict[str, dict[str, Any]], obj: str, ext_field: str | None, keys: set[str]):
        self.sb, self.obj, self.ext_field = sb, obj, ext_field
        self.given = keys
        self.coerce = {k: coercer(fs[k.lower()]) for k in keys if k != "Id" and k.lower() in fs}
        self.system = any(k in _SYSTEM_CANON for k in keys)
        self.required = [d["name"] for d in fs.values() if d.get("required")]
        self.required_given = any(n in keys for n in self.required)

    def apply(
        self, row: dict[str, Any], old: Rec | None, res: RowResult, skip: str | None = None, in_place: bool = False
    ) -> Rec | None:
        """The record ``row`` makes of ``old`` (None: a new one), or None with ``res`` failed.
        ``skip``: a field of ``row`` to leave as stored (the matched external id). ``in_place``: the
        caller discards ``old`` afterwards — it is updated and returned, not copied (if the row
        fails, ``old`` may hold some of its values; it must not be written then)."""
        if old is None:
            data: dict[str, Any] = {}
        elif in_place:
            data = old.data
        else:
            data = dict(old.data)
        if self.system:
            readonly = [k for k in row if k in _SYSTEM_CANON and k != skip]
            if readonly:
                res.fail(
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {', '.join(readonly)}. Please "
                    "check the security settings of this field and verify that it is read/write for your profile or "
                    "permission set.",
                    readonly,
                )
                return None
        coercer_of = self.coerce.get  # every given field but Id (and a Collections record's "attributes")
        for k, v in row.items():
            to_value = coercer_of(k)
            if to_value is None or k == skip:
                continue
            if v is None:
                data.pop(k, None)
                continue
            try:
                value = to_value(v)
            except OverflowError as exc:
                res.fail("STRING_TOO_LONG", str(exc), [k])
                return None
            except LookupError as exc:
                res.fail("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", f"{k}: {exc}", [k])
                return None
            except ValueError as exc:
                res.fail("INVALID_TYPE_ON_FIELD_IN_RECORD", str(exc), [k])
                return None
            if value is None:
                data.pop(k, None)
            else:
                data[k] = value
        if self.required and (old is None or self.required_given):
            missing = [n for n in self.required if data.get(n) in (None, "")]
            if missing and (old is None or any(m in row and m != skip for m in missing)):
                res.fail("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing)
                return None
        if self.sb.rules:
            ext = self.ext_field
            given = row.get(ext) if ext and ext != skip else None
            rule = self.sb.record_failure(SALESFORCE, self.obj, data, None if given is None else str(given))
            if rule is not None:
                res.fail(rule.error_code, rule.message, [rule.field])
                return None
        if old is None:
            return Rec("", 0, 0, False, data, None)
        if in_place:
            old.deleted = False
            return old
        return Rec(old.id, old.created, 0, False, data, old.rid)
