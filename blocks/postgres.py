"""Connection to a PostgreSQL source database."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    from opsloop.sources.postgres import PostgresSource
    from opsloop.spec import PipelineSpec, SourceSpec


class PostgresConnector(Block):
    """A PostgreSQL source (watermark reads or logical-replication CDC). The DSN is a secret."""

    _block_type_name = "opsloop Postgres"
    _block_type_slug = "opsloop-postgres"
    _description = "PostgreSQL source database for opsloop ingest (DSN kept as a secret)."

    dsn: SecretStr = Field(description="libpq connection string, e.g. postgresql://user:pass@host:5432/db.")
    connect_timeout: int = Field(default=10, description="Seconds to wait for a connection.")

    def get_dsn(self) -> str:
        return self.dsn.get_secret_value()

    def get_source(self, spec: PipelineSpec, source: SourceSpec) -> PostgresSource:
        """The core reader for one ``database`` source of a pipeline spec (watermark or CDC)."""
        from opsloop.sources.postgres import PostgresSource

        return PostgresSource(self.get_dsn(), spec, source, connect_timeout=self.connect_timeout)
