"""Which predictions need pushing: the diff against the last CRM-confirmed payloads.

One streamed query joins the predictions (latest row per entity) with ``_sync_state`` (last
confirmed payload hash + values + bucket), ``_sync_retry`` (failed attempts) and, when review is
required, the review queue. Each row's mapped payload is hashed in Python; a row becomes a
candidate when its hash differs from the confirmed one, unless

* only score fields moved, each by less than ``significance.minDelta``, and the risk bucket did
  not change (``onBucketChange``) — float jitter costs no API calls;
* its payload already failed ``retryCap`` times (skipped until the payload changes);
* it waits in the review queue (``held``) or was rejected there.

Candidates are streamed to a local Parquet file (bounded memory), in entity order, so the push
can read them back chunk by chunk and a ``limit`` takes a stable prefix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from opsloop.crm.base import FieldSpec, PushRecord, iso_z
from opsloop.crm.synclog import SyncTables
from opsloop.errors import TerminalError
from opsloop.warehouse.base import TableRef, Warehouse

CANDIDATES = pa.schema(
    [
        ("entity", pa.string()),
        ("external_id", pa.string()),
        ("payload", pa.string()),
        ("payload_hash", pa.string()),
        ("attempt", pa.int64()),
        ("bucket", pa.string()),
        ("is_new", pa.bool_()),
        ("pending_retry", pa.bool_()),
    ]
)
RELEASED = ("approved", "released")
REJECTED = ("rejected",)


@dataclass(frozen=True)
class ReviewSource:
    """The review queue: rows for ``key`` with ``status`` (pending/approved/released/rejected…);
    matched on ``run_id`` too when both tables have it. Queued entities wait for release; entities
    not in the queue need no review."""

    ref: TableRef
    key: str
    by_run: bool = False


@dataclass(frozen=True)
class DiffOptions:
    pipeline: str
    destination: str
    predictions: TableRef
    entity_key: str
    fields: list[FieldSpec]
    bucket_column: str | None = None
    score_columns: tuple[str, ...] = ()
    min_delta: float = 0.0
    on_bucket_change: bool = True
    retry_cap: int = 5
    retry_failed_only: bool = False
    limit: int | None = None
    review: ReviewSource | None = None
    batch_rows: int = 50_000


@dataclass
class DiffResult:
    path: Path
    staged: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    values: dict[str, set[str]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    held: list[PushRecord] = field(default_factory=list)
    rejected_by_review: list[PushRecord] = field(default_factory=list)

    def records(self, batch_rows: int = 10_000) -> Any:
        """Iterate the staged candidates as PushRecords (streamed from the Parquet file)."""
        if not self.staged:
            return
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield PushRecord(
                    row["entity"],
                    row["external_id"],
                    json.loads(row["payload"]),
                    row["payload_hash"],
                    int(row["attempt"]),
                    row["bucket"],
                    bool(row["pending_retry"]),
                    row["payload"],
                )


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return iso_z(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def payload_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def payload_hash(payload: dict[str, Any], text: str | None = None) -> str:
    text = payload_json(payload) if text is None else text
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def significant(
    payload: dict[str, Any], prev: dict[str, Any], score_fields: set[str], min_delta: float, bucket_changed: bool
) -> bool:
    """True if the change from ``prev`` to ``payload`` is worth an API call."""
    if bucket_changed:
        return True
    changed = [k for k in set(payload) | set(prev) if payload.get(k) != prev.get(k)]
    for k in changed:
        a, b = payload.get(k), prev.get(k)
        if k not in score_fields or not isinstance(a, int | float) or not isinstance(b, int | float):
            return True
        if abs(float(a) - float(b)) >= min_delta:
            return True
    return False


def _diff_sql(wh: Warehouse, opts: DiffOptions, tables: SyncTables, cols: list[str], has_scored_at: bool) -> str:
    q, p = wh.quote, wh.param
    key = q(opts.entity_key)
    dedup = (
        f" QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {q('scored_at')} DESC) = 1" if has_scored_at else ""
    )
    select = ", ".join(f"p.{q(c)} AS {q(c)}" for c in cols)
    join_on = (
        f"{{a}}.pipeline = {p('pipeline')} AND {{a}}.destination = {p('destination')} "
        f"AND {{a}}.entity = CAST(p.{key} AS STRING)"
    )
    sql = (
        f"WITH p AS (SELECT * FROM {q(opts.predictions)} WHERE {key} IS NOT NULL{dedup})\n"
        f"SELECT CAST(p.{key} AS STRING) AS _entity, {select}, s.payload_hash AS _prev_hash, "
        f"s.payload AS _prev_payload, s.bucket AS _prev_bucket, r.attempts AS _attempts, r.payload_hash AS _failed_hash"
    )
    frm = (
        f"\nFROM p LEFT JOIN {q(tables.state)} s ON {join_on.format(a='s')}"
        f"\nLEFT JOIN {q(tables.retry)} r ON {join_on.format(a='r')}"
    )
    if opts.review is not None:
        rv, rk, st = opts.review, q(opts.review.key), q("status")
        released = ", ".join(f"'{s}'" for s in RELEASED)
        rejected = ", ".join(f"'{s}'" for s in REJECTED)
        by_run = f", {q('run_id')}" if rv.by_run else ""
        sql += ", v._queued AS _queued, v._released AS _released, v._rejected AS _rejected"
        frm += (
            f"\nLEFT JOIN (SELECT CAST({rk} AS STRING) AS _k{by_run}, COUNT(*) AS _queued, "
            f"SUM(CASE WHEN LOWER({st}) IN ({released}) THEN 1 ELSE 0 END) AS _released, "
            f"SUM(CASE WHEN LOWER({st}) IN ({rejected}) THEN 1 ELSE 0 END) AS _rejected "
            f"FROM {q(rv.ref)} GROUP BY 1{', 2' if rv.by_run else ''}) v ON v._k = CAST(p.{key} AS STRING)"
            + (f" AND v.{q('run_id')} = p.{q('run_id')}" if rv.by_run else "")
        )
    where = "\nWHERE r.entity IS NOT NULL" if opts.retry_failed_only else ""
    return sql + frm + where + "\nORDER BY _entity"


def build_candidates(wh: Warehouse, opts: DiffOptions, tables: SyncTables, workdir: Path) -> DiffResult:
    schema = wh.table_schema(opts.predictions)
    if schema is None:
        raise TerminalError(f"predictions table {opts.predictions} does not exist — run scoring first")
    wanted = [opts.entity_key, *[f.column for f in opts.fields]]
    if opts.bucket_column:
        wanted.append(opts.bucket_column)
    if opts.review is not None and opts.review.by_run:
        wanted.append("run_id")
    missing = [c for c in wanted if schema.column(c) is None]
    if missing:
        raise TerminalError(
            f"{opts.destination}: predictions table {opts.predictions} lacks column(s) {missing} "
            f"(has {schema.names}); fix the destination's fieldMap / entityKey"
        )
    cols = list(dict.fromkeys(wanted))
    sql = _diff_sql(wh, opts, tables, cols, schema.column("scored_at") is not None)
    params = {"pipeline": opts.pipeline, "destination": opts.destination}
    score_fields = {f.crm_name for f in opts.fields if f.column in opts.score_columns}
    enum_cols = [f.column for f in opts.fields if f.kind == "enumeration"]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", opts.destination)
    res = DiffResult(workdir / f"candidates_{slug}.parquet", values={c: set() for c in enum_cols})
    st = dict.fromkeys(
        (
            "rows",
            "unchanged",
            "insignificant",
            "candidates",
            "new",
            "changed",
            "retries",
            "capped",
            "held",
            "review_rejected",
            "beyond_limit",
        ),
        0,
    )
    writer: pq.ParquetWriter | None = None
    buf: list[dict[str, Any]] = []
    try:
        for batch in wh.read_batches(sql, params, batch_rows=opts.batch_rows):
            for row in batch.to_pylist():
                st["rows"] += 1
                entity = str(row["_entity"])
                payload = {f.crm_name: jsonable(row[f.column]) for f in opts.fields}
                text = payload_json(payload)
                h = payload_hash(payload, text)
                bucket = (
                    None if not opts.bucket_column or row[opts.bucket_column] is None else str(row[opts.bucket_column])
                )
                attempts, failed_hash = int(row["_attempts"] or 0), row["_failed_hash"]
                attempt = attempts + 1 if failed_hash == h else 1
                if row["_prev_hash"] == h:
                    st["unchanged"] += 1
                    continue
                if opts.review is not None and int(row.get("_queued") or 0) > 0 and not int(row.get("_released") or 0):
                    rec = PushRecord(entity, entity, payload, h, attempt, bucket)
                    if int(row.get("_rejected") or 0):
                        st["review_rejected"] += 1
                        res.rejected_by_review.append(rec)
                    else:
                        st["held"] += 1
                        res.held.append(rec)
                    continue
                if failed_hash == h and attempts >= opts.retry_cap:
                    st["capped"] += 1
                    continue
                prev = row["_prev_payload"]
                if prev is not None and attempt == 1:
                    changed_bucket = (
                        opts.on_bucket_change and opts.bucket_column is not None and bucket != row["_prev_bucket"]
                    )
                    if not significant(payload, json.loads(prev), score_fields, opts.min_delta, changed_bucket):
                        st["insignificant"] += 1
                        continue
                st["candidates"] += 1
                st["new" if prev is None else "changed"] += 1
                st["retries"] += int(attempt > 1)
                if opts.limit is not None and res.staged >= opts.limit:
                    st["beyond_limit"] += 1
                    continue
                for c in enum_cols:
                    if row[c] is not None:
                        res.values[c].add(str(row[c]))
                if len(res.samples) < 5:
                    res.samples.append({"external_id": entity, **payload})
                buf.append(
                    {
                        "entity": entity,
                        "external_id": entity,
                        "payload": text,
                        "payload_hash": h,
                        "attempt": attempt,
                        "bucket": bucket,
                        "is_new": prev is None,
                        "pending_retry": row["_attempts"] is not None,
                    }
                )
                res.staged += 1
                if len(buf) >= 10_000:
                    writer = _write(writer, res.path, buf)
                    buf = []
        if buf:
            writer = _write(writer, res.path, buf)
    finally:
        if writer is not None:
            writer.close()
    res.stats = st
    return res


def _write(writer: pq.ParquetWriter | None, path: Path, rows: list[dict[str, Any]]) -> pq.ParquetWriter:
    if writer is None:
        writer = pq.ParquetWriter(path, CANDIDATES)
    writer.write_table(pa.Table.from_pylist(rows, schema=CANDIDATES))
    return writer
