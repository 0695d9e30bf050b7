"""Connection to a PostgreSQL source database."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class PostgresConnector(Block):
    """A PostgreSQL source (watermark reads or logical-replication CDC). The DSN is a secret."""

    _block_type_name = "opsloop Postgres"
    _block_type_slug = "opsloop-postgres"
    _description = "PostgreSQL source database for opsloop ingest (DSN kept as a secret)."

    dsn: SecretStr = Field(description="libpq connection string, e.g. postgresql://user:pass@host:5432/db.")
    connect_timeout: int = Field(default=10, description="Seconds to wait for a connection.")

    def get_dsn(self) -> str:
        return self.dsn.get_secret_value()
