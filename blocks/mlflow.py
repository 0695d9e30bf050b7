"""Connection to an MLflow tracking server / model registry."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class MLflowConnector(Block):
    """MLflow tracking + registry. A ``sqlite:///`` URI or an ``http(s)://`` server."""

    _block_type_name = "opsloop MLflow"
    _block_type_slug = "opsloop-mlflow"
    _description = "MLflow tracking server and model registry used by opsloop's train/score flows."

    tracking_uri: str = Field(description="MLflow tracking URI (http://host:5000 or sqlite:///path/mlflow.db).")
    registry_uri: str | None = Field(default=None, description="Model registry URI if not the tracking URI.")
    experiment: str = Field(default="opsloop", description="Experiment that training runs are logged to.")
    token: SecretStr | None = Field(default=None, description="Bearer token for a secured MLflow server.")
