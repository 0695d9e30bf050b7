"""Prefect blocks: typed, documented client factories. Secrets are ``SecretStr`` fields.

Importing this package registers every opsloop block class with Prefect, so
``Block.load("opsloop-duckdb/local")`` resolves.
"""

from blocks.crm import HubSpotCredentials, SalesforceCredentials, local_crm_documents
from blocks.mlflow import MLflowConnector
from blocks.postgres import PostgresConnector
from blocks.warehouse import BigQueryConnector, DuckDBConnector, load_warehouse

__all__ = [
    "BigQueryConnector",
    "DuckDBConnector",
    "HubSpotCredentials",
    "MLflowConnector",
    "PostgresConnector",
    "SalesforceCredentials",
    "load_warehouse",
    "local_crm_documents",
]
