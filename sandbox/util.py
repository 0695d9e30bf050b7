"""Small helpers shared by both vendors: timestamps in each vendor's format, ids, JSON responses."""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.responses import Response

_ORJSON_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS


def dumps_bytes(body: Any) -> bytes:
    """Compact JSON (orjson; the stdlib for what orjson refuses, e.g. integers beyond 64 bits)."""
    try:
        return orjson.dumps(body, default=str, option=_ORJSON_OPTS)
    except TypeError:
        return json.dumps(body, separators=(",", ":"), default=str).encode()


def loads(raw: bytes | str) -> Any:
    """Parse JSON (orjson; the stdlib decides — and words the error — for anything orjson rejects)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?$"
)
# Salesforce accepts yyyy-MM-ddTHH:mm:ss(.SSS)(Z|+HH:mm|+HHmm) and yyyy-MM-dd (for dates); no space
_SF_DT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?(Z|[+-]\d{2}:?\d{2})$")


def parse_ts(value: Any) -> int:
    """Epoch milliseconds from an epoch-ms number/string or an ISO-8601 string (UTC if no offset)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a timestamp")
    if isinstance(value, int | float):
        return int(value)
    return _parse_text(str(value).strip())


@functools.lru_cache(maxsize=8192)
def _parse_text(text: str) -> int:
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    m = _ISO_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a timestamp")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    dt = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0), tzinfo=UTC)
    ms = int(dt.timestamp() * 1000) + (int((frac or "0")[:3].ljust(3, "0")) if frac else 0)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        ms -= sign * (int(digits[:2]) * 60 + int(digits[2:])) * 60_000
    return ms


def parse_sf_datetime(value: str) -> int:
    """Strict Salesforce dateTime (``2026-01-02T03:04:05.000Z``); rejects the space-separated form."""
    if not _SF_DT_RE.match(value.strip()):
        raise ValueError(f"'{value}' is not a valid value for the type xsd:dateTime")
    return parse_ts(value)


def ms_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@functools.lru_cache(maxsize=8192)
def sf_time(ms: int) -> str:
    """Salesforce's format: ``2026-01-02T03:04:05.000+0000``."""
    return ms_dt(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}+0000"


@functools.lru_cache(maxsize=8192)
def hs_time(ms: int) -> str:
    """HubSpot's format: ``2026-01-02T03:04:05.123Z``."""
    return ms_dt(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def sf_id(prefix: str, n: int) -> str:
    """An 18-character Salesforce-style id with a valid case-safe checksum suffix."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    body = ""
    x = n
    while x:
        x, r = divmod(x, 62)
        body = alphabet[r] + body
    base = (prefix + "SB" + body.rjust(10, "0"))[:15]
    suffix = ""
    for i in range(3):
        bits = sum(1 << j for j, ch in enumerate(base[i * 5 : i * 5 + 5]) if ch.isupper())
        suffix += "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits]
    return base + suffix


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        dumps_bytes(body),
        status_code=status,
        headers=headers,
        media_type="application/json;charset=UTF-8",
    )


def sf_error(status: int, code: str, message: str, fields: list[str] | None = None) -> Response:
    """Salesforce error body: a JSON array of ``{message, errorCode, fields}``."""
    item: dict[str, Any] = {"message": message, "errorCode": code}
    if fields is not None:
        item["fields"] = fields
    return json_response([item], status)


def hs_error(status: int, category: str, message: str, **extra: Any) -> Response:
    """HubSpot error body: ``{status: "error", message, correlationId, category, ...}``."""
    import uuid

    body = {"status": "error", "message": message, "correlationId": str(uuid.uuid4()), "category": category, **extra}
    return json_response(body, status)
