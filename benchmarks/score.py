"""Scoring benchmark: the RandomForest of the shipped spec (300 trees, depth 8) scoring 1M and 5M
rows end to end — warehouse read → features → predict_proba → MERGE into the predictions table
(+ history) — next to the same fitted pipeline's predict_proba on the same rows already in memory
(the limit). Each measurement runs in its own child process (wall time, peak RSS).

    python -m benchmarks.score                       # 1M and 5M rows
    python -m benchmarks.score --rows 200000,600000  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from benchmarks._common import DATA, REPO, run_measured, write_section

AS_OF = date(2026, 11, 1)
SPEC = REPO / "pipelines" / "customer_ops_ai.yaml"


MEMORY_LIMIT = os.environ.get("OPSLOOP_BENCH_SCORE_MEMORY", "512MB")


def _spec():  # type: ignore[no-untyped-def]
    from opsloop.spec import load_spec

    return load_spec(SPEC)


def _features_sql(n: int) -> str:
    """n demo-shaped feature rows generated inside DuckDB (learnable label, some NULLs)."""
    return f"""
CREATE OR REPLACE TABLE ops_ai.customer_features AS
WITH b AS (
  SELECT i, random() AS r1, random() AS r2, random() AS r3, random() AS r4, random() AS r5 FROM range({n}) t(i)
)
SELECT printf('C%09d', i) AS customer_id, DATE '{AS_OF}' AS as_of,
       CASE WHEN r1 < 0.01 THEN NULL ELSE round(49 + 2000 * r2 * r2, 2) END AS mrr,
       CAST(20 + 1400 * r3 AS BIGINT) AS tenure_days,
       CAST(30 * r4 AS BIGINT) AS tx_count_90d,
       round(3000 * r4 * r5, 2) AS tx_amount_90d,
       CAST(6 * r5 * r5 AS BIGINT) AS tickets_90d,
       CAST(3 * r5 * r1 AS BIGINT) AS open_tickets,
       CASE WHEN r4 < 0.03 THEN NULL ELSE CAST(120 * (1 - r4) AS BIGINT) END AS days_since_last_tx,
       ['smb', 'mid', 'enterprise'][1 + CAST(floor(r2 * 3) AS BIGINT)] AS segment,
       ['basic', 'pro', 'enterprise'][1 + CAST(floor(r3 * 3) AS BIGINT)] AS plan,
       CASE WHEN r1 > 0.99 THEN NULL ELSE ['DE', 'FR', 'GB', 'US', 'NL', 'ES'][1 + CAST(floor(r1 * 6) AS BIGINT)] END
         AS country,
       (r5 * 0.6 + (1 - r4) * 0.4 + random() * 0.3) > 0.85 AS churned
FROM b"""


def prepare(n: int, workdir: Path) -> tuple[Path, Path]:
    """A DuckDB warehouse with n feature rows, and the RF fitted on a 50k sample (pickled)."""
    from opsloop.ml.features import target_array, to_frame
    from opsloop.ml.train import make_pipeline
    from opsloop.warehouse.duckdb import DuckDBAdapter

    spec = _spec()
    db = workdir / f"score_{n}.duckdb"
    db.unlink(missing_ok=True)
    wh = DuckDBAdapter(db)
    wh.ensure_dataset("ops_ai")
    wh.execute(_features_sql(n))
    model = workdir / "rf.pkl"
    if not model.exists():
        sample = wh.query("SELECT * FROM ops_ai.customer_features USING SAMPLE 50000 ROWS (reservoir, 7)")
        pipe = make_pipeline(spec.model)
        pipe.fit(to_frame(sample, spec.model.features), target_array(sample, spec.model.features))
        model.write_bytes(pickle.dumps(pipe))
    return db, model


def _cpu() -> float:
    return time.process_time()  # every thread of this process: predict_proba's joblib threads, DuckDB's


def child_e2e(db: str, model: str) -> dict[str, float]:
    import opsloop.ml.score as scoring
    import opsloop.ml.score_write as writing
    from opsloop.ml.models import ResolvedModels, ScoringModel
    from opsloop.warehouse.duckdb import DuckDBAdapter

    spec = _spec()
    pipe = pickle.loads(Path(model).read_bytes())  # our own benchmark artifact
    # the warehouse block's memory_limit (DuckDB would otherwise cache up to 80 % of RAM)
    wh = DuckDBAdapter(db, memory_limit=MEMORY_LIMIT)
    for t in ("predictions", "prediction_history"):
        wh.execute(f"DROP TABLE IF EXISTS ops_ai.{t}")
    models = ResolvedModels(ScoringModel(spec.model.name, "1", "champion", pipe))
    tail: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any, **kw: Any) -> Any:
            w, c = time.perf_counter(), _cpu()
            try:
                return fn(*args, **kw)
            finally:
                tail.update({f"{name}_s": time.perf_counter() - w, f"{name}_cpu": _cpu() - c})

        return run

    # the serial part at the end: MERGE into the predictions + the history rows (one transaction)
    scoring.write_predictions = timed("tail", scoring.write_predictions)  # type: ignore[method-assign]
    writing._history_and_review = timed("history", writing._history_and_review)  # type: ignore[method-assign]
    started, cpu = time.perf_counter(), _cpu()
    res = scoring.score_partition(
        wh, spec, models, as_of=AS_OF, run_id="bench", batch_id="bench", scored_at=datetime.now(UTC)
    )
    seconds, cpu = time.perf_counter() - started, _cpu() - cpu
    return {"rows": res.rows, "seconds": seconds, "cpu": cpu, "inserted": res.inserted, **tail}


def child_raw(db: str, model: str) -> dict[str, float]:
    """predict_proba on every row in memory: one call, and calls of ``scoring.chunkRows`` rows (what
    the end-to-end run does); the faster of the two is the limit."""
    from opsloop.ml.features import to_frame
    from opsloop.warehouse.duckdb import DuckDBAdapter

    spec = _spec()
    pipe = pickle.loads(Path(model).read_bytes())  # our own benchmark artifact
    table = DuckDBAdapter(db).query("SELECT * FROM ops_ai.customer_features")
    x = to_frame(table, spec.model.features)
    del table
    out: dict[str, float] = {"rows": len(x), "n_jobs": float(pipe.named_steps["model"].n_jobs or 1)}
    started, cpu = time.perf_counter(), _cpu()
    p = pipe.predict_proba(x)
    out.update(seconds=time.perf_counter() - started, cpu=_cpu() - cpu)
    del p
    chunk = spec.scoring.chunk_rows
    started, cpu = time.perf_counter(), _cpu()
    for i in range(0, len(x), chunk):
        pipe.predict_proba(x.iloc[i : i + chunk])
    out.update(chunked_s=time.perf_counter() - started, chunked_cpu=_cpu() - cpu, chunk=float(chunk))
    return out


def run(sizes: list[int], repeats: int = 2) -> str:
    workdir = DATA / "score"
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        "| rows | end-to-end s (CPU s) | of which serial MERGE s | e2e rows/s | raw "
        "predict_proba s (CPU s): one call / chunked | limit rows/s | **e2e / raw** (wall) | CPU ratio | "
        "+ history and review queue s (CPU s) | e2e / raw with them | load avg | e2e peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rss: list[float] = []
    notes: list[str] = []
    n_jobs = chunk = 0.0
    for n in sizes:
        db, model = prepare(n, workdir)
        res: dict[str, list[dict[str, float]]] = {"e2e": [], "raw": []}
        child = [sys.executable, "-m", "benchmarks.score", "--child"]
        loads = [os.getloadavg()[0]]
        for _ in range(repeats):  # interleaved, so both see the same machine conditions
            for mode in ("e2e", "raw"):
                m = run_measured([*child, mode, "--db", str(db), "--model", str(model)])
                loads.append(os.getloadavg()[0])
                res[mode].append({**json.loads(m.stdout.strip().splitlines()[-1]), "rss": m.peak_rss_mb})
                print(f"  {n:>9} {mode}: {res[mode][-1]}", flush=True)
        # the best run of each (wall; raw: its faster variant); peak RSS: the highest of the e2e runs
        fastest: dict[str, float] = min(res["e2e"], key=lambda x: x["seconds"] - x.get("history_s", 0.0))
        e = dict(fastest)
        e["rss"] = max(x["rss"] for x in res["e2e"])
        r = min(res["raw"], key=lambda x: min(x["seconds"], x["chunked_s"]))
        n_jobs, chunk = r["n_jobs"], r["chunk"]
        best_s, best_cpu = min((r["seconds"], r["cpu"]), (r["chunked_s"], r["chunked_cpu"]))
        hist_s, hist_cpu = e.get("history_s", 0.0), e.get("history_cpu", 0.0)
        # end to end as the issue defines it: warehouse read → features → predict_proba → MERGE
        e2e_s, e2e_cpu = e["seconds"] - hist_s, e["cpu"] - hist_cpu
        ratio = (e["rows"] / e2e_s) / (r["rows"] / best_s)
        cpu_ratio = (e["rows"] / e2e_cpu) / (r["rows"] / best_cpu)
        with_hist = (e["rows"] / e["seconds"]) / (r["rows"] / best_s)
        merge_s = e.get("tail_s", 0.0) - hist_s
        rss.append(e["rss"])
        lines.append(
            f"| {n:,} | {e2e_s:.1f} ({e2e_cpu:.1f}) | {merge_s:.1f} | "
            f"{e['rows'] / e2e_s:,.0f} | {r['seconds']:.1f} ({r['cpu']:.1f}) / "
            f"{r['chunked_s']:.1f} ({r['chunked_cpu']:.1f}) | {r['rows'] / best_s:,.0f} | **{ratio:.2f}** | "
            f"{cpu_ratio:.2f} | {hist_s:.1f} ({hist_cpu:.1f}) | {with_hist:.2f} | "
            f"{min(loads):.1f}–{max(loads):.1f} | {e['rss']:.0f} |"
        )
        side = e2e_cpu - (e.get("tail_cpu", 0.0) - hist_cpu) - best_cpu
        notes.append(
            f"* {n:,} rows: predict_proba alone keeps {best_cpu / best_s:.2f} of {os.cpu_count()} cores busy "
            f"({best_cpu:.1f} CPU s in {best_s:.1f} s). End to end adds {e2e_cpu - best_cpu:.1f} CPU s: "
            f"{e.get('tail_cpu', 0) - hist_cpu:.1f} in the serial MERGE ({merge_s:.1f} s wall) and {side:.1f} beside "
            "predict_proba (reading, features and preprocessing, predictions batches, Parquet staging, "
            "contention), which stretch "
            f"the scoring phase from {best_s:.1f} s to {e['seconds'] - e.get('tail_s', 0):.1f} s. The history and "
            f"review-queue rows, written after the MERGE in the same transaction, add {hist_s:.1f} s "
            f"({hist_cpu:.1f} CPU s)."
        )
        db.unlink(missing_ok=True)
    growth = rss[-1] / rss[0] if len(rss) > 1 else 1.0
    return (
        f"## Scoring (RandomForest 300 trees, depth 8, n_jobs={n_jobs:.0f} in both runs)\n\n"
        "End to end = `score_partition`: a thread reads the population from DuckDB into local Arrow chunk "
        f"files (all of it before scoring starts), predict_proba runs on chunks of {chunk:,.0f} rows with the "
        "next chunk's Arrow preprocessing and drift counts built alongside, a second thread writes the "
        "scored chunks (the per-row columns; the run's constants — model, run, dates — are added as literals "
        "by the MERGE) to the partition's local staging file (Parquet, uncompressed: DuckDB's staging table, "
        "read by `read_parquet`); then one transaction MERGEs it into `ops_ai.predictions` (the *serial* "
        "column) and writes `prediction_history` and the review queue from it. "
        "The headline ratio is the issue's end to end — warehouse read → features "
        "→ predict_proba → MERGE; the history and review-queue step is reported next to it. "
        "Raw = the same unpickled pipeline (same `n_jobs`) on the same rows already in a DataFrame, "
        "once as one call and once in the end-to-end chunk size; the faster is the limit. CPU ratio = the "
        "same ratio in CPU seconds of the whole process (every thread), which the other engineers' load on "
        f"the shared 2 cores disturbs less than wall time. Each size: {repeats} interleaved runs of each, the "
        "faster kept (peak RSS: the higher of the end-to-end runs). Target: e2e ≥ 0.8 of raw, peak RSS flat.\n\n"
        + "\n".join(lines)
        + "\n\nWhere the time goes:\n\n"
        + "\n".join(notes)
        + f"\n\nPeak RSS growth {sizes[0]:,} → {sizes[-1]:,} rows: ×{growth:.2f} (the raw run holds all rows). "
        f"Scheduling: {_priority()}. DuckDB memory_limit {MEMORY_LIMIT}.\n\n"
        "Where the memory goes (RSS sampled every 0.05 s in an e2e child, with DuckDB's `duckdb_memory()` "
        "after each write step, sessions 5–7, 2026-11-27): the scoring side holds fixed-size buffers — chunks "
        "of 245,760 rows (the first one an eighth of that), the next chunk's preprocessed input, two-deep "
        "queues — and every freed buffer goes back to the OS after each chunk (Arrow's pool and glibc's "
        "arenas: `release_memory`, ≈ 4 ms a call); the scoring phase peaks at 624–645 MB at 1M and 5M rows "
        "alike (657 at 10M). On DuckDB the population read lands before scoring starts: DuckDB caches a "
        "scanned table until the read's connection closes, and a read overlapping scoring put up to the "
        "table's size on top of the scoring buffers (5M: 695–708 MB). The write step used to be the part that "
        "grew (peaks 630 / 705 MB at 1M / 5M, session 6): the staged-key uniqueness check (sorted 64-bit "
        "hashes, 40 MB at 5M rows, instead of `COUNT(DISTINCT)`'s 200 MB hash table) left ≈ 100 MB of freed "
        "pages in the allocators, and the MERGE and history inserts stacked on them; `duckdb_memory()` showed "
        "DuckDB itself holding only 11 / 56 MB of table blocks at 1M / 5M after the MERGE. Handing those "
        "pages back right after the check (`release_memory`) brought the 5M write step to 636 MB, below the "
        "scoring phase. Beyond 5M the pool's cache of the written tables (≈ 11 MB per million rows per table) "
        "still adds up until the block's `memory_limit` caps it (probe at 10M: write step 796 MB). Tried "
        "without gain: `memory_limit` 256MB (flat, but DuckDB's ordered insert then runs on one thread: "
        "history 3.9 → 8.8 s at 5M), `allocator_background_threads` / `allocator_flush_threshold`, "
        "`preserve_insertion_order=false`, committing the MERGE in pieces, glibc `MALLOC_MMAP_THRESHOLD_` "
        "(−140 MB but +30 % CPU), a read bounded to two chunk files ahead (812 MB at 5M)."
    )


def _priority() -> str:
    """This run's niceness (and its autogroup's, which decides its CPU share against other sessions)."""
    group = Path("/proc/self/autogroup")
    auto = group.read_text().split()[-1] if group.exists() else "n/a"
    return f"nice {os.nice(0)}, autogroup nice {auto}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default=os.environ.get("OPSLOOP_BENCH_SCORE_ROWS", "1000000,5000000"))
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each child per size")
    ap.add_argument("--child", choices=("e2e", "raw"))
    ap.add_argument("--db")
    ap.add_argument("--model")
    args = ap.parse_args(argv if argv is not None else [])
    if args.child:
        out = child_e2e(args.db, args.model) if args.child == "e2e" else child_raw(args.db, args.model)
        print(json.dumps(out), flush=True)
        return
    sizes = [int(x) for x in args.rows.split(",")]
    body = run(sizes, args.repeats)
    write_section("score", body, f"python -m benchmarks.score --rows {args.rows} --repeats {args.repeats}")
    print(body)


if __name__ == "__main__":
    main(sys.argv[1:])
