"""Building blocks shared by every spec section: the base model, identifiers, durations."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict
from pydantic.alias_generators import to_camel

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
BLOCK_RE = re.compile(r"^(?:[a-z0-9][a-z0-9-]*/)?[a-z0-9][a-z0-9_-]*$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


class SpecModel(BaseModel):
    """Strict base: unknown keys are errors, camelCase and snake_case keys are both accepted."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        frozen=True,
    )


def check_ident(value: str) -> str:
    """A SQL identifier (dataset, table, column): letters, digits, underscore; nothing else."""
    if not isinstance(value, str) or not IDENT_RE.match(value):
        raise ValueError(f"{value!r} is not a valid identifier (letters, digits and _ only, not starting with a digit)")
    return value


def check_block(value: str) -> str:
    """A Prefect block document reference: ``<block-type-slug>/<name>`` or a bare ``<name>``."""
    if not isinstance(value, str) or not BLOCK_RE.match(value):
        raise ValueError(f"{value!r} is not a Prefect block reference like 'postgres-connector/source'")
    return value


def check_model_name(value: str) -> str:
    if not isinstance(value, str) or not MODEL_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid registered-model name")
    return value


def parse_duration(value: Any) -> timedelta:
    """``90`` (seconds), ``"5m"``, ``"2h"``, ``"10 min"``, ``"1d"`` or a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return timedelta(seconds=value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()])
    raise ValueError(f"{value!r} is not a duration like '90s', '5m', '2h' or '1d'")


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


Ident = Annotated[str, AfterValidator(check_ident)]
BlockRef = Annotated[str, AfterValidator(check_block)]
ModelName = Annotated[str, AfterValidator(check_model_name)]
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
IdentList = Annotated[list[Ident], BeforeValidator(_split_csv)]


def problems(*pairs: tuple[bool, str]) -> None:
    """Raise one ValueError listing every ``field: reason`` whose condition is true."""
    found = [msg for bad, msg in pairs if bad]
    if found:
        raise ValueError("\n".join(found))
