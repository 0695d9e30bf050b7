"""Connection to an MLflow tracking server / model registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    from opsloop.ml.registry import MLflowAdapter


class MLflowConnector(Block):
    """MLflow tracking + registry. A ``sqlite:///`` URI or an ``http(s)://`` server."""

    _block_type_name = "opsloop MLflow"
    _block_type_slug = "opsloop-mlflow"
    _description = "MLflow tracking server and model registry used by opsloop's train/score flows."

    tracking_uri: str = Field(description="MLflow tracking URI (http://host:5000 or sqlite:///path/mlflow.db).")
    registry_uri: str | None = Field(default=None, description="Model registry URI if not the tracking URI.")
    experiment: str = Field(default="opsloop", description="Experiment that training runs are logged to.")
    token: SecretStr | None = Field(default=None, description="Bearer token for a secured MLflow server.")
    artifact_location: str | None = Field(
        default=None,
        description="Artifact root for a new experiment (needed with a sqlite:/// store; a server decides itself).",
    )

    def get_registry(self) -> MLflowAdapter:
        """Build opsloop's MLflow adapter (tracking + registry) from this block."""
        from opsloop.ml.registry import MLflowAdapter

        return MLflowAdapter(
            self.tracking_uri,
            registry_uri=self.registry_uri,
            experiment=self.experiment,
            token=self.token.get_secret_value() if self.token else None,
            artifact_location=self.artifact_location,
        )


def load_registry(ref: str) -> MLflowAdapter:
    """Load an MLflow block document (``opsloop-mlflow/local``) and build the adapter."""
    from opsloop.errors import ConfigError

    try:
        block = Block.load(ref)
    except ValueError as exc:
        raise ConfigError(f"MLflow block {ref!r} not found — run `make bootstrap` or create it: {exc}") from exc
    if not isinstance(block, MLflowConnector):
        raise ConfigError(f"block {ref!r} is a {type(block).__name__}, not an MLflow connector")
    return block.get_registry()
