"""Source sections: Postgres (CDC or watermark), CRM objects (Salesforce / HubSpot), files."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from opsloop.spec.base import BlockRef, Duration, Ident, IdentList, SpecModel, problems


class CdcSpec(SpecModel):
    """Logical replication (pgoutput) settings for a database source."""

    enabled: bool = False
    source: Ident | None = None
    slot_name: Ident | None = None
    publication: Ident | None = None
    delete_mode: Literal["hard", "soft"] = "hard"
    lag_warn_bytes: int = Field(default=1 << 30, ge=0)
    batch_changes: int = Field(default=200_000, ge=1)


class SyncSpec(SpecModel):
    """How a source is read incrementally."""

    strategy: Literal["cdc", "watermark", "full"] = "watermark"
    watermark_field: Ident | None = None
    lag: Duration = timedelta(0)
    every: Duration | None = None
    cron: str | None = None
    # watermark/full database reads cannot see hard deletes; ``keys`` compares the source's primary
    # keys with the target after each load and deletes (or flags, per cdc.deleteMode) the missing ones
    delete_detection: Literal["keys", "none"] = "keys"


class TableSpec(SpecModel):
    """One table (database) or object (CRM) of a source; a plain string is shorthand for ``name``."""

    name: Ident
    primary_key: IdentList = Field(default_factory=list)
    watermark_field: Ident | None = None
    columns: IdentList | None = None
    destination: Ident | None = None

    @property
    def target(self) -> str:
        return self.destination or self.name


def _tables(value: Any) -> Any:
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class SourceSpec(SpecModel):
    """A source: ``type`` = database | crm | file; ``connection`` names a Prefect block."""

    id: Ident
    type: Literal["database", "crm", "file"]
    vendor: Literal["postgres", "salesforce", "hubspot"] | None = None
    connection: BlockRef | None = None
    tables: list[TableSpec] = Field(default_factory=list)
    objects: list[TableSpec] = Field(default_factory=list)
    path: str | None = None
    format: Literal["parquet", "csv"] | None = None
    sync: SyncSpec = Field(default_factory=SyncSpec)
    chunk_rows: int = Field(default=100_000, ge=1)

    _tables_in = field_validator("tables", "objects", mode="before")(_tables)

    @property
    def streams(self) -> list[TableSpec]:
        """Tables (database, file) or objects (crm) of this source."""
        return self.objects if self.type == "crm" else self.tables

    def watermark_field(self, table: TableSpec) -> str | None:
        return table.watermark_field or self.sync.watermark_field

    @property
    def kind(self) -> str:
        """Vendor with defaults: database → postgres."""
        if self.vendor:
            return self.vendor
        return {"database": "postgres", "file": "file"}.get(self.type, "")

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        crm = self.type == "crm"
        problems(
            (self.type != "file" and not self.connection, f"connection: required for a {self.type} source"),
            (crm and self.vendor not in ("salesforce", "hubspot"), "vendor: must be salesforce or hubspot"),
            (crm and not self.objects, "objects: a crm source needs at least one object"),
            (not crm and bool(self.objects), "objects: only crm sources have objects (use tables)"),
            (self.type == "database" and not self.tables, "tables: a database source needs tables"),
            (self.type == "file" and not self.path, "path: required for a file source"),
            (
                self.type == "database" and self.vendor not in (None, "postgres"),
                "vendor: database sources support postgres",
            ),
            (crm and self.sync.strategy == "cdc", "sync.strategy: crm sources use watermark, not cdc"),
            (
                self.type != "file"
                and self.sync.strategy == "watermark"
                and not self.sync.watermark_field
                and any(not t.watermark_field for t in self.streams),
                "sync.watermarkField: required when strategy is watermark (or set it on every table)",
            ),
        )
        return self
