"""The sandbox's live state around the store: settings, clock, counters, limits, faults, rules."""

from __future__ import annotations

import dataclasses
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandbox import defaults
from sandbox.store import Store


@dataclass
class Fault:
    """``POST /__control/fault``: answer matching requests with ``status`` (or only delay them).

    ``skip`` matching requests pass first, then ``count`` are hit (``-1`` = forever)."""

    path: str = ".*"
    method: str | None = None
    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    count: int = 1
    skip: int = 0
    delay: float = 0.0
    vendor: str | None = None
    hits: int = 0

    def __post_init__(self) -> None:
        self._re = re.compile(self.path)

    def matches(self, vendor: str, method: str, target: str) -> bool:
        if self.vendor and self.vendor != vendor:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        return bool(self._re.search(target))

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class RecordRule:
    """``POST /__control/record_failures``: writes of matching records fail with a per-record error."""

    vendor: str
    object: str
    field: str
    values: list[str] = dataclasses.field(default_factory=list)  # the class's own ``field`` shadows the function
    regex: str | None = None
    error_code: str = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    message: str = "rejected by a sandbox validation rule"
    count: int = -1
    hits: int = 0

    def check(self, vendor: str, obj: str, data: dict[str, Any], key_value: str | None = None) -> bool:
        """True if this write must fail (and consume one use of the rule)."""
        if vendor != self.vendor or obj.lower() != self.object.lower() or self.count == 0:
            return False
        low = {k.lower(): v for k, v in data.items()}
        value = low.get(self.field.lower(), key_value)
        if value is None:
            return False
        text = str(value)
        hit = (text in self.values or text.lower() in {v.lower() for v in self.values}) if self.values else False
        if self.regex and re.search(self.regex, text):
            hit = True
        if hit:
            self.hits += 1
            if self.count > 0:
                self.count -= 1
        return hit


_DAY: list[Any] = [0.0, ""]  # (valid until, day) — the UTC day changes at most once a second's check


def _today() -> str:
    now = time.time()
    if now >= _DAY[0]:
        _DAY[0], _DAY[1] = now + 1.0, datetime.now(UTC).strftime("%Y-%m-%d")
    return str(_DAY[1])


class Sandbox:
    """Everything a request handler needs. One instance per server process."""

    def __init__(self, state_dir: Path, overrides: dict[str, Any] | None = None) -> None:
        self.state_dir = state_dir
        self.store = Store(state_dir)
        self.overrides = dict(overrides or {})
        self.faults: list[Fault] = []
        self.rules: list[RecordRule] = []
        self.log: deque[dict[str, Any]] = deque(maxlen=20_000)
        self.window: deque[float] = deque()
        self.cursors: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._last_ms = 0
        self._dirty = False
        if self.store.kv_get("initialized") is None:
            self.initialize()
        self.settings: dict[str, Any] = {**defaults.DEFAULT_SETTINGS, **self.store.kv_get("settings", {})}
        self.counters: dict[str, Any] = self.store.kv_get("counters") or self._zero_counters()

    # -- lifecycle -----------------------------------------------------------------------------
    def initialize(self) -> None:
        """Fresh org/portal: default objects and fields, settings from defaults + CLI overrides."""
        self.store.wipe()
        for obj, fields in defaults.salesforce_objects().items():
            for f in fields:
                self.store.put_field(defaults.SALESFORCE, obj, f)
        for obj, props in defaults.hubspot_objects().items():
            for p in props:
                self.store.put_field(defaults.HUBSPOT, obj, p)
        self.store.kv_set("settings", {**defaults.DEFAULT_SETTINGS, **self.overrides})
        self.store.kv_set("initialized", True)

    def reset(self) -> None:
        self.initialize()
        self.settings = {**defaults.DEFAULT_SETTINGS, **self.store.kv_get("settings", {})}
        self.counters = self._zero_counters()
        self.faults.clear()
        self.rules.clear()
        self.log.clear()
        self.window.clear()
        self.cursors.clear()
        self._dirty = True
        self.flush()

    def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(changes) - set(defaults.DEFAULT_SETTINGS) - {"clock_freeze_ms", "clock_offset_ms"})
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(defaults.DEFAULT_SETTINGS)}")
        self.settings.update(changes)
        self.store.kv_set("settings", self.settings)
        return self.settings

    def flush(self) -> None:
        if self._dirty:
            self.store.kv_set("counters", self.counters)
            self._dirty = False

    # -- clock ---------------------------------------------------------------------------------
    def now_ms(self) -> int:
        """Current sandbox time in epoch ms: frozen or offset if configured; never goes backwards."""
        frozen = self.settings.get("clock_freeze_ms")
        now = (
            int(frozen)
            if frozen is not None
            else int(time.time() * 1000) + int(self.settings.get("clock_offset_ms") or 0)
        )
        if frozen is None:
            now = max(now, self._last_ms)
            self._last_ms = now
        return now

    # -- schema helpers ------------------------------------------------------------------------
    def fields(self, vendor: str, obj: str) -> dict[str, dict[str, Any]]:
        return self.store.fields(vendor, obj)

    def canonical_object(self, vendor: str, obj: str) -> str | None:
        for name in self.store.objects(vendor):
            if name.lower() == obj.lower():
                return name
        return None

    def key_fields(self, vendor: str, obj: str) -> list[str]:
        fs = self.fields(vendor, obj)
        if vendor == defaults.SALESFORCE:
            return [d["name"] for d in fs.values() if d.get("externalId") and d["name"] != "Id"]
        keys = [d["name"] for d in fs.values() if d.get("hasUniqueValue")]
        if "email" in fs and "email" not in keys:
            keys.append("email")
        return keys

    # -- counters ------------------------------------------------------------------------------
    @staticmethod
    def _zero_counters() -> dict[str, Any]:
        zero = {"requests": 0, "api_usage": 0, "writes": 0, "routes": {}, "status": {}, "day": _today()}
        return {defaults.SALESFORCE: dict(zero), defaults.HUBSPOT: {**zero, "routes": {}, "status": {}}}

    def usage(self, vendor: str) -> int:
        c = self.counters[vendor]
        if c.get("day") != _today():
            c.update({"day": _today(), "api_usage": 0})
        return int(c["api_usage"])

    def daily_limit(self, vendor: str) -> int:
        return int(self.settings[f"{vendor}_daily_limit"])

    def count(self, vendor: str, route: str, status: int, write: bool, billable: bool, injected: bool) -> None:
        c = self.counters[vendor]
        self.usage(vendor)
        c["requests"] += 1
        if billable:
            c["api_usage"] += 1
        if write and 200 <= status < 300:
            c["writes"] += 1
        c["routes"][route] = c["routes"].get(route, 0) + 1
        c["status"][str(status)] = c["status"].get(str(status), 0) + 1
        self._dirty = True

    def record(self, entry: dict[str, Any]) -> None:
        self.log.append(entry)

    # -- HubSpot ten-secondly window -----------------------------------------------------------
    def rate_window(self) -> float:
        """The rolling window's length in seconds (HubSpot: 10)."""
        return int(self.settings.get("hubspot_rate_window_ms") or 10_000) / 1000

    def admit(self) -> tuple[bool, int, float]:
        """(admitted?, remaining in window, seconds until a slot frees) for one HubSpot request."""
        limit = int(self.settings.get("hubspot_ten_second_limit") or 0)
        span = self.rate_window()
        now = time.monotonic()
        while self.window and now - self.window[0] >= span:
            self.window.popleft()
        if limit <= 0:
            return True, -1, 0.0
        if len(self.window) >= limit:
            return False, 0, span - (now - self.window[0])
        self.window.append(now)
        return True, limit - len(self.window), 0.0

    # -- faults and rules ----------------------------------------------------------------------
    def take_fault(self, vendor: str, method: str, target: str) -> Fault | None:
        for f in self.faults:
            if f.count == 0 or not f.matches(vendor, method, target):
                continue
            if f.skip > 0:
                f.skip -= 1
                continue
            f.hits += 1
            if f.count > 0:
                f.count -= 1
            return f
        return None

    def record_failure(
        self, vendor: str, obj: str, data: dict[str, Any], key_value: str | None = None
    ) -> RecordRule | None:
        for rule in self.rules:
            if rule.check(vendor, obj, data, key_value):
                return rule
        return None

    # -- query cursors -------------------------------------------------------------------------
    def put_cursor(self, cursor: dict[str, Any]) -> str:
        n = self.store.next_seq("cursor")
        locator = f"01gSB{n:013d}"
        self.cursors[locator] = cursor
        while len(self.cursors) > 200:
            self.cursors.popitem(last=False)
        return locator
