"""opsloop core library: ingest -> train -> score -> reverse ETL -> cost ledger.

The core never imports Prefect; the Prefect surface lives in the top-level ``flows/``,
``tasks/`` and ``blocks/`` packages of the repository.
"""

__version__ = "0.1.0"
