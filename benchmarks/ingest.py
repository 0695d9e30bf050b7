"""Ingest benchmark: Postgres → DuckDB, opsloop (CDC and watermark) side by side with dlt.

1M-row initial load, then one 100k-row change (updates + inserts + 1 % deletes) applied once at the
source and read incrementally by every contender; plus opsloop's initial load at 5M source rows to
show its peak RSS stays flat. Every load runs in its own child process (wall time and peak RSS from
``wait4``); the contenders read the same table of the same Postgres on the same machine in the same run.

    python -m benchmarks.ingest                 # full size (1M, 100k change, 5M RSS check)
    python -m benchmarks.ingest --rows 100000 --change 10000 --big 0     # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import DATA, run_measured, write_section

TABLE_DDL = (
    "CREATE TABLE {t} (id bigint PRIMARY KEY, customer_id text, amount numeric(12,2), currency text, "
    "note text, event_time timestamptz, updated_at timestamptz NOT NULL)"
)
FILL = (
    "INSERT INTO {t} SELECT g, 'C' || lpad((g % 50000)::text, 7, '0'), round((random() * 1000)::numeric, 2), "
    "(ARRAY['EUR','USD','GBP'])[1 + g % 3], CASE WHEN g % 10 = 0 THEN NULL ELSE 'note ' || g END, "
    "timestamptz '2026-01-01' + g * interval '1 second', timestamptz '2026-06-01' + g * interval '1 millisecond' "
    "FROM generate_series({a}, {b}) g"
)


# -- the child processes -----------------------------------------------------------------------
def child_opsloop(args: argparse.Namespace) -> dict[str, Any]:
    from opsloop.ingest import ingest_source
    from opsloop.sources.postgres import PostgresSource
    from opsloop.spec import parse_spec
    from opsloop.warehouse.duckdb import DuckDBAdapter

    spec = parse_spec(
        {
            "name": "bench",
            "cdc": {"enabled": args.mode == "cdc", "source": "pg", "slotName": args.slot, "publication": args.slot},
            "sources": [
                {
                    "id": "pg",
                    "type": "database",
                    "connection": "opsloop-postgres/bench",
                    "tables": [{"name": args.table, "primaryKey": ["id"]}],
                    "sync": {"strategy": args.mode, "watermarkField": "updated_at"},
                    "chunkRows": 200_000,
                }
            ],
        }
    )
    wh = DuckDBAdapter(args.db, memory_limit=args.memory_limit or None)
    src = spec.source("pg")
    started = time.perf_counter()
    segment = int(os.environ.get("OPSLOOP_SEGMENT_ROWS", "1000000"))
    out = ingest_source(wh, spec, src, PostgresSource(args.dsn, spec, src), run_id=args.phase, segment_rows=segment)
    seconds = time.perf_counter() - started
    (rows,) = wh.query(f"SELECT count(*) FROM raw_pg.{args.table}").to_pylist()[0].values()
    return {"inner_seconds": seconds, "rows_read": out["rows_read"], "target_rows": rows,
            "changed": out["inserted"] + out["updated"] + out["deleted"]}  # fmt: skip


def child_dlt(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["RUNTIME__LOG_LEVEL"] = "ERROR"
    import dlt
    from dlt.sources.sql_database import sql_table

    url = args.dsn.replace("postgresql://", "postgresql+psycopg2://")
    kw: dict[str, Any] = {"backend_kwargs": {"conn": args.dsn}} if args.mode == "connectorx" else {}
    resource = sql_table(credentials=url, table=args.table, backend=args.mode, chunk_size=100_000,
                         incremental=dlt.sources.incremental("updated_at"), **kw)  # fmt: skip
    resource.apply_hints(primary_key="id", write_disposition="merge")
    pipe = dlt.pipeline(
        pipeline_name=f"bench_{args.mode}",
        destination=dlt.destinations.duckdb(args.db),
        dataset_name="bench",
        pipelines_dir=str(Path(args.db).parent / f"dlt-{args.mode}"),
    )
    started = time.perf_counter()
    pipe.run(resource)
    seconds = time.perf_counter() - started
    import duckdb

    con = duckdb.connect(args.db, read_only=True)
    (rows,) = con.execute(f"SELECT count(*) FROM bench.{args.table}").fetchone() or (0,)
    con.close()
    return {"inner_seconds": seconds, "target_rows": int(rows)}


# -- the driver --------------------------------------------------------------------------------
def _sql(dsn: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s)


def _count(dsn: str, table: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as c:
        return int((c.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,))[0])


def _fill(dsn: str, table: str, rows: int) -> float:
    started = time.perf_counter()
    _sql(dsn, f"DROP TABLE IF EXISTS {table}", TABLE_DDL.format(t=table))
    step = 1_000_000
    for a in range(1, rows + 1, step):
        _sql(dsn, FILL.format(t=table, a=a, b=min(a + step - 1, rows)))
    _sql(dsn, f"VACUUM ANALYZE {table}", "CHECKPOINT")  # no background flush left for the first contender
    return time.perf_counter() - started


def _change(dsn: str, table: str, rows: int, change: int) -> dict[str, int]:
    deletes = change // 100
    updates = (change - deletes) // 2
    inserts = change - deletes - updates
    _sql(
        dsn,
        f"UPDATE {table} SET amount = amount + 1, note = 'changed', updated_at = now() "
        f"WHERE id % {rows // updates} = 1 AND id <= {updates * (rows // updates)}",
        FILL.format(t=table, a=rows + 1, b=rows + inserts).replace(
            "timestamptz '2026-06-01' + g * interval '1 millisecond'", "now()"
        ),
        f"DELETE FROM {table} WHERE id % {rows // deletes} = 2",
    )
    return {"updates": updates, "inserts": inserts, "deletes": deletes}


def _pg_cpu(cluster: Any) -> float | None:
    """CPU seconds the local Postgres has used so far: the postmaster's own and its reaped backends'
    (``cutime``/``cstime``) plus its live children's (Linux ``/proc``; None elsewhere)."""
    try:
        pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        tick = os.sysconf("SC_CLK_TCK")

        def stat(p: int | str) -> list[str]:
            return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

        total = sum(int(x) for x in stat(pid)[11:15])  # utime stime cutime cstime
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    fields = stat(entry)
                    if int(fields[1]) == pid:
                        total += int(fields[11]) + int(fields[12])
        return total / tick
    except (OSError, ValueError):
        return None


def _measure(kind: str, args: list[str], cluster: Any = None) -> dict[str, Any]:
    before = _pg_cpu(cluster) if cluster is not None else None
    m = run_measured([sys.executable, "-m", "benchmarks.ingest", "child", kind, *args])
    after = _pg_cpu(cluster) if cluster is not None else None
    out = json.loads(m.stdout.strip().splitlines()[-1])
    out.update(seconds=m.seconds, peak_rss_mb=m.peak_rss_mb, cpu_seconds=m.cpu_seconds)
    out["pg_cpu_seconds"] = after - before if before is not None and after is not None else None
    return out


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the lowest wall time (the machine is shared: the others waited for CPU longer)."""
    return min(runs, key=lambda r: r["seconds"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--change", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=5_000_000, help="source rows of the RSS check (0 = skip)")
    ap.add_argument("--dlt", default="pyarrow,connectorx", help="dlt backends to compare")
    ap.add_argument("--memory-limit", default="256MB", help="DuckDB memory_limit of opsloop's warehouse block")
    ap.add_argument("--rounds", type=int, default=1, help="repeat fill → initial loads → change → incremental loads")
    ap.add_argument("--only", default="", help="comma-separated tool/mode subset, e.g. opsloop/cdc,dlt/connectorx")
    ap.add_argument("--no-doc", action="store_true", help="print the figures, leave docs/benchmarks.md alone")
    args = ap.parse_args(argv if argv is not None else [])  # make bench / run_all: the defaults
    from opsloop.devstack.postgres import PgCluster, free_port

    _compile_sources()
    work = DATA / "ingest"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cluster = PgCluster(work / "pg", free_port(), settings={"fsync": "off", "shared_buffers": "256MB"})
    cluster.start()
    load = [os.getloadavg()[0]]
    try:
        dsn = cluster.create_database("bench")
        contenders = [("opsloop", "cdc"), ("opsloop", "watermark")] + [("dlt", b) for b in args.dlt.split(",") if b]
        if args.only:
            contenders = [c for c in contenders if "/".join(c) in args.only.split(",")]
        runs: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {
            c: {"initial": [], "incremental": []} for c in contenders
        }
        for n in range(args.rounds):
            order = contenders if n % 2 == 0 else contenders[::-1]  # alternate who runs first
            fill_s, changed, source_rows = _round(args, dsn, work, order, runs, cluster)
            load.append(os.getloadavg()[0])
        results = {c: {"initial": _best(r["initial"]), "incremental": _best(r["incremental"])} for c, r in runs.items()}
        big: dict[str, Any] | None = None
        if args.big:
            _fill(dsn, "events_big", args.big)
            db = str(work / "opsloop-big.duckdb")
            big = _measure("opsloop", ["--dsn", dsn, "--table", "events_big", "--db", db, "--mode", "cdc",
                                       "--slot", "bench_big", "--phase", "initial",
                                       "--memory-limit", args.memory_limit], cluster)  # fmt: skip
            print(f"initial opsloop/cdc at {args.big}: {big}", flush=True)
            load.append(os.getloadavg()[0])
        body = report(args, results, changed, source_rows, big, fill_s, load, runs)
        print(body)
        command = f"python -m benchmarks.ingest --rows {args.rows} --change {args.change} --big {args.big}"
        command += f" --rounds {args.rounds}" + (f" --only {args.only}" if args.only else "")
        if not args.no_doc:
            write_section("ingest", body, command)
    finally:
        cluster.stop()


def _compile_sources() -> None:
    """Byte-compile opsloop and the benchmark modules before measuring, as an installed package is:
    with ``PYTHONDONTWRITEBYTECODE`` set (CI, sandboxes) every child would otherwise recompile the
    repo's sources on start-up (~0.15 s CPU), a cost the site-packages contenders never pay."""
    import compileall

    root = Path(__file__).resolve().parents[1]
    for d in (root / "src" / "opsloop", root / "benchmarks"):
        compileall.compile_dir(d, quiet=1)


def _round(
    args: argparse.Namespace,
    dsn: str,
    work: Path,
    contenders: list[tuple[str, str]],
    runs: dict[tuple[str, str], dict[str, list[dict[str, Any]]]],
    cluster: Any,
) -> tuple[float, dict[str, int], int]:
    """One fresh source table, every contender's initial load into a fresh warehouse, one change,
    every contender's incremental load."""
    fill_s = _fill(dsn, "events", args.rows)
    common: dict[tuple[str, str], list[str]] = {}
    for tool, mode in contenders:
        db = work / f"{tool}-{mode}.duckdb"
        for old in (db, db.with_suffix(".duckdb.wal"), work / f"dlt-{mode}"):
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        extra = ["--slot", f"bench_{mode}", "--memory-limit", args.memory_limit] if tool == "opsloop" else []
        common[(tool, mode)] = ["--dsn", dsn, "--table", "events", "--db", str(db), "--mode", mode, *extra]
        m = _measure(tool, [*common[(tool, mode)], "--phase", "initial"], cluster)
        runs[(tool, mode)]["initial"].append(m)
        print(f"initial {tool}/{mode}: {m}", flush=True)
    changed = _change(dsn, "events", args.rows, args.change)
    source_rows = _count(dsn, "events")
    for key in contenders:
        m = _measure(key[0], [*common[key], "--phase", "incremental"], cluster)
        m["source_rows"] = source_rows
        runs[key]["incremental"].append(m)
        print(f"incremental {key}: {m}", flush=True)
    return fill_s, changed, source_rows


def _cmp(ops: dict[str, Any], dlts: list[dict[str, Any]], phase: str) -> str:
    fastest = min(d[phase]["seconds"] for d in dlts)
    low_rss = min(d[phase]["peak_rss_mb"] for d in dlts)
    low_cpu = min(_cpu(d[phase]) for d in dlts)
    speed = fastest / ops[phase]["seconds"]
    return (
        f"{phase} **{speed:.1f}×** the rows/s (CPU: {low_cpu / _cpu(ops[phase]):.1f}× less), "
        f"peak RSS {ops[phase]['peak_rss_mb'] / low_rss:.0%} of dlt's"
    )


def _per_round(runs: dict[tuple[str, str], dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Each round's own ratio (that round's fastest dlt ÷ that round's opsloop): the contenders of a
    round ran back to back, so these show how far the best-of ratios above move with the machine."""
    dlts = [r for k, r in runs.items() if k[0] == "dlt"]
    out = []
    for mode in ("cdc", "watermark"):
        ops = runs.get(("opsloop", mode))
        if ops is None:
            continue
        parts = []
        for phase in ("initial", "incremental"):
            ratios = [
                min(d[phase][j]["seconds"] for d in dlts) / run["seconds"]
                for j, run in enumerate(ops[phase])
                if all(j < len(d[phase]) for d in dlts)
            ]
            parts.append(f"{phase} " + ", ".join(f"{x:.1f}" for x in ratios) + "×")
        out.append(f"- Round by round, `{mode}` (that round's fastest dlt ÷ that round's opsloop): {'; '.join(parts)}.")
    return out


def _cpu(m: dict[str, Any]) -> float:
    """Client CPU + the Postgres CPU the load caused."""
    return float(m["cpu_seconds"]) + float(m.get("pg_cpu_seconds") or 0.0)


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, str], dict[str, Any]],
    changed: dict[str, int],
    source_rows: int,
    big: dict[str, Any] | None,
    fill_s: float,
    load: list[float],
    runs: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] | None = None,
) -> str:
    c = changed
    rounds = f"best wall of {args.rounds} rounds per contender, with that run's CPU" if args.rounds > 1 else "one round"
    lines = [
        "## Ingest: Postgres → DuckDB (opsloop vs dlt)",
        "",
        f"One Postgres 15 table (`id` PK, text, numeric, timestamptz), {args.rows:,} rows; then one change of "
        f"{args.change:,} rows ({c['updates']:,} updates, {c['inserts']:,} inserts, {c['deletes']:,} deletes) read "
        "incrementally. opsloop `cdc` = exported-snapshot COPY, then the pgoutput slot; `watermark` = COPY by "
        "`updated_at` + primary-key scan for deletes. dlt = `sql_table` with the named backend, "
        "`incremental('updated_at')`, `write_disposition='merge'`, into DuckDB. Every load is its own child "
        "process: s = wall seconds including interpreter start and imports (work s = the load call alone); "
        "rows/s = rows read (initial) or rows changed (incremental) per wall second; CPU s = the child's "
        "user + system CPU + the Postgres server CPU during the load. opsloop's DuckDB block: "
        f"memory_limit={args.memory_limit}, otherwise defaults. Figures: {rounds}.",
        "",
        "| tool | mode | initial s (work s) | rows/s | CPU s (client + PG) | peak RSS MB | incremental s (work s) "
        "| rows/s | CPU s (client + PG) | peak RSS MB | rows after | correct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (tool, mode), r in results.items():
        i, n = r["initial"], r["incremental"]
        ok = "yes" if n["target_rows"] == source_rows else f"no ({n['target_rows'] - source_rows:+,})"
        lines.append(
            f"| {tool} | {mode} | {i['seconds']:.1f} ({i['inner_seconds']:.1f}) | {args.rows / i['seconds']:,.0f} "
            f"| {_cpu(i):.1f} ({i['cpu_seconds']:.1f} + {i.get('pg_cpu_seconds') or 0:.1f}) "
            f"| {i['peak_rss_mb']:.0f} | {n['seconds']:.1f} ({n['inner_seconds']:.1f}) | "
            f"{args.change / n['seconds']:,.0f} | {_cpu(n):.1f} ({n['cpu_seconds']:.1f} + "
            f"{n.get('pg_cpu_seconds') or 0:.1f}) | {n['peak_rss_mb']:.0f} | {n['target_rows']:,} | {ok} |"
        )
    dlts = [v for k, v in results.items() if k[0] == "dlt"]
    if dlts:
        lines.append("")
        for mode in ("cdc", "watermark"):
            if ("opsloop", mode) in results:
                ops = results[("opsloop", mode)]
                lines.append(f"- opsloop `{mode}` vs the best dlt backend: {_cmp(ops, dlts, 'initial')}; "
                             f"{_cmp(ops, dlts, 'incremental')}.")  # fmt: skip
        if runs and args.rounds > 1:
            lines += _per_round(runs)
        lines.append("- dlt's cursor cannot see hard deletes, hence its extra rows after the change.")
    if big and ("opsloop", "cdc") in results:
        init = results[("opsloop", "cdc")]["initial"]
        lines += [
            "",
            f"opsloop (cdc) initial load at {args.big:,} source rows: {big['seconds']:.1f} s "
            f"({args.big / big['seconds']:,.0f} rows/s, CPU {_cpu(big):.1f} s), peak RSS "
            f"**{big['peak_rss_mb']:.0f} MB** (vs {init['peak_rss_mb']:.0f} MB at {args.rows:,}).",
        ]
    loads = ", ".join(f"{x:.1f}" for x in load)
    lines += [
        "",
        f"(Filling the source took {fill_s:.0f} s. The machine (2 cores) was shared with other engineers' test "
        f"runs: 1-minute load average {loads} at the start / after each round{' / after the big run' if big else ''}; "
        "wall-clock ratios are noisy, "
        "the CPU columns less so.)",
    ]
    return "\n".join(lines)


def _child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tool", choices=["opsloop", "dlt"])
    for a in ("--dsn", "--table", "--db", "--mode", "--phase"):
        ap.add_argument(a, required=True)
    ap.add_argument("--slot", default="bench")
    ap.add_argument("--memory-limit", default="")
    args = ap.parse_args(argv)
    out = child_opsloop(args) if args.tool == "opsloop" else child_dlt(args)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        _child(sys.argv[2:])
    else:
        main(sys.argv[1:])
