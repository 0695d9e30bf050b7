"""The measured child of ``benchmarks/load.py``: one run of the real nightly flow, with a stack sampler.

    python -m benchmarks._load_child '<nightly parameters as JSON>' result.json

While the flow runs, a sampler thread looks at the main thread's Python stack every ``interval``
seconds and charges the time since its previous look to (stage, owner):

* owner ``prefect``: the innermost frame that belongs either to Prefect or to the repository's own code
  (``src/opsloop``, ``tasks/``, ``flows/``, ``blocks/``) is Prefect's — the engine's state
  transitions, API calls, block loading, logging to the API, artifacts, result handling;
* owner ``opsloop``: that frame is the repository's — stage work (libraries they call, DuckDB,
  scikit-learn, psycopg, HTTP clients, count for whoever called them);
* owner ``other``: neither is on the stack (interpreter, imports).

Stage = the stage ``tasks.stages.run_stage`` is running (the whole subflow call, Prefect's set-up
included), ``report`` inside ``flows.nightly._report``, else ``nightly`` (the chain itself).
Prefect runs sync flows, subflows and directly called tasks in the calling thread, so the main
thread's stack is where the run's critical path is.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OWN = tuple(str(REPO / d) + os.sep for d in ("src/opsloop", "tasks", "flows", "blocks"))
PREFECT_MARKS = (f"{os.sep}site-packages{os.sep}prefect{os.sep}", f"{os.sep}site-packages{os.sep}prefect_")
RUN_STAGE = (str(REPO / "tasks" / "stages.py"), "run_stage")
REPORT = (str(REPO / "flows" / "nightly.py"), "_report")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _where(code: CodeType) -> str:
    fn = code.co_filename
    for mark in ("site-packages" + os.sep, str(REPO) + os.sep):
        if mark in fn:
            fn = fn.split(mark, 1)[1]
    return f"{fn}:{code.co_name}"


def classify(frame: FrameType | None) -> tuple[str, str, str]:
    """(stage, owner, entry) of a main-thread stack, innermost frame first; ``entry`` = for Prefect
    time, the outermost Prefect frame of the innermost run of Prefect frames (the API that was called),
    for opsloop time the innermost opsloop function."""
    owner = ""
    stage = ""
    entry = ""
    in_prefect = False
    f = frame
    while f is not None:
        code = f.f_code
        fn = code.co_filename
        is_prefect = any(m in fn for m in PREFECT_MARKS)
        if not owner:
            if fn.startswith(OWN):
                owner = "opsloop"
                entry = _where(code)
            elif is_prefect:
                owner = "prefect"
                in_prefect = True
        if in_prefect:
            if is_prefect:
                entry = _where(code)
            elif fn.startswith(OWN):
                in_prefect = False
        if not stage:
            if (fn, code.co_name) == RUN_STAGE:
                defn = f.f_locals.get("defn")
                stage = str(getattr(defn, "stage", "") or "stage")
            elif (fn, code.co_name) == REPORT:
                stage = "report"
        if owner and stage and not in_prefect:
            break
        f = f.f_back
    return stage or "nightly", owner or "other", entry


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE / 2**20
    except OSError:
        return 0.0


class Sampler(threading.Thread):
    """Charge wall time to the main thread's (stage, owner) at each look; its own CPU time is kept."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(name="load-sampler", daemon=True)
        self.interval = interval
        self.target = threading.main_thread().ident or 0
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.entries: dict[tuple[str, str, str], float] = defaultdict(float)  # by (stage, owner, entry)
        self.peak_rss_mb: dict[str, float] = defaultdict(float)  # this process's RSS, every 5th look
        self.samples = 0
        self.cpu = 0.0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        last = time.perf_counter()
        while not self._stop_evt.wait(self.interval):
            frame = sys._current_frames().get(self.target)
            now = time.perf_counter()
            stage, owner, entry = classify(frame)
            self.seconds[(stage, owner)] += now - last
            self.entries[(stage, owner, entry)] += now - last
            self.samples += 1
            if self.samples % 5 == 0:
                self.peak_rss_mb[stage] = max(self.peak_rss_mb[stage], rss_mb())
            last = now
            del frame
        self.seconds[("nightly", "prefect")] += time.perf_counter() - last  # the flow's return path
        self.cpu = time.thread_time()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


def _runs(root_id: str, stage_ids: dict[str, str]) -> dict[str, Any]:
    """Wall time of the nightly run and its stage subflows, and their task runs, from the Prefect API."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterFlowRunId

    ids = [UUID(root_id), *(UUID(v) for v in stage_ids.values())]
    by_id = {root_id: "nightly", **{v: k for k, v in stage_ids.items()}}
    out: dict[str, Any] = {"flows": {}, "tasks": []}
    wrappers: set[str] = set()  # the task runs that stand for a subflow in its parent
    with get_client(sync_client=True) as client:
        for fr in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))):
            if fr.parent_task_run_id:
                wrappers.add(str(fr.parent_task_run_id))
            wall = (fr.end_time - fr.start_time).total_seconds() if fr.end_time and fr.start_time else None
            out["flows"][by_id[str(fr.id)]] = {
                "name": fr.name,
                "flow_run_id": str(fr.id),
                "state": fr.state.name if fr.state else None,
                "wall_s": wall,
                "run_s": fr.total_run_time.total_seconds(),
            }
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)), limit=200
        )
        for tr in tasks:
            if str(tr.id) in wrappers:
                continue
            out["tasks"].append(
                {
                    "stage": by_id.get(str(tr.flow_run_id), "?"),
                    "name": tr.task_key.rsplit("-", 1)[0] if tr.task_key else tr.name,
                    "state": tr.state.name if tr.state else None,
                    "run_s": tr.total_run_time.total_seconds(),
                    "start": tr.start_time.timestamp() if tr.start_time else None,
                    "end": tr.end_time.timestamp() if tr.end_time else None,
                }
            )
    return out


def main() -> None:
    params = json.loads(sys.argv[1])
    result_path = Path(sys.argv[2])
    interval = float(os.environ.get("OPSLOOP_LOAD_SAMPLE_S", "0.02"))
    t_start = time.perf_counter()
    import flows.ingest  # the stage flows, imported before the clock starts
    import flows.score
    import flows.sync
    import flows.train  # noqa: F401
    from flows.nightly import nightly

    imports_s = time.perf_counter() - t_start
    sampler = Sampler(interval)
    sampler.start()
    t0 = time.perf_counter()
    state: Any = nightly(**params, return_state=True)
    flow_s = time.perf_counter() - t0
    sampler.stop()
    data = state.result(raise_on_failure=False)
    summary = data if isinstance(data, dict) else {}
    stages = {k: v for k, v in (summary.get("stages") or {}).items() if isinstance(v, dict)}
    root = str(state.state_details.flow_run_id) if state.state_details else ""
    stage_ids = {k: str(v["flow_run_id"]) for k, v in stages.items() if v.get("flow_run_id") and k != "report"}
    runs = _runs(root, stage_ids) if root else {}
    self_ru = resource.getrusage(resource.RUSAGE_SELF)
    kids_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = {
        "state": state.name,
        "completed": state.is_completed(),
        "message": state.message or "",
        "flow_run_id": root,
        "imports_s": imports_s,
        "flow_s": flow_s,
        "sampler": {
            "interval_s": interval,
            "samples": sampler.samples,
            "cpu_s": sampler.cpu,
            "seconds": [[s, o, v] for (s, o), v in sorted(sampler.seconds.items())],
            "peak_rss_mb": dict(sampler.peak_rss_mb),
            "entries": [[*k, v] for k, v in sorted(sampler.entries.items(), key=lambda kv: -kv[1])[:150]],
        },
        "stages": stages,
        "runs": runs,
        "maxrss_self_mb": self_ru.ru_maxrss / 1024,
        "maxrss_children_mb": kids_ru.ru_maxrss / 1024,
        "cpu_s": self_ru.ru_utime + self_ru.ru_stime,
    }
    result_path.write_text(json.dumps(info, default=str, indent=1))
    sys.stdout.flush()
    os._exit(0 if state.is_completed() else 1)  # skip interpreter teardown (not part of the run)


if __name__ == "__main__":
    main()
