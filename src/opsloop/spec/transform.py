"""Transform section: dedup, quality checks, schema policy, PII, quarantine threshold."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from opsloop.spec.base import BlockRef, Ident, IdentList, SpecModel, problems

Rule = Literal["not_null", "min", "max", "max_age_minutes", "unique", "accepted_values", "regex"]


class DedupSpec(SpecModel):
    """Keep the latest row per key: ``orderBy: updated_at DESC`` (DESC = latest wins)."""

    keys: IdentList
    order_by: str
    tables: IdentList | None = None

    @property
    def order_column(self) -> str:
        return self.order_by.split()[0]

    @property
    def descending(self) -> bool:
        parts = self.order_by.split()
        return len(parts) < 2 or parts[1].upper() == "DESC"

    @field_validator("order_by")
    @classmethod
    def _order(cls, v: str) -> str:
        parts = v.split()
        if not parts or len(parts) > 2 or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", parts[0]):
            raise ValueError(f"{v!r} must be '<column>' or '<column> ASC|DESC'")
        if len(parts) == 2 and parts[1].upper() not in ("ASC", "DESC"):
            raise ValueError(f"{v!r}: direction must be ASC or DESC")
        return v

    @model_validator(mode="after")
    def _check(self) -> DedupSpec:
        problems((not self.keys, "keys: at least one key column is required"))
        return self


class QualityCheck(SpecModel):
    """One rule on one column; failing rows go to ``_quarantine`` with the rule and reason."""

    column: Ident
    rule: Rule
    value: Any = None
    tables: IdentList | None = None

    @model_validator(mode="after")
    def _check(self) -> QualityCheck:
        v, r = self.value, self.rule
        num = isinstance(v, int | float) and not isinstance(v, bool)
        bad_regex = False
        if r == "regex":
            try:
                re.compile(str(v))
            except re.error:
                bad_regex = True
        problems(
            (r in ("min", "max") and not num, f"value: rule {r} needs a number"),
            (
                r == "max_age_minutes" and not (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                "value: rule max_age_minutes needs a positive whole number of minutes",
            ),
            (
                r == "accepted_values" and not (isinstance(v, list) and v),
                "value: rule accepted_values needs a non-empty list",
            ),
            (r == "regex" and (not isinstance(v, str) or bad_regex), f"value: {v!r} is not a valid regex"),
            (r in ("not_null", "unique") and v is not None, f"value: rule {r} takes no value"),
        )
        return self


class PiiSpec(SpecModel):
    """``mask`` replaces a value by a masked form; ``hash`` stores HMAC-SHA256 keyed by a Secret.

    A column in both lists is stored masked, and its keyed hash lands in ``<column>_hash``.
    A column only in ``hash`` is replaced by its hash. The raw value reaches no warehouse table.
    """

    mask: IdentList = Field(default_factory=list)
    hash: IdentList = Field(default_factory=list)
    salt_secret_ref: BlockRef | None = None

    @model_validator(mode="after")
    def _check(self) -> PiiSpec:
        problems(
            (
                bool(self.hash) and not self.salt_secret_ref,
                "saltSecretRef: required when hash lists columns (name of a Prefect Secret block)",
            )
        )
        return self


class QuarantineSpec(SpecModel):
    """Fail the run before MERGE when more than ``maxShare`` of a batch is quarantined."""

    max_share: float = Field(default=0.05, ge=0, le=1)
    min_rows: int = Field(default=20, ge=0)
    row_drop_warn: float = Field(default=0.5, ge=0, le=1)


class SchemaPolicy(SpecModel):
    """What to do when the source schema changes: ``evolve`` (add/widen) or ``freeze`` (fail)."""

    on_new_column: Literal["evolve", "freeze"] = "evolve"
    on_missing_column: Literal["evolve", "freeze"] = "evolve"
    on_type_change: Literal["evolve", "freeze"] = "freeze"


class TransformSpec(SpecModel):
    deduplicate: list[DedupSpec] = Field(default_factory=list)
    quality_checks: list[QualityCheck] = Field(default_factory=list)
    pii: PiiSpec = Field(default_factory=PiiSpec)
    quarantine: QuarantineSpec = Field(default_factory=QuarantineSpec)
    schema_policy: SchemaPolicy = Field(default_factory=SchemaPolicy)

    @field_validator("deduplicate", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("schema_policy", mode="before")
    @classmethod
    def _policy_shorthand(cls, v: Any) -> Any:
        if v in ("evolve", "freeze"):
            return {"onNewColumn": v, "onMissingColumn": v, "onTypeChange": v}
        return v
