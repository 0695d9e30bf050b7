"""Quality gates on Arrow batches (pyarrow.compute, no per-row Python) and schema-drift checks.

:class:`QualityGate` splits each batch into passing rows and failures — one failure row per
(row, rule), with the rule, column and a reason — which the loader writes to ``_quarantine``
after PII masking. Nothing is dropped silently. :meth:`QualityGate.enforce` fails the load before
MERGE when the quarantined share is above ``quarantine.maxShare``. Rows flagged as deletes (the
``_deleted`` column of CDC / key-scan loads) carry only their keys and are not checked.

Rule semantics (NULLs only fail ``not_null``):

* ``min`` / ``max``: numeric bounds, inclusive;
* ``max_age_minutes``: the value may be at most N minutes older than the row's change time — the
  source's watermark column when the row has one (a late-arriving or back-dated row), else the
  extract time;
* ``unique``: a value may appear once per load; later occurrences are quarantined;
* ``accepted_values``: membership in a list; ``regex``: RE2 search (anchor with ``^…$`` yourself).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsloop.errors import QualityGateError, TerminalError
from opsloop.spec import QualityCheck, SchemaPolicy
from opsloop.transform.pyvalues import values
from opsloop.transform.seen import SeenKeys
from opsloop.warehouse.base import LOGICAL_TO_ARROW, TableSchema, arrow_to_logical

RULE_COL, COLUMN_COL, REASON_COL = "_q_rule", "_q_column", "_q_reason"


class SchemaDriftError(QualityGateError):
    """The source schema changed in a way the ``schemaPolicy`` freezes (or cannot absorb)."""


def checks_for(checks: Sequence[QualityCheck], table: str, target: str | None = None) -> list[QualityCheck]:
    names = {table, target or table}
    return [c for c in checks if not c.tables or names & set(c.tables)]


def _arr(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _show(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# a reason builder gets the failing rows' values of the checked column (and of the reference
# column for max_age) as Python objects — only failing rows, so this is cheap
Reason = Callable[[list[object], list[object]], list[str]]


@dataclass
class QualityGate:
    """Evaluates a table's checks batch by batch and keeps the counts for the report and the gate."""

    checks: Sequence[QualityCheck]
    table: str
    now: datetime
    reference_column: str | None = None
    redact: frozenset[str] = frozenset()
    delete_column: str = "_deleted"
    rows_checked: int = 0
    rows_failed: int = 0
    by_rule: Counter[str] = field(default_factory=Counter)
    _seen: dict[str, SeenKeys] = field(default_factory=dict)

    def _fmt(self, column: str, value: object) -> str:
        return "<redacted>" if column in self.redact else _show(value)

    def _numeric(self, chk: QualityCheck, col: pa.Array) -> pa.Array:
        t = col.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            return pc.cast(col, pa.float64())
        raise TerminalError(
            f"{self.table}: quality rule {chk.rule} on {chk.column!r} needs a numeric column, the data has {t}"
        )

    def _evaluate(self, chk: QualityCheck, data: pa.Table) -> tuple[pa.Array, Reason]:
        """(fail mask, reason builder) for one rule."""
        col = _arr(data.column(chk.column))
        name = chk.column
        fmt = self._fmt
        if chk.rule == "not_null":
            return pc.is_null(col), lambda vals, _: [f"{name} is NULL"] * len(vals)
        if chk.rule in ("min", "max"):
            num = self._numeric(chk, col)
            bad = pc.less(num, float(chk.value)) if chk.rule == "min" else pc.greater(num, float(chk.value))
            word = "below min" if chk.rule == "min" else "above max"
            return bad, lambda vals, _: [f"{name} = {fmt(name, v)} is {word} {chk.value}" for v in vals]
        if chk.rule == "accepted_values":
            allowed = pa.array([str(v) for v in chk.value], pa.string())
            ok = pc.is_in(pc.cast(col, pa.string()), value_set=allowed)
            shown = ", ".join(str(v) for v in chk.value)
            return pc.and_(pc.invert(ok), pc.is_valid(col)), lambda vals, _: [
                f"{name} = {fmt(name, v)} is not one of [{shown}]" for v in vals
            ]
        if chk.rule == "regex":
            try:
                ok = pc.match_substring_regex(pc.cast(col, pa.string()), pattern=str(chk.value))
            except pa.ArrowInvalid as exc:
                raise TerminalError(f"{self.table}: regex {chk.value!r} on {name!r} is not valid RE2: {exc}") from exc
            return pc.invert(ok), lambda vals, _: [
                f"{name} = {fmt(name, v)} does not match regex {chk.value}" for v in vals
            ]
        if chk.rule == "max_age_minutes":
            return self._age(chk, data, col)
        if chk.rule == "unique":
            return self._unique(chk, col), lambda vals, _: [
                f"{name} = {fmt(name, v)} repeats (duplicate within this load)" for v in vals
            ]
        raise TerminalError(f"{self.table}: unknown quality rule {chk.rule!r}")

    def _reference(self, chk: QualityCheck, data: pa.Table) -> str | None:
        ref = self.reference_column
        return ref if ref and ref != chk.column and ref in data.column_names else None

    def _age(self, chk: QualityCheck, data: pa.Table, col: pa.Array) -> tuple[pa.Array, Reason]:
        if not pa.types.is_timestamp(col.type):
            raise TerminalError(f"{self.table}: max_age_minutes on {chk.column!r} needs a timestamp, got {col.type}")
        ts_type = pa.timestamp("us", tz="UTC")
        value = pc.cast(col, ts_type)
        now = pa.scalar(self.now, type=ts_type)
        ref_name = self._reference(chk, data)
        ref = now
        if ref_name:
            ref = pc.cast(_arr(data.column(ref_name)), ts_type)
            ref = pc.if_else(pc.is_null(ref), now, ref)
        age_us = pc.cast(pc.subtract(ref, value), pa.int64())
        bad = pc.greater(age_us, int(chk.value) * 60_000_000)
        against = ref_name or "extract time"
        name, limit, now_py = chk.column, int(chk.value), self.now

        def reasons(vals: list[object], refs: list[object]) -> list[str]:
            out = []
            for v, r in zip(vals, refs or [None] * len(vals), strict=True):
                r = r or now_py
                minutes = (
                    int((r - v).total_seconds() // 60) if isinstance(v, datetime) and isinstance(r, datetime) else "?"
                )
                out.append(f"{name} = {_show(v)} is {minutes} min older than {against} (max {limit})")
            return out

        return bad, reasons

    def _unique(self, chk: QualityCheck, col: pa.Array) -> pa.Array:
        arr = col
        n = len(arr)
        idx = pa.array(np.arange(n, dtype=np.int64))
        t = pa.table({"v": arr, "i": idx})
        firsts = t.group_by("v", use_threads=False).aggregate([("i", "first")]).column("i_first")
        dup = pc.invert(pc.is_in(idx, value_set=firsts))
        valid = pc.is_valid(arr)
        seen = self._seen.setdefault(chk.column, SeenKeys())
        digests = seen.digests(arr.filter(valid))
        if len(seen):  # keys of earlier batches of this load
            earlier = np.zeros(n, dtype=bool)
            earlier[np.flatnonzero(valid.to_numpy(zero_copy_only=False))] = seen.contains(digests)
            dup = pc.or_(dup, pa.array(earlier))
        seen.add(digests)
        return pc.and_(dup, valid)

    def split(self, data: pa.Table) -> tuple[pa.Table, pa.Table | None]:
        """(rows that pass every check, failures or None). Failures hold the failing rows plus
        ``_q_rule``, ``_q_column``, ``_q_reason``; a row failing two rules appears twice."""
        n = data.num_rows
        if n == 0 or not self.checks:
            self.rows_checked += n
            return data, None
        active = None
        if self.delete_column in data.column_names:
            active = _arr(pc.invert(pc.fill_null(data.column(self.delete_column), False)))
        any_bad = pa.array([False] * n)
        failures: list[pa.Table] = []
        for chk in self.checks:
            if chk.column not in data.column_names:
                raise TerminalError(
                    f"{self.table}: quality check {chk.rule} names column {chk.column!r}, which the data does not "
                    f"have (columns: {', '.join(data.column_names)}) — fix transform.qualityChecks or its tables"
                )
            mask, reason = self._evaluate(chk, data)
            mask = _arr(pc.fill_null(mask, False))
            if active is not None:
                mask = pc.and_(mask, active)
            k = int(pc.sum(mask).as_py() or 0)
            if not k:
                continue
            self.by_rule[f"{chk.rule}:{chk.column}"] += k
            any_bad = pc.or_(any_bad, mask)
            bad_rows = data.filter(mask)
            ref = self._reference(chk, data) if chk.rule == "max_age_minutes" else None
            texts = reason(values(bad_rows.column(chk.column)), values(bad_rows.column(ref)) if ref else [])
            failures.append(
                bad_rows.append_column(RULE_COL, pa.array([chk.rule] * k, pa.string()))
                .append_column(COLUMN_COL, pa.array([chk.column] * k, pa.string()))
                .append_column(REASON_COL, pa.array(texts, pa.string()))
            )
        checked = n if active is None else int(pc.sum(active).as_py() or 0)
        bad_n = int(pc.sum(any_bad).as_py() or 0)
        self.rows_checked += checked
        self.rows_failed += bad_n
        if not failures:
            return data, None
        return data.filter(pc.invert(any_bad)), pa.concat_tables(failures, promote_options="permissive")

    @property
    def share(self) -> float:
        return self.rows_failed / self.rows_checked if self.rows_checked else 0.0

    def enforce(self, max_share: float, min_rows: int = 0) -> None:
        """Raise :class:`QualityGateError` (before MERGE) when too large a share was quarantined."""
        if self.rows_failed == 0 or self.rows_checked < max(min_rows, 1) or self.share <= max_share:
            return
        rules = ", ".join(f"{k}: {v} row(s)" for k, v in self.by_rule.most_common())
        raise QualityGateError(
            f"{self.table}: {self.rows_failed} of {self.rows_checked} rows ({self.share:.1%}) failed quality "
            f"checks, above quarantine.maxShare {max_share:.1%} — nothing was merged. Failing rules: {rules}. "
            "The rows are in _quarantine with their reasons."
        )


# -- schema drift ------------------------------------------------------------------------------


@dataclass
class SchemaPlan:
    """How incoming batches are adapted to the target under the schema policy."""

    new_columns: list[str] = field(default_factory=list)
    missing: dict[str, pa.DataType] = field(default_factory=dict)
    casts: dict[str, pa.DataType] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def apply(self, data: pa.Table) -> pa.Table:
        for name, typ in self.missing.items():
            if name not in data.column_names:
                data = data.append_column(pa.field(name, typ), pa.nulls(data.num_rows, typ))
        for name, typ in self.casts.items():
            i = data.schema.get_field_index(name)
            try:
                data = data.set_column(i, pa.field(name, typ), pc.cast(data.column(i), typ))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaDriftError(
                    f"column {name!r} changed type and its values do not convert to the target's {typ}: "
                    f"{str(exc).splitlines()[0][:200]}"
                ) from exc
        return data

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        for name, typ in self.missing.items():
            if schema.get_field_index(name) < 0:
                schema = schema.append(pa.field(name, typ))
        for name, typ in self.casts.items():
            schema = schema.set(schema.get_field_index(name), pa.field(name, typ))
        return schema


def plan_schema(
    incoming: pa.Schema,
    existing: TableSchema | None,
    policy: SchemaPolicy,
    table: str,
    managed: Iterable[str] = (),
    untyped: Iterable[str] = (),
) -> SchemaPlan:
    """Compare the extract's schema with the target's. ``managed`` columns are opsloop's own
    (``_lsn``, ``_deleted``, ``*_hash``); ``untyped`` ones (PII, rewritten to text) skip the type check."""
    plan = SchemaPlan()
    if existing is None:
        return plan
    managed_set, untyped_set = set(managed), set(untyped)
    errors: list[str] = []
    names = set(incoming.names)
    for f in incoming:
        if f.name in managed_set:
            continue
        col = existing.column(f.name)
        if col is None:
            if policy.on_new_column == "freeze":
                errors.append(f"unexpected new column {f.name!r} ({arrow_to_logical(f.type)})")
            else:
                plan.new_columns.append(f.name)
                plan.notes.append(f"new column {f.name} added to the target")
            continue
        if f.name in untyped_set:
            continue
        got = arrow_to_logical(f.type)
        if got != col.type:
            if policy.on_type_change == "freeze":
                errors.append(f"column {f.name!r} changed type {col.type} → {got}")
            else:
                plan.casts[f.name] = LOGICAL_TO_ARROW[col.type]
                plan.notes.append(f"column {f.name} arrives as {got}, cast to the target's {col.type}")
    for col in existing.columns:
        if col.name in names or col.name in managed_set:
            continue
        if policy.on_missing_column == "freeze":
            errors.append(f"column {col.name!r} is missing from the source")
        else:
            plan.missing[col.name] = LOGICAL_TO_ARROW[col.type]
            plan.notes.append(f"column {col.name} missing in the source; loaded as NULL")
    if errors:
        raise SchemaDriftError(
            f"{table}: the source schema changed and transform.schemaPolicy freezes it: " + "; ".join(errors)
        )
    return plan
