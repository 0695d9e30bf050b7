"""Clear opsloop's AI fields of erased subjects in a CRM (the CRM half of ``forget-subject``).

Only the fields opsloop pushes (a destination's ``fieldMap`` values) are cleared; the CRM record
itself stays, because the CRM owns the contact. Each subject is looked up first and updated by the
CRM's own id, so a subject the CRM does not have is never created (an upsert would create it):

* Salesforce: ``SELECT Id, <fields> FROM <object> WHERE <externalIdField> = '<key>'`` (SOQL values
  quoted by simple-salesforce's ``format_soql``), then ``PATCH sobjects/<object>/<Id>`` with the
  fields set to ``null``;
* HubSpot: ``GET /crm/v3/objects/<type>/<key>?idProperty=<idProperty>``, then ``PATCH`` with the
  properties set to ``""`` (HubSpot's way to clear a property).

Every call goes through the shared retry policy. Results and error messages name the subject only
by its pseudonym; the raw key never reaches a log line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from opsloop.crm.clients import classify_hubspot, classify_salesforce, hubspot_timeout
from opsloop.crm.retry import DEFAULT_POLICY, RetryPolicy, RetryStats, VendorFailure, call_with_retry
from opsloop.errors import ConfigError, TerminalError, TransientError
from opsloop.spec.destinations import DestinationSpec

T = TypeVar("T")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ClearResult:
    """Per destination: records found, cleared and already clear; ``status`` summarises."""

    destination: str
    found: int = 0
    cleared: int = 0
    already_clear: int = 0
    calls: int = 0

    @property
    def status(self) -> str:
        if self.cleared:
            return "cleared"
        return "already_clear" if self.found else "not_found"

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "found": self.found,
            "cleared": self.cleared,
            "already_clear": self.already_clear,
            "calls": self.calls,
        }


class _Redacting:
    """Runs CRM calls; errors are re-raised with the raw keys replaced by the subject's pseudonym."""

    def __init__(self, block: str, vendor: str, keys: Iterable[str], pseudonym: str, policy: RetryPolicy) -> None:
        self.block, self.vendor, self.pseudonym, self.policy = block, vendor, pseudonym, policy
        self.keys = sorted({k for k in keys if k}, key=len, reverse=True)
        self.stats = RetryStats()

    def redact(self, text: str) -> str:
        for k in self.keys:
            text = re.sub(re.escape(k), self.pseudonym, text, flags=re.IGNORECASE)
        return text

    def call(self, fn: Callable[[], T], classify: Callable[[BaseException], VendorFailure | None], what: str) -> T:
        try:
            return call_with_retry(
                fn, classify, what=what, block=self.block, vendor=self.vendor, policy=self.policy, stats=self.stats
            )
        except (TerminalError, TransientError) as exc:  # chain dropped: the vendor error may echo the key
            kind = TransientError if isinstance(exc, TransientError) else TerminalError
            raise kind(self.redact(str(exc))) from None
        except Exception as exc:  # not a vendor error: keep the type's name, never the raw message
            raise TerminalError(f"{self.block}: {self.vendor} {what}: {type(exc).__name__}") from None


def _fields(dest: DestinationSpec) -> list[str]:
    fields = sorted(set(dest.field_map.values()))
    bad = [f for f in fields if not _FIELD.match(f)]
    if bad or not fields:
        raise ConfigError(f"destination {dest.name}: fieldMap names no clearable CRM field ({bad or 'none'})")
    return fields


def clear_salesforce(
    sf: Any,
    block: str,
    dest: DestinationSpec,
    keys: Iterable[str],
    pseudonym: str,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> ClearResult:
    """Null the AI fields of every ``dest.object`` record whose external id is one of ``keys``."""
    from simple_salesforce.format import format_soql

    fields, obj, ext = _fields(dest), str(dest.object), str(dest.external_id_field)
    if not (_FIELD.match(obj) and _FIELD.match(ext)):
        raise ConfigError(f"destination {dest.name}: object / externalIdField are not Salesforce API names")
    run = _Redacting(block, "Salesforce", keys, pseudonym, policy)
    classify = classify_salesforce(sf.session)
    out = ClearResult(dest.name)
    for key in run.keys:
        soql = format_soql(f"SELECT Id, {', '.join(fields)} FROM {obj} WHERE {ext} = {{}}", key)
        found = run.call(partial(sf.query_all, soql), classify, f"find {obj} by {ext}")
        for rec in found.get("records") or []:
            out.found += 1
            if all(rec.get(f) in (None, "") for f in fields):
                out.already_clear += 1
                continue
            patch = partial(sf.restful, f"sobjects/{obj}/{rec['Id']}", method="PATCH", json=dict.fromkeys(fields))
            run.call(patch, classify, f"clear AI fields of {obj}")
            out.cleared += 1
    out.calls = run.stats.calls
    return out


def clear_hubspot(
    client: Any,
    block: str,
    dest: DestinationSpec,
    keys: Iterable[str],
    pseudonym: str,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> ClearResult:
    """Empty the AI properties of the ``dest.object`` record whose id property is one of ``keys``."""
    from hubspot.crm.objects import SimplePublicObjectInput

    props, obj, idp = _fields(dest), str(dest.object), str(dest.external_id_field)
    api = client.crm.objects.basic_api
    timeout = hubspot_timeout(client)
    run = _Redacting(block, "HubSpot", keys, pseudonym, policy)
    out = ClearResult(dest.name)

    def read(key: str) -> dict[str, Any] | None:
        try:
            rec = api.get_by_id(obj, key, properties=props, id_property=idp, _request_timeout=timeout)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise
        return dict(rec.properties or {})

    for key in run.keys:
        values = run.call(partial(read, key), classify_hubspot, f"read {obj} by {idp}")
        if values is None:
            continue
        out.found += 1
        if all(values.get(p) in (None, "") for p in props):
            out.already_clear += 1
            continue
        body = SimplePublicObjectInput(properties=dict.fromkeys(props, ""))
        update = partial(api.update, obj, key, body, id_property=idp, _request_timeout=timeout)
        run.call(update, classify_hubspot, f"clear AI properties of {obj}")
        out.cleared += 1
    out.calls = run.stats.calls
    return out


def clear_destination(
    dest: DestinationSpec, client: Any, block: str, keys: Iterable[str], pseudonym: str
) -> ClearResult:
    if dest.crm == "salesforce":
        return clear_salesforce(client, block, dest, keys, pseudonym)
    if dest.crm == "hubspot":
        return clear_hubspot(client, block, dest, keys, pseudonym)
    raise ConfigError(f"destination {dest.name}: no CRM eraser for {dest.crm!r}")
