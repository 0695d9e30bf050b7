"""The fault lab: one demo source in Postgres, a pipeline state after "day 0" (template), and clones
of it — each clone gets a copy of the template's DuckDB warehouse, its CRM sandbox state and its
replication slot (``pg_copy_logical_replication_slot``), so every clone starts from the same state
and reads exactly the same "day 1" changes from the same WAL. The reference clone runs day 1 without
a fault; each fault clone runs it with one fault, then again without, and must end identical.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient, SandboxServer
from tests.faults.compare import Snapshot
from tests.support.fixtures.core import REPO

SPEC = REPO / "pipelines" / "customer_ops_ai.yaml"
TAG = "faults"
MODEL = "faults_churn"
PUBLICATION = "opsloop_faults"
SANDBOX_ARGS = ["--hubspot-ten-second-limit", "0", "--bulk-inprogress-polls", "1"]
NIGHTLY = {"retrain": "never", "sources": ["postgres_main"]}  # the champion is trained once per session


@dataclass
class Pipeline:
    """One copy of the pipeline: its spec, warehouse file and block, slot and CRM sandbox."""

    name: str
    base: Path
    spec_path: Path
    warehouse: str
    warehouse_file: Path
    slot: str
    sandbox: SandboxServer
    mlflow: str
    extra: dict[str, Any] = field(default_factory=dict)

    def params(self, **more: Any) -> dict[str, Any]:
        return {
            "spec_path": str(self.spec_path),
            "warehouse": self.warehouse,
            "mlflow": self.mlflow,
            **NIGHTLY,
            **more,
        }

    def wh(self) -> DuckDBAdapter:
        return DuckDBAdapter(self.warehouse_file)

    def crm(self) -> SandboxClient:
        return self.sandbox.client()


def write_spec(dest: Path, name: str, slot: str, crm_block: str, **overrides: Any) -> Path:
    """The demo spec for one lab pipeline: its own slot and CRM blocks, the lab's source/salt blocks,
    a small and fast model, small CDC batches (so one day's changes need several MERGEs), no SLOs
    (they judge run history, and fault runs fail on purpose)."""
    text = SPEC.read_text()
    text = text.replace("opsloop-salesforce/sandbox", f"opsloop-salesforce/{crm_block}")
    text = text.replace("opsloop-hubspot/sandbox", f"opsloop-hubspot/{crm_block}")
    text = text.replace("opsloop-postgres/source", f"opsloop-postgres/{TAG}")
    text = text.replace("secret/opsloop-pii-salt", f"secret/{TAG}-salt")
    data = yaml.safe_load(text)
    data["cdc"].update({"slotName": slot, "publication": PUBLICATION, "batchChanges": 150})
    data["model"]["name"] = MODEL
    data["model"]["params"].update({"n_estimators": 60})
    data["transform"]["quarantine"]["maxShare"] = 0.25  # a day of 300 customers has ~35 transactions
    data.pop("slos", None)
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        data.setdefault(section, {})[leaf] = value
    path = dest / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def save_crm_blocks(sandbox_url: str, name: str) -> None:
    import blocks

    for ref, doc in blocks.local_crm_documents(sandbox_url).items():
        del ref
        doc.save(name, overwrite=True)


def save_warehouse_block(path: Path, name: str) -> str:
    from blocks.warehouse import DuckDBConnector

    DuckDBConnector(path=str(path)).save(name, overwrite=True)
    return f"opsloop-duckdb/{name}"


def new_pipeline(base: Path, name: str, mlflow: str, **spec_overrides: Any) -> Pipeline:
    """A fresh pipeline (empty warehouse, empty sandbox, no slot yet)."""
    root = base / name
    root.mkdir(parents=True, exist_ok=True)
    sandbox = SandboxServer.start(root / "sandbox", extra_args=SANDBOX_ARGS)
    block = f"{TAG}-{name}"
    save_crm_blocks(sandbox.url, block)
    wh_file = root / "warehouse.duckdb"
    slot = f"opsloop_{TAG}_{name}".replace("-", "_")  # slot names: [a-z0-9_]
    spec = write_spec(root, name, slot, block, **spec_overrides)
    return Pipeline(name, root, spec, save_warehouse_block(wh_file, block), wh_file, slot, sandbox, mlflow)


def clone(src: Pipeline, name: str, source_dsn: str, **spec_overrides: Any) -> Pipeline:
    """A copy of ``src`` as it is now: warehouse file, sandbox state, replication slot position
    (``spec_overrides`` as in :func:`write_spec`, e.g. ``{"warehouse.leaseWait": "3s"}``)."""
    root = src.base.parent / name
    if root.exists():
        shutil.rmtree(root)
    (root / "sandbox").mkdir(parents=True)
    wh_file = root / "warehouse.duckdb"
    shutil.copy(src.warehouse_file, wh_file)
    wal = Path(f"{src.warehouse_file}.wal")
    if wal.exists():
        shutil.copy(wal, f"{wh_file}.wal")
    with (
        sqlite3.connect(src.sandbox.state_dir / "sandbox.sqlite3") as a,
        sqlite3.connect(root / "sandbox" / "sandbox.sqlite3") as b,
    ):
        a.backup(b)
    sandbox = SandboxServer.start(root / "sandbox", extra_args=SANDBOX_ARGS)
    block = f"{TAG}-{name}"
    save_crm_blocks(sandbox.url, block)
    slot = f"opsloop_{TAG}_{name}".replace("-", "_")  # slot names: [a-z0-9_]
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (src.slot, slot))
    # the committed CDC state names the slot it was built from: the copy continues from it as its own
    wh = DuckDBAdapter(wh_file)
    wh.execute(
        "UPDATE opsloop_meta._opsloop_state SET extra = replace(extra, $old, $new)",
        {"old": json.dumps({"slot": src.slot})[1:-1], "new": json.dumps({"slot": slot})[1:-1]},
    )
    data = yaml.safe_load(src.spec_path.read_text())
    data["cdc"]["slotName"] = slot
    for key, value in spec_overrides.items():
        section, _, leaf = key.partition(".")
        data.setdefault(section, {})[leaf] = value
    text = yaml.safe_dump(data, sort_keys=False).replace(f"/{TAG}-{src.name}\n", f"/{block}\n")
    spec = root / f"{name}.yaml"
    spec.write_text(text)
    return Pipeline(name, root, spec, save_warehouse_block(wh_file, block), wh_file, slot, sandbox, src.mlflow)


def dispose(p: Pipeline, source_dsn: str) -> None:
    p.sandbox.stop()
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (p.slot,)
        )


# -- running the nightly chain -----------------------------------------------------------------------
@dataclass
class RunResult:
    returncode: int
    state: str
    message: str
    flow_run_id: str | None
    seconds: float
    output: str = ""
    cpu_seconds: float = 0.0


_CTX: Any = None


def _context() -> Any:
    """A forkserver that imported the flows once; every run is a fork of it (fresh Prefect state)."""
    global _CTX
    if _CTX is None:
        import multiprocessing
        from multiprocessing import forkserver

        from tests.faults.run_nightly import PRELOAD

        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()  # starts importing now, in the background
    return _CTX


@dataclass
class Running:
    """A flow run in a forked child; ``wait`` collects its outcome."""

    name: str
    process: Any
    result: Path
    started: float

    def wait(self, timeout: float = 600) -> RunResult:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
            raise TimeoutError(f"{self.name} still running after {timeout} s")
        info = json.loads(self.result.read_text()) if self.result.exists() else {}
        code = self.process.exitcode
        return RunResult(
            int(code if code is not None else -1),
            str(info.get("state", "")),
            str(info.get("message", "")),
            info.get("flow_run_id"),
            time.monotonic() - self.started,
            "",
            float(info.get("cpu_seconds") or 0.0),
        )


def start_flow(
    p: Pipeline, flow: str = "nightly", fault: str | None = None, env: dict[str, str] | None = None, **params: Any
) -> Running:
    """Start ``flow`` of ``p`` in a child process; ``OPSLOOP_FAULT=fault`` and ``env`` only there.
    ``flow="ingest"`` is a manual ingest run (the CDC source only)."""
    from tests.faults.run_nightly import run_child

    args = (
        p.params(**params)
        if flow == "nightly"
        else {"spec_path": str(p.spec_path), "warehouse": p.warehouse, "sources": NIGHTLY["sources"], **params}
    )
    result = p.base / f"result-{time.monotonic_ns()}.json"
    proc = _context().Process(target=run_child, args=(args, fault, str(result), flow, env or {}))
    started = time.monotonic()
    proc.start()
    return Running(f"{flow} of {p.name} (fault {fault})", proc, result, started)


def run_nightly(p: Pipeline, fault: str | None = None, timeout: float = 600, **params: Any) -> RunResult:
    """The nightly flow of ``p`` in a child process, ``OPSLOOP_FAULT=fault`` set in the child only."""
    return start_flow(p, "nightly", fault, **params).wait(timeout)


def table_names(wh: DuckDBAdapter) -> list[TableRef]:
    rows = wh.query(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = 'warehouse' ORDER BY 1, 2"
    ).to_pylist()
    return [TableRef(r["table_schema"], r["table_name"]) for r in rows]


def snapshot(p: Pipeline, day_started: datetime, rerun_started: datetime) -> Snapshot:
    """Every warehouse table of ``p`` (all rows) and its CRM sandbox's Contact / contacts records."""
    wh = p.wh()
    with wh.session():  # one connection for all reads
        tables = {str(ref): wh.query(f"SELECT * FROM {wh.quote(ref)}").to_pylist() for ref in table_names(wh)}
    crm = p.crm()
    records = {
        "salesforce.Contact": crm.records("salesforce", "Contact"),
        "hubspot.contacts": crm.records("hubspot", "contacts"),
    }
    return Snapshot(tables, records, day_started, rerun_started, p.slot)


@dataclass
class Case:
    """One fault-injection run of day 1 on its own copy of the template, and its rerun."""

    name: str
    fault: str | None
    faulted: RunResult | None = None
    rerun: RunResult | None = None
    snap: Snapshot | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def run_case(template: Pipeline, source_dsn: str, name: str, fault: str | None) -> Case:
    """Clone the template, run day 1 with ``fault`` (if any), then without, and snapshot the result."""
    case = Case(name, fault)
    t = time.monotonic()
    p = clone(template, name, source_dsn)
    case.seconds["clone"] = time.monotonic() - t
    try:
        day_started = datetime.now(UTC)
        if fault:
            case.faulted = run_nightly(p, fault=fault)
            case.seconds["fault run"] = case.faulted.seconds
            case.seconds["fault run (CPU of the run's process)"] = case.faulted.cpu_seconds
        rerun_started = datetime.now(UTC)
        case.rerun = run_nightly(p)
        case.seconds["rerun" if fault else "run"] = case.rerun.seconds
        case.seconds[f"{'rerun' if fault else 'run'} (CPU of the run's process)"] = case.rerun.cpu_seconds
        t = time.monotonic()
        case.snap = snapshot(p, day_started, rerun_started)
        case.seconds["snapshot"] = time.monotonic() - t
    finally:
        dispose(p, source_dsn)
    return case
