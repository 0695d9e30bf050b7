"""Destinations: warehouse tables written by MERGE, and reverse-ETL pushes into a CRM."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opsloop.spec.base import BlockRef, Ident, IdentList, SpecModel, problems


class DestinationSpec(SpecModel):
    """``type: warehouse`` (dataset/table/MERGE) or ``type: reverse_etl`` (CRM object + field map)."""

    type: Literal["warehouse", "reverse_etl"]
    # warehouse
    stream: str | None = None
    dataset: Ident | None = None
    table: Ident | None = None
    write_mode: Literal["merge", "append"] = "merge"
    merge_keys: IdentList = Field(default_factory=list)
    order_by: Ident | None = None
    partition_by: Ident | None = None
    cluster_by: IdentList = Field(default_factory=list)
    # reverse ETL
    crm: Literal["salesforce", "hubspot"] | None = None
    connection: BlockRef | None = None
    object: Ident | None = None
    external_id_field: Ident | None = None
    entity_key: Ident | None = None
    field_map: dict[Ident, Ident] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        """A stable name for logs, sync state and the ledger."""
        if self.type == "warehouse":
            return f"{self.dataset}.{self.table}"
        return f"{self.crm}.{self.object}"

    @model_validator(mode="after")
    def _check(self) -> DestinationSpec:
        wh = self.type == "warehouse"
        if wh:
            problems(
                (not self.dataset, "dataset: required for a warehouse destination"),
                (not self.table, "table: required for a warehouse destination"),
                (
                    self.write_mode == "merge" and not self.merge_keys,
                    "mergeKeys: required when writeMode is merge",
                ),
                (len(self.cluster_by) > 4, "clusterBy: BigQuery allows at most 4 clustering columns"),
                (
                    self.crm is not None or bool(self.field_map),
                    "crm: only reverse_etl destinations push to a CRM",
                ),
            )
        else:
            problems(
                (self.crm is None, "crm: required for a reverse_etl destination (salesforce or hubspot)"),
                (not self.connection, "connection: required (name of the CRM credentials block)"),
                (not self.object, "object: required (e.g. Contact or contacts)"),
                (not self.external_id_field, "externalIdField: required (the CRM's upsert key)"),
                (not self.field_map, "fieldMap: map at least one prediction column to a CRM field"),
                (bool(self.merge_keys), "mergeKeys: only warehouse destinations have merge keys"),
            )
        return self
