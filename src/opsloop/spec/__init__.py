"""The pipeline spec: one YAML file per pipeline, validated before anything runs.

``load_spec(path)`` returns a frozen :class:`PipelineSpec` or raises :class:`SpecError` listing
every problem as ``<yaml path>: <reason>`` (e.g. ``destinations[0].mergeKeys: required when
writeMode is merge``).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from opsloop.errors import SpecError
from opsloop.spec.base import Ident, SpecModel, problems
from opsloop.spec.destinations import DestinationSpec
from opsloop.spec.ml import (
    ActionRule,
    DriftSpec,
    FairnessSpec,
    FallbackRule,
    FeatureSpec,
    ModelSpec,
    PromotionSpec,
    ReviewSpec,
    ScoringSpec,
    SplitSpec,
)
from opsloop.spec.ops import CostSpec, KpiSpec, SignificanceSpec, SloSpec, SyncOptions, WarehouseSettings
from opsloop.spec.sources import CdcSpec, SourceSpec, SyncSpec, TableSpec
from opsloop.spec.transform import (
    DedupSpec,
    PiiSpec,
    QualityCheck,
    QuarantineSpec,
    SchemaPolicy,
    TransformSpec,
)

__all__ = [
    "ActionRule",
    "CdcSpec",
    "CostSpec",
    "DedupSpec",
    "DestinationSpec",
    "DriftSpec",
    "FairnessSpec",
    "FallbackRule",
    "FeatureSpec",
    "KpiSpec",
    "ModelSpec",
    "PiiSpec",
    "PipelineSpec",
    "PromotionSpec",
    "QualityCheck",
    "QuarantineSpec",
    "ReviewSpec",
    "SchemaPolicy",
    "ScoringSpec",
    "SignificanceSpec",
    "SloSpec",
    "SourceSpec",
    "SplitSpec",
    "SyncOptions",
    "SyncSpec",
    "TableSpec",
    "TransformSpec",
    "WarehouseSettings",
    "load_spec",
    "parse_spec",
]


class PipelineSpec(SpecModel):
    name: Ident
    description: str = ""
    mode: Literal["incremental", "full"] = "incremental"
    owner: str | None = None
    warehouse: WarehouseSettings = Field(default_factory=WarehouseSettings)
    cdc: CdcSpec = Field(default_factory=CdcSpec)
    sources: list[SourceSpec] = Field(default_factory=list)
    transform: TransformSpec = Field(default_factory=TransformSpec)
    destinations: list[DestinationSpec] = Field(default_factory=list)
    model: ModelSpec | None = None
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    sync: SyncOptions = Field(default_factory=SyncOptions)
    kpis: list[KpiSpec] = Field(default_factory=list)
    slos: list[SloSpec] = Field(default_factory=list)
    costs: CostSpec = Field(default_factory=CostSpec)

    # -- lookups -------------------------------------------------------------------------------
    def source(self, source_id: str) -> SourceSpec:
        for s in self.sources:
            if s.id == source_id:
                return s
        raise KeyError(f"pipeline {self.name!r} has no source {source_id!r}")

    def streams(self) -> list[tuple[SourceSpec, TableSpec]]:
        return [(s, t) for s in self.sources for t in s.streams]

    def warehouse_destination(self, source_id: str, table: str) -> DestinationSpec | None:
        """The warehouse destination fed by ``<source_id>.<table>`` (explicit stream, else table name)."""
        key = f"{source_id}.{table}"
        wh = [d for d in self.destinations if d.type == "warehouse"]
        for d in wh:
            if d.stream == key:
                return d
        target = next((t.target for s, t in self.streams() if s.id == source_id and t.name == table), table)
        for d in wh:
            if d.stream is None and d.table == target:
                return d
        return None

    def reverse_etl(self) -> list[DestinationSpec]:
        return [d for d in self.destinations if d.type == "reverse_etl"]

    def is_cdc(self, source: SourceSpec) -> bool:
        return source.sync.strategy == "cdc" or (self.cdc.enabled and self.cdc.source == source.id)

    @model_validator(mode="after")
    def _cross_check(self) -> PipelineSpec:
        ids = [s.id for s in self.sources]
        streams = {f"{s.id}.{t.name}" for s, t in self.streams()}
        tables = {t.name for _, t in self.streams()} | {t.target for _, t in self.streams()}
        dups = sorted({i for i in ids if ids.count(i) > 1})
        cdc_src = next((s for s in self.sources if s.id == self.cdc.source), None)
        found: list[tuple[bool, str]] = [
            (bool(dups), f"sources: duplicate source id(s) {dups}"),
            (
                self.cdc.enabled and self.cdc.source not in ids,
                f"cdc.source: {self.cdc.source!r} is not one of the source ids {ids}",
            ),
            (
                self.cdc.enabled and cdc_src is not None and cdc_src.type != "database",
                "cdc.source: CDC needs a database source",
            ),
        ]
        for i, d in enumerate(self.destinations):
            found.append(
                (
                    d.stream is not None and d.stream not in streams,
                    f"destinations[{i}].stream: {d.stream!r} is not a source stream ({sorted(streams)})",
                )
            )
        for i, dd in enumerate(self.transform.deduplicate):
            unknown = sorted(set(dd.tables or []) - tables)
            found.append((bool(unknown), f"transform.deduplicate[{i}].tables: unknown table(s) {unknown}"))
        for i, qc in enumerate(self.transform.quality_checks):
            unknown = sorted(set(qc.tables or []) - tables)
            found.append((bool(unknown), f"transform.qualityChecks[{i}].tables: unknown table(s) {unknown}"))
        problems(*found)
        return self


_FIELD_MSG = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*): (.+)$")


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _known_fields(model: type[SpecModel], loc: tuple[Any, ...]) -> list[str]:
    """Best effort: the aliases valid at ``loc`` (for 'did you mean' hints)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cand = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, SpecModel)]
        if not cand:
            return []
        current = cand[0]
    return [f.alias or n for n, f in current.model_fields.items()]


def _problems_from(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_fields(PipelineSpec, loc), n=1)
            msg = "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        elif err["type"] == "missing":
            msg = "required"
        for line in msg.split("\n"):
            m = _FIELD_MSG.match(line)
            if m and loc:
                out.append((f"{_fmt_loc(loc)}.{m.group(1)}", m.group(2)))
            elif m:
                out.append((m.group(1), m.group(2)))
            else:
                out.append((_fmt_loc(loc), line))
    return out


def parse_spec(data: Any, source: str = "<spec>") -> PipelineSpec:
    """Validate an already-parsed YAML/JSON mapping."""
    if not isinstance(data, dict):
        raise SpecError(source, [("<root>", "the spec must be a mapping of keys to values")])
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, _problems_from(exc)) from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Load and validate a pipeline spec YAML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(p), [("<file>", "no such file")]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(p), [("<file>", f"not UTF-8 text ({exc.reason})")]) from None
    import yaml  # only for spec files (~20 ms of import)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        raise SpecError(str(p), [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    return parse_spec(data, str(p))
