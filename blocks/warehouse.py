"""Warehouse connector blocks: which warehouse a deployment writes to is which block it points at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from prefect_gcp import GcpCredentials
from pydantic import Field

from opsloop.errors import ConfigError
from opsloop.warehouse.base import Warehouse


class DuckDBConnector(Block):
    """The embedded default warehouse: a DuckDB file on the worker's disk (local runs and tests)."""

    _block_type_name = "opsloop DuckDB"
    _block_type_slug = "opsloop-duckdb"
    _description = "DuckDB file used as opsloop's local warehouse. get_warehouse() builds the adapter."

    path: str = Field(description="Path of the DuckDB database file (created if missing).")
    meta_dataset: str = Field(default="opsloop_meta", description="Schema for opsloop's state and log tables.")
    threads: int | None = Field(default=None, description="DuckDB worker threads (default: all cores).")
    memory_limit: str | None = Field(default=None, description="DuckDB memory_limit, e.g. '4GB'.")

    def get_warehouse(self, **labels: Any) -> Warehouse:
        from opsloop.warehouse.duckdb import DuckDBAdapter

        return DuckDBAdapter(
            Path(self.path).expanduser(),
            meta_dataset=self.meta_dataset,
            labels=labels,
            threads=self.threads,
            memory_limit=self.memory_limit,
        )


class BigQueryConnector(Block):
    """BigQuery as opsloop's production warehouse, authenticated by a prefect-gcp GcpCredentials block."""

    _block_type_name = "opsloop BigQuery"
    _block_type_slug = "opsloop-bigquery"
    _description = (
        "BigQuery project/location for opsloop. Every job is labelled (pipeline, flow, flow_run_id, task) "
        "and capped by maximum_bytes_billed. get_warehouse() builds the adapter."
    )

    gcp_credentials: GcpCredentials = Field(description="prefect-gcp credentials block used to build the client.")
    project: str = Field(description="GCP project that runs the jobs and holds the datasets.")
    location: str = Field(default="EU", description="BigQuery location of the datasets and jobs.")
    dataset_prefix: str = Field(default="", description="Prefix for every dataset name, e.g. 'dev_'.")
    meta_dataset: str = Field(default="opsloop_meta", description="Dataset for opsloop's state and log tables.")
    maximum_bytes_billed: int | None = Field(
        default=None, description="Per-query cap on bytes billed; a query above it fails instead of costing."
    )
    api_endpoint: str | None = Field(
        default=None, description="Override of the BigQuery REST endpoint (emulators and tests only)."
    )
    storage_endpoint: str | None = Field(
        default=None, description="Override of the Storage Read API gRPC endpoint host:port (emulators only)."
    )

    def get_warehouse(self, **labels: Any) -> Warehouse:
        try:
            from opsloop.warehouse.bigquery import BigQueryAdapter, make_bigquery_client
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise ConfigError("BigQuery support needs google-cloud-bigquery (pip install opsloop)") from exc
        if self.api_endpoint:
            client = make_bigquery_client(self.project, self.location, api_endpoint=self.api_endpoint)
        else:
            client = self.gcp_credentials.get_bigquery_client(project=self.project, location=self.location)
        return BigQueryAdapter(
            client,
            project=self.project,
            location=self.location,
            dataset_prefix=self.dataset_prefix,
            meta_dataset=self.meta_dataset,
            labels=labels,
            maximum_bytes_billed=self.maximum_bytes_billed,
            storage_endpoint=self.storage_endpoint,
        )


def load_warehouse(ref: str, **labels: Any) -> Warehouse:
    """Load a warehouse block document (``opsloop-duckdb/local``) and build its adapter."""
    try:
        block = Block.load(ref)
    except ValueError as exc:
        raise ConfigError(f"warehouse block {ref!r} not found — run `make bootstrap` or create it: {exc}") from exc
    if not hasattr(block, "get_warehouse"):
        raise ConfigError(f"block {ref!r} is a {type(block).__name__}, not a warehouse connector")
    return block.get_warehouse(**labels)  # type: ignore[no-any-return]
