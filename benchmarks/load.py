"""Load: the real nightly flow on N customers / M transactions, on a stack this script starts itself.

    python -m benchmarks.load --customers 1000000 --transactions 10000000     # make bench-load (~1 h)
    python -m benchmarks.load --customers 10000 --transactions 100000 --no-doc  # a quick check (~3 min)

1. In a temp dir: a PostgreSQL cluster (``PgCluster``: the demo source and the Prefect server's
   database), a Prefect server on it, an MLflow server (sqlite store) and the CRM sandbox
   (``SandboxServer``, HubSpot's ten-secondly limit off, as in ``benchmarks/crm_push.py``).
2. The source is seeded by ``opsloop.demodata.seed`` (100k customers per COPY chunk) and the
   sandbox's Salesforce org gets one Contact per customer (Salesforce creates no Contact without a
   LastName; a real org has them). Block documents named ``load`` point at all of it; the spec is
   ``pipelines/customer_ops_ai.yaml`` with those block names, ``model.trainSample`` and (optional)
   fewer trees.
3. ``flows.nightly.nightly`` runs once in a child process (``benchmarks/_load_child.py``): ingest
   (initial CDC snapshot) → train (no champion yet, so the retrain check triggers it) → score →
   sync (every customer is a new prediction, pushed to Salesforce and HubSpot) → cost/KPI report.
   The parent samples the RSS of the child's process tree and of every service (psutil, 0.5 s),
   and reads the child's own peak RSS from ``wait4``.

The figures replace the ``load`` section of docs/benchmarks.md (``--no-doc`` to skip).
Not in ``make bench``'s default set (``IN_DEFAULT_SET``); ``make bench-load`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import DATA, REPO, write_section
from benchmarks._load_report import render

IN_DEFAULT_SET = False  # hours at full size: `make bench-load`, never part of `make bench`
TAG = "load"
SPEC = REPO / "pipelines" / "customer_ops_ai.yaml"
SANDBOX_ARGS = ["--hubspot-ten-second-limit", "0"]


@dataclass
class Stack:
    base: Path
    pg: Any
    prefect: Any
    mlflow: Any
    sandbox: Any
    env: dict[str, str]
    source_dsn: str = ""
    mlflow_url: str = ""
    stopped: bool = False

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        pidfile = self.pg.data / "postmaster.pid"
        if pidfile.exists():
            out["postgres"] = int(pidfile.read_text().split()[0])
        for name, svc in (("prefect server", self.prefect), ("mlflow server", self.mlflow)):
            pid = svc.pid()
            if pid:
                out[name] = pid
        out["crm sandbox"] = self.sandbox.process.pid
        return out

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.sandbox.stop()
        self.mlflow.stop()
        self.prefect.stop()
        self.pg.stop()


def start_stack(base: Path) -> Stack:
    """PostgreSQL, Prefect server (on that PostgreSQL), MLflow server, CRM sandbox — all under ``base``."""
    from opsloop.devstack.postgres import PgCluster, free_port
    from opsloop.devstack.process import Service
    from opsloop.devstack.stack import _bin
    from sandbox.client import SandboxServer

    base.chmod(0o755)  # postgres (when we are root) must traverse it
    settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_wal_size": "4GB"}
    pg = PgCluster(base / "pg", free_port(), settings=settings)
    pg.start()
    pg.create_database("prefect")
    source = pg.create_database("source")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "OPSLOOP_HOME": str(base / "home"),
        "OPSLOOP_REPO": str(REPO),
        "PYTHONPATH": str(REPO),
    }
    run = base / "run"
    prefect = Service(
        "prefect-server",
        [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        run,
        health_url=f"{api}/health",
        env={
            **env,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{pg.port}/prefect",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_ENABLED": "false",
        },
        cwd=REPO,
        start_timeout=300,
    )
    mport = free_port()
    mlflow_url = f"http://127.0.0.1:{mport}"
    (base / "mlflow").mkdir()
    store = f"sqlite:///{base / 'mlflow' / 'mlflow.db'}"
    margs = ["--backend-store-uri", store, "--artifacts-destination", str(base / "mlflow" / "artifacts")]
    margs += ["--serve-artifacts", "--host", "127.0.0.1", "--port", str(mport), "--workers", "1"]
    mlflow = Service(
        "mlflow-server",
        [_bin("mlflow"), "server", *margs],
        run,
        health_url=f"{mlflow_url}/health",
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=base / "mlflow",
        start_timeout=300,
    )
    stack = Stack(base, pg, prefect, mlflow, None, env, source, mlflow_url)
    try:
        prefect.start()
        mlflow.start()
        stack.sandbox = SandboxServer.start(base / "sandbox", extra_args=SANDBOX_ARGS, timeout=120)
    except BaseException:
        mlflow.stop()
        prefect.stop()
        pg.stop()
        raise
    return stack


def seed_source(stack: Stack, customers: int, transactions: int, chunk: int = 50_000) -> dict[str, Any]:
    """The demo source at scale (streamed in COPY chunks), then one Salesforce Contact per customer."""
    from opsloop import demodata

    t0 = time.perf_counter()

    def progress(counts: dict[str, int]) -> None:
        print(f"  seeded {counts} ({time.perf_counter() - t0:.0f} s)", flush=True)

    counts = demodata.seed(stack.source_dsn, customers, seed=7, transactions=transactions, progress=progress)
    seed_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    client = stack.sandbox.client()
    for start in range(1, customers + 1, chunk):
        client.seed("salesforce", "Contact", min(chunk, customers - start + 1), start=start)
    contacts_s = time.perf_counter() - t1
    print(f"  {customers} Salesforce contacts in the sandbox ({contacts_s:.0f} s)", flush=True)
    return {"counts": counts, "seed_s": seed_s, "contacts_s": contacts_s}


def write_spec(dest: Path, train_sample: int | None, trees: int | None) -> Path:
    text = SPEC.read_text()
    for old, new in {
        "secret/opsloop-pii-salt": f"secret/{TAG}-salt",
        "opsloop-postgres/source": f"opsloop-postgres/{TAG}",
        "opsloop-salesforce/sandbox": f"opsloop-salesforce/{TAG}",
        "opsloop-hubspot/sandbox": f"opsloop-hubspot/{TAG}",
    }.items():
        text = text.replace(old, new)
    data = yaml.safe_load(text)
    if train_sample:
        data["model"]["trainSample"] = train_sample
    if trees:
        data["model"]["params"]["n_estimators"] = trees
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def save_blocks(stack: Stack, duckdb_memory: str, threads: int | None) -> dict[str, str]:
    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    import blocks
    from blocks.mlflow import MLflowConnector
    from blocks.postgres import PostgresConnector
    from blocks.warehouse import DuckDBConnector
    from deployments.bootstrap import register_types

    register_types()
    wh = stack.base / "warehouse.duckdb"
    DuckDBConnector(path=str(wh), memory_limit=duckdb_memory, threads=threads).save(TAG, overwrite=True)
    MLflowConnector(tracking_uri=stack.mlflow_url, experiment=TAG).save(TAG, overwrite=True)
    PostgresConnector(dsn=SecretStr(stack.source_dsn)).save(TAG, overwrite=True)
    Secret(value=SecretStr("load-benchmark-salt")).save(f"{TAG}-salt", overwrite=True)
    for doc in blocks.local_crm_documents(stack.sandbox.url).values():
        doc.save(TAG, overwrite=True)
    return {"warehouse": f"opsloop-duckdb/{TAG}", "mlflow": f"opsloop-mlflow/{TAG}", "warehouse_file": str(wh)}


@dataclass
class Watch:
    """RSS of a process tree and of the services, sampled every ``interval`` s (peak kept)."""

    pid: int
    services: dict[str, int]
    interval: float = 0.5
    peak_tree_mb: float = 0.0
    peak_services_mb: dict[str, float] = field(default_factory=dict)
    peak_load: float = 0.0
    loads: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @staticmethod
    def tree_mb(pid: int) -> float:
        import psutil

        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20

    def run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            self.peak_tree_mb = max(self.peak_tree_mb, self.tree_mb(self.pid))
            for name, pid in self.services.items():
                self.peak_services_mb[name] = max(self.peak_services_mb.get(name, 0.0), self.tree_mb(pid))
            n += 1
            if n % 10 == 0:
                load = os.getloadavg()[0]
                self.loads.append(load)
                self.peak_load = max(self.peak_load, load)

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_nightly(stack: Stack, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The nightly flow in a measured child: its result JSON + wall, wait4 peak RSS, sampled tree RSS."""
    result = stack.base / f"nightly-{time.time_ns()}.json"
    log = stack.base / "nightly.log"
    cmd = [sys.executable, "-m", "benchmarks._load_child", json.dumps(params), str(result)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **stack.env}, cwd=REPO)
        with Watch(proc.pid, stack.pids()) as watch:
            deadline = time.monotonic() + timeout
            status, usage = 0, None
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError(f"nightly still running after {timeout:.0f} s (log: {log})")
                time.sleep(0.2)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not result.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"the nightly child exited {proc.returncode} without a result:\n{tail}")
    info = json.loads(result.read_text())
    info.update(
        {
            "returncode": proc.returncode,
            "child_wall_s": wall,
            "wait4_maxrss_mb": usage.ru_maxrss / 1024 if usage else None,
            "peak_tree_mb": watch.peak_tree_mb,
            "peak_services_mb": watch.peak_services_mb,
            "load_before": load_before,
            "load_during": watch.loads,
            "load_peak": watch.peak_load,
            "load_after": os.getloadavg(),
            "log": str(log),
        }
    )
    return info


def fmt_count(n: int) -> str:
    for div, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n:,}"


def publish(args: argparse.Namespace, seeded: dict[str, Any], info: dict[str, Any]) -> None:
    """Print the section and (unless ``--no-doc``) write it into docs/benchmarks.md."""
    command = (
        f"python -m benchmarks.load --customers {args.customers} --transactions {args.transactions}"
        + (f" --train-sample {args.train_sample}" if args.train_sample != 200_000 else "")
        + (f" --trees {args.trees}" if args.trees else "")
        + (f" --duckdb-memory {args.duckdb_memory}" if args.duckdb_memory != "1GB" else "")
    )
    title = f"Load: {fmt_count(args.customers)} customers / {fmt_count(args.transactions)} transactions"
    others = [json.loads(p.read_text()) for p in args.compare if p.exists()]
    body = render(title, args, seeded, info, others)
    print(body, flush=True)
    if not args.no_doc:
        write_section("load", body, command)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--transactions", type=int, default=10_000_000, help="aimed at (±0.5 %%)")
    ap.add_argument("--train-sample", type=int, default=200_000, help="model.trainSample of the run's spec")
    ap.add_argument("--trees", type=int, default=None, help="model.params.n_estimators (default: the spec's 300)")
    ap.add_argument("--duckdb-memory", default="1GB", help="memory_limit of the DuckDB warehouse block")
    ap.add_argument("--duckdb-threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=6 * 3600)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (warehouse, logs) and print it")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--from-result", type=Path, help="only re-render the section from a kept load-result.json")
    ap.add_argument(
        "--compare",
        type=Path,
        nargs="*",
        default=[],
        help="results of smaller runs (benchmarks/.data/load-N.json) for the scaling table",
    )
    args = ap.parse_args(argv if argv is not None else [])  # run_all: the defaults
    if args.from_result:
        saved = json.loads(args.from_result.read_text())
        publish(args, saved["seed"], saved["run"])
        return
    base = Path(tempfile.mkdtemp(prefix="opsloop-load-", dir="/tmp"))
    print(f"load benchmark in {base}", flush=True)
    t0 = time.perf_counter()
    stack = start_stack(base)
    os.environ.update(stack.env)  # this process saves the block documents on the same server
    try:
        setup_s = time.perf_counter() - t0
        print(f"stack up in {setup_s:.0f} s; seeding …", flush=True)
        load_seed = os.getloadavg()
        seeded = seed_source(stack, args.customers, args.transactions)
        seeded["load_before"] = load_seed
        names = save_blocks(stack, args.duckdb_memory, args.duckdb_threads)
        spec = write_spec(base / "customer_ops_ai.yaml", args.train_sample, args.trees)
        params = {"spec_path": str(spec), "warehouse": names["warehouse"], "mlflow": names["mlflow"]}
        print("running the nightly flow …", flush=True)
        started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        info = run_nightly(stack, params, args.timeout)
        info["started_utc"] = started
        info["warehouse_mb"] = sum(p.stat().st_size for p in base.glob("warehouse.duckdb*")) / 2**20
        saved = json.dumps({"seed": seeded, "run": info, "args": vars(args)}, indent=1, default=str)
        (base / "load-result.json").write_text(saved)
        DATA.mkdir(parents=True, exist_ok=True)
        (DATA / f"load-{args.customers}.json").write_text(saved)  # for --compare / --from-result later
        if not info.get("completed"):
            args.no_doc = True  # a failed run is printed, never published
        publish(args, seeded, info)
        if not info.get("completed"):
            raise SystemExit(f"the nightly run ended {info.get('state')}: {info.get('message')} (log {info['log']})")
    finally:
        stack.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
