"""Session fixtures of the fault suite: the demo source, a champion model, the day-0 template."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import SecretStr

from opsloop.devstack.postgres import PgCluster
from tests.faults.lab import (
    MODEL,
    TAG,
    Pipeline,
    _context,
    dispose,
    new_pipeline,
    run_nightly,
    save_warehouse_block,
    write_spec,
)
from tests.support.fixtures.core import TEST_HOME
from tests.support.ml_data import TRAIN_AS_OF

CUSTOMERS = 300
TIMINGS: dict[str, float] = {}  # printed at the end of the session (pytest_terminal_summary below)


@dataclass
class Lab:
    base: Path
    source_dsn: str
    mlflow: str
    template: Pipeline
    day1: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)


def _train_champion(base: Path, mlflow: str, template_db: Path) -> str:
    """Train the lab's model once on the ML tests' demo-shaped warehouse; every pipeline scores with it."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.train import train_model

    (base / "train").mkdir()
    path = base / "train" / "warehouse.duckdb"
    shutil.copy(template_db, path)
    warehouse = save_warehouse_block(path, f"{TAG}-train")
    spec = write_spec(base / "train", "train", "opsloop_faults_unused", f"{TAG}-train")
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        out = train_model(spec_path=str(spec), warehouse=warehouse, mlflow=mlflow, as_of=str(TRAIN_AS_OF))
    assert out["decision"] == "promoted", f"the lab's model was not promoted: {out['reason']}"
    return str(out["version"])


@pytest.fixture(scope="session")
def fault_lab(
    prefect_api: str, pg_cluster: PgCluster, mlflow_server: str, demo_warehouse_template: Path
) -> Iterator[Lab]:
    from prefect.blocks.system import Secret

    from blocks.mlflow import MLflowConnector
    from blocks.postgres import PostgresConnector
    from deployments.bootstrap import register_types
    from opsloop import demodata

    timings = TIMINGS
    t0 = time.monotonic()
    _context()  # the forkserver imports the flows (and what a run loads lazily) while the model trains
    register_types()
    base = Path(tempfile.mkdtemp(prefix="opsloop-faults-", dir=TEST_HOME))
    dsn = pg_cluster.create_database(f"{TAG}_source")
    demodata.seed(dsn, CUSTOMERS, seed=21)
    PostgresConnector(dsn=SecretStr(dsn)).save(TAG, overwrite=True)
    Secret(value=SecretStr("faults-lab-salt")).save(f"{TAG}-salt", overwrite=True)
    MLflowConnector(tracking_uri=mlflow_server, experiment=TAG).save(TAG, overwrite=True)
    mlflow = f"opsloop-mlflow/{TAG}"
    _train_champion(base, mlflow, demo_warehouse_template)
    timings["train champion"] = time.monotonic() - t0

    t1 = time.monotonic()
    template = new_pipeline(base, "tpl", mlflow)
    template.crm().seed("salesforce", "Contact", CUSTOMERS + 20)  # the CRM knows the customers (and a few new)
    day0 = run_nightly(template)
    assert day0.returncode == 0, f"day 0 of the template failed: {day0.state} {day0.message}\n{day0.output}"
    timings["day 0 (template)"] = time.monotonic() - t1
    day1 = demodata.advance(dsn, seed=5)
    lab = Lab(base, dsn, mlflow, template, day1, timings)
    yield lab
    dispose(template, dsn)
    shutil.rmtree(base, ignore_errors=True)
    (TEST_HOME / "fault-timings.json").write_text(json.dumps(TIMINGS, indent=1))  # also under pytest-xdist


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("fault lab timings (wall seconds)")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{seconds:8.1f}  {name}")


__all__ = ["MODEL", "Lab"]
