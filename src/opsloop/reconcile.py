"""Reconcile the cost ledger with BigQuery's own job history (``INFORMATION_SCHEMA.JOBS``) by label.

Every opsloop job carries the labels ``pipeline``, ``flow``, ``flow_run_id`` and ``task``, so BigQuery
can tell what each flow run really billed. The ledger's figures are computed from the same jobs
within seconds of the run; the job history confirms them later (it can lag by minutes). Jobs of
the cost/KPI bookkeeping tasks themselves are reported apart as overhead, as the ledger does.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opsloop.costs import BOOKKEEPING_TASKS
from opsloop.errors import ConfigError

_LOCATION_RE = re.compile(r"^[A-Za-z0-9-]+$")
_PROJECT_RE = re.compile(r"^[a-z][a-z0-9.:-]{4,62}[a-z0-9]$")


def jobs_by_label_sql(project: str, location: str) -> str:
    """Per (flow_run_id, task) label: job count, bytes processed / billed and slot ms.

    Parameters: ``@start``, ``@end`` (TIMESTAMP, on ``creation_time``, the view's partition column)
    and ``@run_ids`` (ARRAY<STRING>). Script parent jobs are skipped (their children are counted).
    """
    if not _LOCATION_RE.match(location):
        raise ConfigError(f"BigQuery location {location!r} is not a region or multi-region name")
    if not _PROJECT_RE.match(project):
        raise ConfigError(f"BigQuery project {project!r} is not a valid project id")
    region = f"region-{location.lower()}"
    return f"""SELECT
  (SELECT l.value FROM UNNEST(j.labels) AS l WHERE l.key = 'flow_run_id') AS flow_run_id,
  (SELECT l.value FROM UNNEST(j.labels) AS l WHERE l.key = 'task') AS task,
  COUNT(*) AS jobs,
  SUM(COALESCE(j.total_bytes_processed, 0)) AS bytes_processed,
  SUM(COALESCE(j.total_bytes_billed, 0)) AS bytes_billed,
  SUM(COALESCE(j.total_slot_ms, 0)) AS slot_ms
FROM `{project}`.`{region}`.INFORMATION_SCHEMA.JOBS AS j
WHERE j.creation_time >= @start
  AND j.creation_time < @end
  AND (j.statement_type IS NULL OR j.statement_type != 'SCRIPT')
  AND EXISTS (
    SELECT 1 FROM UNNEST(j.labels) AS l WHERE l.key = 'flow_run_id' AND l.value IN UNNEST(@run_ids)
  )
GROUP BY flow_run_id, task
ORDER BY flow_run_id, task"""


@dataclass
class Reconciled:
    flow_run_id: str
    ledger_jobs: int
    bq_jobs: int
    ledger_bytes_billed: int
    bq_bytes_billed: int
    overhead_jobs: int
    overhead_bytes_billed: int
    status: str

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reconcile(
    ledger_rows: Sequence[Mapping[str, Any]], job_rows: Sequence[Mapping[str, Any]], tolerance: float = 0.01
) -> list[Reconciled]:
    """Compare per flow run: ``ok``, ``ledger_low`` (BigQuery billed more — jobs the ledger did not
    see, e.g. from another process), ``ledger_high``, ``not_in_job_history`` (not there yet) or
    ``overhead_only`` (only cost/KPI bookkeeping jobs, e.g. the nightly parent run)."""
    ledger: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in ledger_rows:
        if r.get("warehouse") != "bigquery":
            continue
        acc = ledger[str(r["flow_run_id"])]
        acc[0] += int(r.get("bq_jobs") or 0)
        acc[1] += int(r.get("bq_bytes_billed") or 0)
    seen: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for j in job_rows:
        acc = seen[str(j["flow_run_id"])]
        offset = 2 if j.get("task") in BOOKKEEPING_TASKS else 0
        acc[offset] += int(j.get("jobs") or 0)
        acc[offset + 1] += int(j.get("bytes_billed") or 0)
    out: list[Reconciled] = []
    for run in sorted(set(ledger) | set(seen)):
        lj, lb = ledger.get(run, [0, 0])
        bj, bb, oj, ob = seen.get(run, [0, 0, 0, 0])
        if run not in seen:
            status = "not_in_job_history"
        elif lj == 0 and bj == 0:
            status = "overhead_only"  # e.g. the parent flow run that only recorded its stages' costs
        elif abs(bb - lb) <= tolerance * max(bb, lb) and bj == lj:
            status = "ok"
        elif bb > lb or bj > lj:
            status = "ledger_low"
        else:
            status = "ledger_high"
        out.append(Reconciled(run, lj, bj, lb, bb, oj, ob, status))
    return out


def job_history(wh: Any, start: datetime, end: datetime, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Run :func:`jobs_by_label_sql` on a BigQuery adapter (needs ``project`` and ``location``)."""
    project, location = getattr(wh, "project", None), getattr(wh, "location", None)
    if wh.dialect != "bigquery" or not project or not location:
        raise ConfigError("reconciling costs needs a BigQuery warehouse (project and location)")
    sql = jobs_by_label_sql(str(project), str(location))
    return list(wh.query(sql, {"start": start, "end": end, "run_ids": list(run_ids)}).to_pylist())
