"""HubSpot push under the ten-secondly limit: paced (as shipped) vs unpaced (429s and backoff).

    python -m benchmarks.crm_pacing [--n 20000] [--limit 100]
    (env OPSLOOP_BENCH_PACING_N / _LIMIT when run from `make bench`)

The sandbox allows ``--limit`` requests per rolling 10 s (HubSpot Free/Starter: 100; Professional and
Enterprise: 190) and answers its 429s without ``Retry-After``, since HubSpot is not documented to
send one. n changed predictions are pushed twice through ``push_destination``, each time into a
full-length empty window:

* paced: opsloop as shipped (``opsloop.crm.pacing.WindowPacer`` learns the window from the answers);
* unpaced: the same push with the pacer kept blind (it never learns a window), which is how the push
  behaved before pacing: the requests run into the limit and the retry policy backs off (0.5 s,
  doubling, with jitter).

The floor is what the limit allows: the calls (schema read and writes included) take
⌈calls / limit⌉ − 1 full windows after the first.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import write_section
from benchmarks.crm_push import _opsloop, _write_predictions

WINDOW_S = 10.0


def _blind(sink: Any) -> None:
    sink.pacer.observe = lambda headers: None  # never learns a window: no pacing


def run(n: int, limit: int) -> str:
    import psutil

    from opsloop.warehouse.duckdb import DuckDBAdapter
    from sandbox.client import SandboxServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-pacing-"))
    server = SandboxServer.start(tmp / "sandbox", extra_args=["--hubspot-ten-second-limit", str(limit)])
    rows = []
    try:
        sbx = server.client()
        sbx.rate_limit(limit, retry_after=False)
        sproc = psutil.Process(server.process.pid)
        wh = DuckDBAdapter(tmp / "warehouse.duckdb")
        for seed, (label, tune) in enumerate((("paced (opsloop)", None), ("unpaced (pacer blind)", _blind)), 1):
            _write_predictions(wh, n, seed=seed)
            time.sleep(WINDOW_S + 0.5)  # an empty window for each push
            before = sbx.requests()["hubspot"]["status"].get("429", 0)
            try:
                m = _opsloop(wh, tmp, "hubspot", sbx, sproc, bulk=n + 1, run=f"pacing-{seed}", tune=tune)
            except Exception as exc:  # the unpaced push can give up: that is a result too
                m = {"status": f"failed: {str(exc)[:120]}", "records": 0, "calls": 0, "seconds": float("nan")}
            m["refused"] = sbx.requests()["hubspot"]["status"].get("429", 0) - before
            rows.append((label, m))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"## HubSpot push under the ten-secondly limit: {n:,} changed predictions at {limit} requests per 10 s",
        "",
        "The sandbox answers its 429s without `Retry-After` (HubSpot is not documented to send it). Each push "
        "starts in an empty window. Calls = requests the sandbox answered with anything but 429 (the properties "
        "read and the writes). The floor = (⌈calls ÷ limit⌉ − 1) × 10 s.",
        "",
        "| push | status | records | calls | answered 429 | retries | waited by the pacer s | wall s | floor s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in rows:
        calls = int(m["calls"]) - int(m["refused"])
        floor = (math.ceil(calls / limit) - 1) * WINDOW_S if calls else float("nan")
        lines.append(
            f"| {label} | {m['status']} | {m['records']:,} | {calls:,} | {m['refused']:,} | "
            f"{m.get('api_retries') or 0:,} | {m.get('api_paced_s') or 0:.1f} | {m['seconds']:.1f} | {floor:.0f} |"
        )
    lines += [
        "",
        "HubSpot asks that error responses stay under 5 % of an app's requests; every 429 is one.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    ap.add_argument("--n", type=int, default=int(env("OPSLOOP_BENCH_PACING_N", 20_000)))
    ap.add_argument("--limit", type=int, default=int(env("OPSLOOP_BENCH_PACING_LIMIT", 100)))
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args(argv if argv is not None else [])
    md = run(args.n, args.limit)
    print(md)
    if not args.no_write:
        write_section("crm_pacing", md, f"python -m benchmarks.crm_pacing --n {args.n} --limit {args.limit}")


if __name__ == "__main__":
    main(sys.argv[1:])
