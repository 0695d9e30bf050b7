"""The embedded default stack: one PostgreSQL cluster, a Prefect server on it, an MLflow server,
the CRM sandbox and a process worker, all under one local data dir (default ``./.opsloop``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from opsloop.devstack.postgres import PgCluster
from opsloop.devstack.process import Service, url_ok

WORK_POOL = "opsloop-local"
# first starts create databases; on a busy 2-core machine MLflow alone took > 90 s to answer /health
START_TIMEOUT = float(os.environ.get("OPSLOOP_START_TIMEOUT", "300"))


def telemetry_off() -> dict[str, str]:
    return {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@dataclass
class LocalStack:
    home: Path
    repo: Path = field(default_factory=Path.cwd)
    pg_port: int = 55432
    prefect_port: int = 4200
    mlflow_port: int = 5050
    sandbox_port: int = 8788

    @classmethod
    def from_env(cls, repo: Path | None = None) -> LocalStack:
        repo = repo or Path.cwd()
        e = os.environ
        return cls(
            home=Path(e.get("OPSLOOP_HOME", repo / ".opsloop")).resolve(),
            repo=repo.resolve(),
            pg_port=int(e.get("OPSLOOP_PG_PORT", 55432)),
            prefect_port=int(e.get("OPSLOOP_PREFECT_PORT", 4200)),
            mlflow_port=int(e.get("OPSLOOP_MLFLOW_PORT", 5050)),
            sandbox_port=int(e.get("OPSLOOP_SANDBOX_PORT", 8788)),
        )

    # -- locations -----------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def pg(self) -> PgCluster:
        return PgCluster(self.home / "pg", self.pg_port)

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    @property
    def warehouse_path(self) -> Path:
        return self.home / "warehouse.duckdb"

    def env(self) -> dict[str, str]:
        """What a shell (or the worker) needs to talk to this stack."""
        return {
            **telemetry_off(),
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
            "OPSLOOP_HOME": str(self.home),
            # prefect.yaml's local pull step runs flows from this checkout
            "OPSLOOP_REPO": str(self.repo),
        }

    # -- services ------------------------------------------------------------------------------
    def services(self) -> dict[str, Service]:
        env = self.env()
        prefect_env = {
            **env,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
                f"postgresql+asyncpg://postgres@127.0.0.1:{self.pg_port}/prefect"
            ),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.prefect_port),
        }
        mlflow_dir = self.home / "mlflow"
        return {
            "prefect": Service(
                "prefect-server",
                [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)],
                self.run_dir,
                health_url=f"{self.prefect_api_url}/health",
                env=prefect_env,
                cwd=self.repo,
                start_timeout=START_TIMEOUT,
            ),
            "mlflow": Service(
                "mlflow-server",
                [
                    _bin("mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(mlflow_dir / "artifacts"),
                    "--serve-artifacts",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.mlflow_port),
                    "--workers",
                    "1",
                ],
                self.run_dir,
                health_url=f"{self.mlflow_url}/health",
                # no background job runner (huey consumers): opsloop uses none of MLflow's server jobs
                env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                cwd=mlflow_dir,
                start_timeout=START_TIMEOUT,
            ),
            "sandbox": Service(
                "crm-sandbox",
                [
                    sys.executable,
                    "-m",
                    "sandbox",
                    "serve",
                    "--port",
                    str(self.sandbox_port),
                    "--state-dir",
                    str(self.home / "sandbox"),
                ],
                self.run_dir,
                health_url=f"{self.sandbox_url}/__control/health",
                env={**env, "PYTHONPATH": str(self.repo)},
                cwd=self.repo,
                start_timeout=START_TIMEOUT,
            ),
            "worker": Service(
                "prefect-worker",
                [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                self.run_dir,
                env={**env, "PYTHONPATH": str(self.repo)},
                cwd=self.repo,
                start_timeout=START_TIMEOUT,
            ),
        }

    def up(self, names: tuple[str, ...] = ("prefect", "mlflow", "sandbox")) -> list[str]:
        """Start PostgreSQL and the named services (idempotent). Returns what was started."""
        started: list[str] = []
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "mlflow").mkdir(exist_ok=True)
        pg = self.pg
        if not pg.running():
            pg.start()
            started.append("postgres")
        pg.create_database("prefect")
        pg.create_database("source")
        svc = self.services()
        for name in names:
            if name == "sandbox" and not (self.repo / "sandbox" / "__main__.py").exists():
                continue
            if svc[name].start():
                started.append(name)
        self.write_env_file()
        return started

    def down(self) -> list[str]:
        """Stop every service, then PostgreSQL (idempotent). Returns what was running."""
        stopped: list[str] = []
        for name, s in reversed(list(self.services().items())):
            if s.pid() is not None:
                stopped.append(name)
            s.stop()
        if self.pg.running():
            stopped.append("postgres")
        self.pg.stop()
        return stopped

    def status(self) -> dict[str, bool]:
        out = {"postgres": self.pg.running()}
        for name, s in self.services().items():
            out[name] = s.healthy()
        return out

    def urls(self) -> dict[str, str]:
        return {
            "Prefect UI": f"http://127.0.0.1:{self.prefect_port}",
            "Prefect API": self.prefect_api_url,
            "MLflow UI": self.mlflow_url,
            "CRM sandbox": self.sandbox_url,
            "Postgres (source)": self.pg.dsn("source"),
            "DuckDB warehouse": str(self.warehouse_path),
            "Worker": f"process worker, pool {WORK_POOL} (log: {self.run_dir / 'prefect-worker.log'})",
        }

    def write_env_file(self) -> Path:
        path = self.home / "env"
        path.write_text("".join(f"export {k}={v}\n" for k, v in sorted(self.env().items())))
        return path

    def prefect_ready(self) -> bool:
        return url_ok(f"{self.prefect_api_url}/health")
