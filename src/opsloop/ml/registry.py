"""MLflow adapter: the only module that imports mlflow.

Logs a training run (params, metrics, plots, baseline, fairness, model with signature and input
example), registers versions, reads and moves aliases, loads models. Vendor errors are translated
here: an unreachable tracking server → :class:`MLflowUnavailableError` naming the URI; a missing
alias → ``None``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsloop.errors import TerminalError
from opsloop.spec.ml import ModelSpec

BASELINE_PATH = "opsloop/baseline.json"


class MLflowUnavailableError(TerminalError):
    """The tracking server / registry cannot be reached (message names the tracking URI)."""


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


class MLflowAdapter:
    """Registry + tracking on one MLflow server (http[s]://) or a ``sqlite:///`` store."""

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        experiment: str = "opsloop",
        token: str | None = None,
        artifact_location: str | None = None,
        http_retries: int = 2,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self._token = token
        self.http_retries = http_retries

    # -- plumbing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        import mlflow

        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.http_retries)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        if self._token:
            os.environ["MLFLOW_TRACKING_TOKEN"] = self._token
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        try:
            yield mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        except Exception as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, TerminalError):
            return exc
        msg = str(exc)
        low = msg.lower()
        if any(s in low for s in ("connection refused", "max retries exceeded", "failed to establish", "timed out")):
            return MLflowUnavailableError(f"MLflow tracking server {self.tracking_uri} is unreachable: {msg[:300]}")
        return TerminalError(f"MLflow ({self.tracking_uri}): {msg[:500]}")

    def ping(self, attempts: int = 3, timeout: float = 3.0) -> None:
        """Fail fast, naming the tracking URI, when an HTTP tracking server does not answer."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        url = self.tracking_uri.rstrip("/") + "/health"
        last: Exception | None = None
        for i in range(attempts):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (configured URI)
                    if resp.status < 500:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.5 * (i + 1))
        raise MLflowUnavailableError(f"MLflow tracking server {self.tracking_uri} is unreachable: {last}")

    def _experiment_id(self, client: Any) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return str(exp.experiment_id)
        return str(client.create_experiment(self.experiment, artifact_location=self.artifact_location))

    # -- logging -------------------------------------------------------------------------------
    def log_candidate(
        self, ms: ModelSpec, result: Any, tags: dict[str, str], extra_artifacts: dict[str, Any] | None = None
    ) -> ModelVersionInfo:
        """Log one training run and register the model as a new version of ``ms.name``."""
        import mlflow
        import mlflow.sklearn
        import sklearn

        with self._session() as client:
            exp_id = self._experiment_id(client)
            with mlflow.start_run(experiment_id=exp_id, run_name=f"{ms.name}-{tags.get('opsloop.as_of', '')}") as run:
                mlflow.log_params({k: str(v)[:500] for k, v in result.params.items()})
                mlflow.log_metrics({f"holdout_{k}": v for k, v in result.metrics.items()})
                mlflow.log_metrics({f"rows_{k}": float(v) for k, v in result.rows.items()})
                mlflow.set_tags(tags)
                for p in result.plots:
                    mlflow.log_artifact(str(p), artifact_path="plots")
                docs = {
                    "baseline.json": result.baseline,
                    "importance.json": [{"feature": n, "roc_auc_drop": v} for n, v in result.importance],
                    **({"fairness.json": result.fairness} if result.fairness else {}),
                    **(extra_artifacts or {}),
                }
                for fname, doc in docs.items():
                    mlflow.log_dict(doc, f"opsloop/{fname}")
                if result.fairness:
                    mlflow.log_metric("fairness_gap", result.fairness["gap"])
                info = mlflow.sklearn.log_model(
                    result.pipeline,
                    name="model",
                    signature=_signature(ms),
                    input_example=_example(result.x_test),
                    pyfunc_predict_fn="predict_proba",
                    pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"mlflow=={mlflow.__version__}"],
                    registered_model_name=ms.name,
                    await_registration_for=120,
                    skops_trusted_types=_trusted_types(result.pipeline),
                )
                version = str(info.registered_model_version)
                run_id = run.info.run_id
            for k, v in tags.items():
                client.set_model_version_tag(ms.name, version, k, v)
        return ModelVersionInfo(ms.name, version, run_id, dict(tags))

    # -- registry ------------------------------------------------------------------------------
    def version(self, name: str, alias: str) -> ModelVersionInfo | None:
        """The version behind ``alias`` or None (alias or model missing). Unreachable → error."""
        from mlflow.exceptions import MlflowException

        with self._session() as client:
            try:
                mv = client.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                if _not_found(exc):
                    return None
                raise
            return ModelVersionInfo(name, str(mv.version), mv.run_id, dict(mv.tags or {}), tuple(mv.aliases or ()))

    def get_version(self, name: str, version: str) -> ModelVersionInfo:
        with self._session() as client:
            mv = client.get_model_version(name, version)
            return ModelVersionInfo(name, str(mv.version), mv.run_id, dict(mv.tags or {}), tuple(mv.aliases or ()))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self._session() as client:
            client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        with self._session() as client:
            try:
                client.delete_registered_model_alias(name, alias)
            except MlflowException as exc:
                if not _not_found(exc):
                    raise

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        with self._session() as client:
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, str(v)[:5000])

    def load_model(self, name: str, version: str) -> Any:
        """The fitted sklearn Pipeline of ``name`` version ``version``."""
        import mlflow.sklearn

        with self._session():
            return mlflow.sklearn.load_model(f"models:/{name}/{version}")

    def load_json(self, run_id: str, path: str = BASELINE_PATH) -> dict[str, Any] | None:
        import mlflow

        with self._session(), tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
            except Exception as exc:
                if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                    return None
                raise
            return json.loads(Path(local).read_text())  # type: ignore[no-any-return]

    def run_url(self, run_id: str) -> str | None:
        if not self.tracking_uri.startswith("http"):
            return None
        with self._session() as client:
            exp = client.get_run(run_id).info.experiment_id
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"


def _not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "error_code", ""))
    return (
        code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") or "not found" in str(exc).lower()
    )


def _trusted_types(model: Any) -> list[str]:
    """The types skops must trust to load this pipeline: the ones in a model we just fitted ourselves."""
    import skops.io as sio

    return sorted(sio.get_untrusted_types(data=sio.dumps(model)))


def _signature(ms: ModelSpec) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs: list[ColSpec | TensorSpec] = [ColSpec("double", c, required=False) for c in ms.features.numeric]
    inputs += [ColSpec("string", c, required=False) for c in ms.features.categorical]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([TensorSpec(np.dtype("float64"), (-1, 2))]))


def _example(x: Any) -> Any:
    """One synthetic row as the logged input example: the median of each numeric column, the most
    frequent value of each other column. Never a real customer's row — model artifacts outlive a
    GDPR erasure of that customer (docs/runbooks.md#erasure-request)."""
    import pandas as pd

    row: dict[str, Any] = {}
    for c in x.columns:
        s = x[c].dropna()
        numeric = pd.api.types.is_numeric_dtype(x[c])
        if s.empty:
            row[c] = 0.0 if numeric else ""
        elif numeric:
            row[c] = float(s.median())
        else:
            row[c] = str(s.mode().iloc[0])
    return pd.DataFrame([row], columns=list(x.columns))
