"""Batch scoring with bounded memory: population → local Parquet spill → predict_proba chunk by
chunk → predictions spill → one staged MERGE into the predictions table (+ history, review queue).

Warehouse access stays short (one streamed read, one MERGE), so K partition processes can share a
DuckDB file; each partition stages into its own table and MERGEs idempotently on the entity key.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from opsloop import faults
from opsloop.ml.drift import DriftCounter
from opsloop.ml.features import check_columns, read_feature_batches, stable_bucket, to_frame
from opsloop.ml.models import ResolvedModels, RulesModel
from opsloop.ml.sql import merge_from_query
from opsloop.spec import PipelineSpec
from opsloop.spec.ml import ScoringSpec
from opsloop.warehouse.base import MergeSpec, TableRef, TableSchema, Warehouse
from opsloop.warehouse.write import write_merge

TS = pa.timestamp("us", tz="UTC")


def prediction_schema(key: str, score_col: str) -> pa.Schema:
    return pa.schema(
        [
            (key, pa.string()),
            (score_col, pa.float64()),
            ("risk_bucket", pa.string()),
            ("next_best_action", pa.string()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("model_alias", pa.string()),
            ("served_by", pa.string()),  # champion | challenger (canary) | previous | rules
            ("is_fallback", pa.bool_()),
            ("champion_score", pa.float64()),
            ("challenger_score", pa.float64()),  # shadow / canary
            ("challenger_version", pa.string()),
            ("review_status", pa.string()),  # not_required | pending | released | rejected
            ("review_reason", pa.string()),
            ("score_date", pa.date32()),
            ("scored_at", TS),
            ("run_id", pa.string()),
            ("batch_id", pa.string()),
            ("partition", pa.int64()),
        ]
    )


def predictions_ref(sc: ScoringSpec) -> TableRef:
    return TableRef(sc.dataset, sc.table)


def history_ref(sc: ScoringSpec) -> TableRef:
    return TableRef(sc.dataset, sc.history_table)


def review_ref(sc: ScoringSpec) -> TableRef:
    return TableRef(sc.dataset, sc.review_table)


def risk_buckets(scores: np.ndarray, buckets: dict[str, float]) -> np.ndarray:
    """The first bucket whose upper bound is above the score (the top bucket includes 1.0)."""
    items = sorted(buckets.items(), key=lambda kv: kv[1])
    bounds = np.asarray([b for _, b in items])
    idx = np.clip(np.searchsorted(bounds, scores, side="right"), 0, len(items) - 1)
    return np.asarray([n for n, _ in items], dtype=object)[idx]


def next_actions(scores: np.ndarray, sc: ScoringSpec, cols: dict[str, np.ndarray]) -> np.ndarray:
    out = np.full(len(scores), None, dtype=object)
    free = np.ones(len(scores), dtype=bool)
    for rule in sc.next_best_action:
        hi = scores <= rule.max_score if rule.max_score >= 1.0 else scores < rule.max_score
        m = free & (scores >= rule.min_score) & hi
        for col, want in rule.when.items():
            m &= np.isin(cols[col], want if isinstance(want, list) else [want])
        out[m] = rule.action
        free &= ~m
    return out


def extra_columns(spec: PipelineSpec) -> list[str]:
    """Columns scoring reads besides the features: review column, rule conditions, fallback inputs."""
    sc = spec.scoring
    cols = [c for r in sc.next_best_action for c in r.when]
    if sc.review.enabled and sc.review.column:
        cols.append(sc.review.column)
    if sc.fallback:
        cols += list(sc.fallback.weights)
    assert spec.model is not None
    feats = set(spec.model.features.columns)
    return [c for c in dict.fromkeys(cols) if c not in feats]


@dataclass
class PartitionResult:
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    served: dict[str, int] = field(default_factory=dict)
    review_pending: int = 0
    drift: dict[str, Any] | None = None


def _spill(batches: Iterator[pa.RecordBatch], path: Path, schema: pa.Schema | None = None) -> int:
    """Write batches to an uncompressed Arrow IPC file (cheap to write and to re-read in chunks)."""
    writer: pa.ipc.RecordBatchFileWriter | None = None
    rows = 0
    for b in batches:
        if writer is None:
            writer = pa.ipc.new_file(path, schema or b.schema)
        writer.write_batch(b)
        rows += b.num_rows
    if writer is None and schema is not None:
        writer = pa.ipc.new_file(path, schema)
    if writer is not None:
        writer.close()
    return rows


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Regroup a stream into batches of ``rows`` (the warehouse reader yields smaller ones); fewer,
    larger predict_proba calls cost less per row, memory stays bounded by ``rows``."""
    buf: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        buf.append(b)
        have += b.num_rows
        if have >= rows:
            yield from pa.Table.from_batches(buf).combine_chunks().to_batches(max_chunksize=rows)
            buf, have = [], 0
    if buf:
        yield from pa.Table.from_batches(buf).combine_chunks().to_batches(max_chunksize=rows)


def _read_spill(path: Path) -> Iterator[pa.RecordBatch]:
    # plain reads, not a memory map: mapped pages would count towards this process's RSS
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def score_partition(
    wh: Warehouse,
    spec: PipelineSpec,
    models: ResolvedModels,
    *,
    as_of: date | None,
    run_id: str,
    batch_id: str,
    scored_at: datetime,
    partition: tuple[int, int] | None = None,
    workdir: Path | None = None,
) -> PartitionResult:
    """Score one hash partition (or everything) and MERGE its predictions."""
    assert spec.model is not None
    fs, sc = spec.model.features, spec.scoring
    key = fs.entity_key
    extra = extra_columns(spec)
    check_columns(wh, fs, extra=extra, need_target=False)
    part_no = partition[0] if partition else 0
    res = PartitionResult(served={})
    champ = models.champion
    counter = DriftCounter(champ.baseline) if champ.baseline else None
    schema = prediction_schema(key, sc.score_column)
    with tempfile.TemporaryDirectory(prefix="opsloop-score-", dir=workdir) as tmp:
        src, out = Path(tmp) / "population.arrow", Path(tmp) / "predictions.arrow"
        cols = [key, *fs.columns, *extra]
        population = read_feature_batches(wh, fs, cols, as_of=as_of, partition=partition, batch_rows=sc.chunk_rows)
        n = _spill(_rebatch(population, sc.chunk_rows), src)
        scored = (
            _score_batch(batch, spec, models, counter, res, (scored_at, as_of), run_id, batch_id, part_no, schema)
            for batch in (_read_spill(src) if n else iter(()))
        )
        _spill(scored, out, schema)
        res.rows = n
        faults.checkpoint("after_scoring_before_merge")
        target = predictions_ref(sc)
        merge = MergeSpec(target, tuple(schema.names), (key,), order_by=("scored_at",))
        written = write_merge(
            wh,
            target,
            TableSchema.from_arrow(schema, cluster_by=[key]),
            schema,
            _read_spill(out),
            merge,
            job_key=f"{batch_id}_score_p{part_no}",
            staging=TableRef(sc.dataset, f"_stg_{sc.table}_p{part_no}"),
        )
    res.inserted, res.updated = written.inserted, written.updated
    _history_and_review(wh, spec, batch_id, part_no, schema)
    res.drift = counter.to_json() if counter else None
    return res


def _score_batch(
    batch: pa.RecordBatch,
    spec: PipelineSpec,
    models: ResolvedModels,
    counter: DriftCounter | None,
    res: PartitionResult,
    when: tuple[datetime, date | None],
    run_id: str,
    batch_id: str,
    part_no: int,
    schema: pa.Schema,
) -> pa.RecordBatch:
    assert spec.model is not None
    fs, sc = spec.model.features, spec.scoring
    champ, chall = models.champion, models.challenger
    scored_at, as_of = when
    x = to_frame(batch, fs)
    if isinstance(champ.model, RulesModel):
        for c in champ.model.columns:
            if c not in x.columns:
                x[c] = batch.column(c).to_numpy(zero_copy_only=False)
    champ_s = champ.scores(x)
    if counter is not None:
        counter.add(x, champ_s, batch)
    n = len(x)
    keys = batch.column(fs.entity_key).to_numpy(zero_copy_only=False)
    score = champ_s
    served = np.full(n, champ.alias, dtype=object)
    model_version = np.full(n, champ.version, dtype=object)
    chall_s = None
    if chall is not None:
        chall_s = chall.scores(x)
        if sc.canary_share > 0:
            canary = stable_bucket(keys) < sc.canary_share
            score = np.where(canary, chall_s, champ_s)
            served[canary] = "challenger"
            model_version[canary] = chall.version
    cols = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in {c for r in sc.next_best_action for c in r.when}}
    held = np.zeros(n, dtype=bool)
    reason = np.full(n, None, dtype=object)
    rv = sc.review
    if rv.enabled:
        held = score >= rv.min_score
        if rv.column:
            vals = np.asarray(batch.column(rv.column).to_numpy(zero_copy_only=False), dtype=float)
            held &= np.nan_to_num(vals, nan=-np.inf) >= float(rv.min_value or 0)
            for i in np.flatnonzero(held):
                reason[i] = f"score {score[i]:.3f} ≥ {rv.min_score} and {rv.column} {vals[i]:g} ≥ {rv.min_value:g}"
        else:
            for i in np.flatnonzero(held):
                reason[i] = f"score {score[i]:.3f} ≥ {rv.min_score}"
    res.review_pending += int(held.sum())
    if canaried := (chall is not None and sc.canary_share > 0):
        for s, c in zip(*np.unique(served, return_counts=True), strict=True):
            res.served[str(s)] = res.served.get(str(s), 0) + int(c)
    else:
        res.served[champ.alias] = res.served.get(champ.alias, 0) + n

    def const(value: Any, typ: pa.DataType) -> pa.Array:
        return pa.repeat(pa.scalar(value, typ), n)

    canaried = chall is not None and sc.canary_share > 0
    data = {
        fs.entity_key: pa.array(keys, pa.string()),
        sc.score_column: pa.array(np.round(score, 6)),
        "risk_bucket": pa.array(risk_buckets(score, sc.risk_buckets), pa.string()),
        "next_best_action": pa.array(next_actions(score, sc, cols), pa.string()),
        "model_name": pa.array(np.where(served == "challenger", chall.name if chall else "", champ.name), pa.string())
        if canaried
        else const(champ.name, pa.string()),
        "model_version": pa.array(model_version, pa.string()) if canaried else const(champ.version, pa.string()),
        "model_alias": pa.array(np.where(served == "challenger", "challenger", champ.alias), pa.string())
        if canaried
        else const(champ.alias, pa.string()),
        "served_by": pa.array(served, pa.string()) if canaried else const(champ.alias, pa.string()),
        "is_fallback": const(champ.is_fallback, pa.bool_()),
        "champion_score": pa.array(np.round(champ_s, 6)),
        "challenger_score": pa.array(np.round(chall_s, 6)) if chall_s is not None else const(None, pa.float64()),
        "challenger_version": const(chall.version if chall else None, pa.string()),
        "review_status": pa.array(np.where(held, "pending", "not_required"), pa.string())
        if rv.enabled
        else const("not_required", pa.string()),
        "review_reason": pa.array(reason, pa.string()) if rv.enabled else const(None, pa.string()),
        "score_date": const(as_of or scored_at.date(), pa.date32()),  # the snapshot scored
        "scored_at": const(scored_at, TS),
        "run_id": const(run_id, pa.string()),
        "batch_id": const(batch_id, pa.string()),
        "partition": const(part_no, pa.int64()),
    }
    return pa.RecordBatch.from_pydict(data, schema=schema)


def _history_and_review(wh: Warehouse, spec: PipelineSpec, batch_id: str, part_no: int, schema: pa.Schema) -> None:
    """Copy this partition's rows into the history (one row per entity and score date: the rows of
    a rerun replace the earlier ones) and the held ones into the review queue — in the warehouse."""
    assert spec.model is not None
    sc, key = spec.scoring, spec.model.features.entity_key
    p = predictions_ref(sc)
    q = wh.quote
    where = f"{q('batch_id')} = {wh.param('b')} AND {q('partition')} = {wh.param('p')}"
    params = {"b": batch_id, "p": part_no}
    hist = history_ref(sc)
    wh.ensure_table(hist, TableSchema.from_arrow(schema, cluster_by=[key]))
    cols = ", ".join(q(c) for c in schema.names)
    wh.execute(
        f"DELETE FROM {q(hist)} WHERE {q('score_date')} IN (SELECT DISTINCT {q('score_date')} FROM {q(p)} "
        f"WHERE {where}) AND {q(key)} IN (SELECT {q(key)} FROM {q(p)} WHERE {where})",
        params,
        kind="dml",
    )
    wh.execute(f"INSERT INTO {q(hist)} ({cols}) SELECT {cols} FROM {q(p)} WHERE {where}", params, kind="dml")
    if sc.review.enabled:
        sel = (
            f"SELECT {q(key)}, {q('run_id')}, {q('batch_id')}, {q('score_date')}, {q(sc.score_column)} AS score, "
            f"{q('review_reason')}, 'pending' AS status, {q('scored_at')} AS queued_at, "
            f"CAST(NULL AS {'TIMESTAMP' if wh.dialect == 'bigquery' else 'TIMESTAMPTZ'}) AS decided_at, "
            f"CAST(NULL AS STRING) AS decided_by, CAST(NULL AS STRING) AS note "
            f"FROM {q(p)} WHERE {where} AND {q('review_status')} = 'pending'"
        )
        if wh.dialect != "bigquery":
            sel = sel.replace("AS STRING)", "AS VARCHAR)")
        merge_from_query(wh, review_ref(sc), sel, params, (key, "run_id"), f"_p{part_no}")


def check_scoring_spec(spec: PipelineSpec, source: str) -> None:
    """Cross-section checks the YAML schema cannot express, reported with spec paths."""
    from opsloop.errors import SpecError

    if spec.model is None:
        raise SpecError(source, [("model", "required to score")])
    feats = set(spec.model.features.columns)
    probs: list[tuple[str, str]] = []
    if spec.scoring.fallback:
        for c in spec.scoring.fallback.weights:
            if c not in spec.model.features.numeric and c in feats:
                probs.append((f"scoring.fallback.weights.{c}", "must be a numeric column"))
    if probs:
        raise SpecError(source, probs)
