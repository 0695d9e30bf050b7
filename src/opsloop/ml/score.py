"""Batch scoring with bounded memory: population → local Arrow chunk files → predict_proba chunk
by chunk → the partition's staging (DuckDB: a local Parquet file; BigQuery: a staging table) → one
MERGE into the predictions table (+ history, review queue). Reading, scoring and staging overlap
(:mod:`opsloop.ml.score_io`).

Warehouse access stays short (one streamed read, one MERGE transaction), so K partition processes
can share a DuckDB file; each partition stages on its own and MERGEs idempotently on the entity key.
The predictions table is untouched until every row is scored and staged.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from opsloop import faults
from opsloop.heap import arrow_pool_that_returns_memory
from opsloop.ingest.writer import TransactionalWarehouse
from opsloop.ml.drift import ChunkCounts, DriftCounter
from opsloop.ml.features import check_columns, read_feature_batches, stable_bucket, to_frame
from opsloop.ml.models import Prepared, ResolvedModels, RulesModel
from opsloop.ml.score_io import PopulationReader, Stager, prefetched, release_memory
from opsloop.ml.score_write import predictions_ref, write_predictions
from opsloop.spec import PipelineSpec
from opsloop.spec.ml import ScoringSpec
from opsloop.warehouse.base import TableRef, Warehouse

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


def _bucket_index(scores: np.ndarray, buckets: dict[str, float]) -> tuple[list[str], np.ndarray]:
    items = sorted(buckets.items(), key=lambda kv: kv[1])
    bounds = np.asarray([b for _, b in items])
    return [n for n, _ in items], np.clip(np.searchsorted(bounds, scores, side="right"), 0, len(items) - 1)


def risk_buckets(scores: np.ndarray, buckets: dict[str, float]) -> np.ndarray:
    """The first bucket whose upper bound is above the score (the top bucket includes 1.0)."""
    names, idx = _bucket_index(scores, buckets)
    return np.asarray(names, dtype=object)[idx]


def _action_index(scores: np.ndarray, sc: ScoringSpec, cols: dict[str, np.ndarray]) -> np.ndarray:
    """Per row the index of the first matching rule in ``sc.next_best_action``, -1 for none."""
    out = np.full(len(scores), -1, dtype=np.int64)
    free = np.ones(len(scores), dtype=bool)
    for i, rule in enumerate(sc.next_best_action):
        hi = scores <= rule.max_score if rule.max_score >= 1.0 else scores < rule.max_score
        m = free & (scores >= rule.min_score) & hi
        for col, want in rule.when.items():
            m &= np.isin(cols[col], want if isinstance(want, list) else [want])
        out[m] = i
        free &= ~m
    return out


def next_actions(scores: np.ndarray, sc: ScoringSpec, cols: dict[str, np.ndarray]) -> np.ndarray:
    idx = _action_index(scores, sc, cols)
    names = np.asarray([r.action for r in sc.next_best_action] + [None], dtype=object)
    return names[idx]  # -1 → the trailing None


def _labels(names: list[str], idx: np.ndarray) -> pa.Array:
    """Strings by index (-1 → NULL) without a Python object per row."""
    return pa.array(names, pa.string()).take(pa.array(idx, pa.int64(), mask=idx < 0))


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


def run_constants(
    spec: PipelineSpec,
    models: ResolvedModels,
    *,
    as_of: date | None,
    scored_at: datetime,
    run_id: str,
    batch_id: str,
    part_no: int,
) -> dict[str, Any]:
    """The prediction columns that hold one value for every row of this partition's run."""
    sc = spec.scoring
    champ, chall = models.champion, models.challenger
    values: dict[str, Any] = {
        "is_fallback": champ.is_fallback,
        "challenger_version": chall.version if chall else None,
        "score_date": as_of or scored_at.date(),  # the snapshot scored
        "scored_at": scored_at,
        "run_id": run_id,
        "batch_id": batch_id,
        "partition": part_no,
    }
    if not (chall is not None and sc.canary_share > 0):  # a canary serves some rows by the challenger
        values |= {"model_name": champ.name, "model_version": champ.version}
        values |= {"model_alias": champ.alias, "served_by": champ.alias}
    if chall is None:
        values["challenger_score"] = None
    if not sc.review.enabled:
        values |= {"review_status": "not_required", "review_reason": None}
    return values


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
    """Score one hash partition (or everything) and MERGE its predictions.

    Three stages: a thread reads the population into local chunk files (on DuckDB before scoring
    starts, elsewhere alongside it), this thread runs predict_proba chunk by chunk while the next
    chunk is prepared, a thread writes the scored chunks to the partition's staging.
    Once every row is scored and staged, one transaction (DuckDB) MERGEs the staging table into the
    predictions table and writes the history and the review queue from it."""
    assert spec.model is not None
    arrow_pool_that_returns_memory()
    fs, sc = spec.model.features, spec.scoring
    key = fs.entity_key
    extra = extra_columns(spec)
    check_columns(wh, fs, extra=extra, need_target=False)
    part_no = partition[0] if partition else 0
    res = PartitionResult(served={})
    champ = models.champion
    counter = DriftCounter(champ.baseline) if champ.baseline else None
    schema = prediction_schema(key, sc.score_column)
    constants = run_constants(
        spec, models, as_of=as_of, scored_at=scored_at, run_id=run_id, batch_id=batch_id, part_no=part_no
    )
    # DuckDB: the run's constants are not staged; the MERGE and the history add them as literals
    # (staging 1M rows: 0.8 instead of 1.9 CPU s). BigQuery stages every column (one load job)
    consts = constants if isinstance(wh, TransactionalWarehouse) and wh.dialect == "duckdb" else {}
    stage_schema = pa.schema([f for f in schema if f.name not in consts])
    stg = TableRef(sc.dataset, f"_stg_{sc.table}_p{part_no}")
    cols = [key, *fs.columns, *extra]
    with tempfile.TemporaryDirectory(prefix="opsloop-score-", dir=workdir) as tmp:
        population = PopulationReader(
            lambda: read_feature_batches(wh, fs, cols, as_of=as_of, partition=partition, batch_rows=sc.chunk_rows),
            sc.chunk_rows,
            Path(tmp),
            # DuckDB: read everything first (its scan cache goes with the read's connection: 5M rows
            # peaked 695–708 MB overlapped, 642 MB read first); BigQuery: overlap the network read
            overlap=wh.dialect != "duckdb",
        )
        stager = Stager(wh, stg, stage_schema, (key,), predictions_ref(sc), f"{batch_id}_score_p{part_no}", Path(tmp))
        try:
            # the next chunk's model input (features, the pipeline's preprocessing) is built while the
            # final estimator scores this one
            chunks = prefetched(population, lambda b: (b, _model_input(b, spec, models, counter)))
            with contextlib.closing(chunks):
                for batch, x in chunks:
                    scored = _score_batch(batch, x, spec, models, counter, res, constants, stage_schema)
                    del batch, x
                    release_memory()  # this chunk's model input and predict_proba buffers
                    stager.put(scored)
            res.rows = stager.finish()
        except BaseException:
            stager.abort()
            raise
        finally:
            population.close()
        faults.checkpoint("after_scoring_before_merge")
        faults.checkpoint("after_stage_load")
        res.inserted, res.updated = write_predictions(
            wh, spec, stg, stager.parquet, schema, consts, res.rows, as_of or scored_at.date(), batch_id, part_no
        )
    res.drift = counter.to_json() if counter else None
    return res


def _model_input(
    batch: pa.RecordBatch, spec: PipelineSpec, models: ResolvedModels, counter: DriftCounter | None
) -> ModelInput:
    """A chunk's champion input (:meth:`ScoringModel.prepare_batch`), its drift counts and — only
    when a challenger or the rules need it — its feature frame, all built on the prefetch thread while
    the previous chunk is scored."""
    assert spec.model is not None
    fs = spec.model.features
    champ = models.champion

    @functools.cache
    def frame() -> pd.DataFrame:
        x = to_frame(batch, fs)
        if isinstance(champ.model, RulesModel):
            for c in champ.model.columns:
                if c not in x.columns:
                    x[c] = batch.column(c).to_numpy(zero_copy_only=False)
        return x

    prepared = champ.prepare_batch(batch, frame)
    counts = counter.feature_counts(None, batch) if counter is not None else None
    return ModelInput(frame() if models.challenger is not None else None, prepared, counts)


@dataclass
class ModelInput:
    frame: pd.DataFrame | None  # the feature frame, for the challenger
    champion: Prepared  # the champion's input
    drift: ChunkCounts | None  # the features' drift counts


def _score_batch(
    batch: pa.RecordBatch,
    inputs: ModelInput,
    spec: PipelineSpec,
    models: ResolvedModels,
    counter: DriftCounter | None,
    res: PartitionResult,
    constants: dict[str, Any],
    schema: pa.Schema,
) -> Callable[[], pa.RecordBatch]:
    """Score one chunk (``inputs``: its model input) and count it into ``res``; returns the function
    that builds the batch of ``schema``'s columns (run by the staging thread, off the scoring path):
    per-row columns computed here, the others from ``constants`` (:func:`run_constants`)."""
    assert spec.model is not None
    fs, sc = spec.model.features, spec.scoring
    champ, chall = models.champion, models.challenger
    champ_s = champ.scores_prepared(inputs.champion)
    if counter is not None and inputs.drift is not None:
        counter.add_counts(inputs.drift, champ_s)
    n = batch.num_rows
    key_col = batch.column(fs.entity_key)
    key_col = key_col if pa.types.is_string(key_col.type) else pc.cast(key_col, pa.string())
    score = champ_s
    served = np.full(n, champ.alias, dtype=object)
    model_version = np.full(n, champ.version, dtype=object)
    chall_s = None
    if chall is not None:
        assert inputs.frame is not None
        chall_s = chall.scores(inputs.frame)
        if sc.canary_share > 0:
            canary = stable_bucket(key_col.to_pylist()) < sc.canary_share
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

    def build() -> pa.RecordBatch:
        per_row: dict[str, Callable[[], pa.Array]] = {
            fs.entity_key: lambda: key_col,
            sc.score_column: lambda: pa.array(np.round(score, 6)),
            "risk_bucket": lambda: _labels(*_bucket_index(score, sc.risk_buckets)),
            "next_best_action": lambda: _labels(
                [r.action for r in sc.next_best_action], _action_index(score, sc, cols)
            ),
            "champion_score": lambda: pa.array(np.round(champ_s, 6)),
        }
        if canaried:
            per_row["model_name"] = lambda: pa.array(
                np.where(served == "challenger", chall.name if chall else "", champ.name), pa.string()
            )
            per_row["model_version"] = lambda: pa.array(model_version, pa.string())
            per_row["model_alias"] = lambda: pa.array(
                np.where(served == "challenger", "challenger", champ.alias), pa.string()
            )
            per_row["served_by"] = lambda: pa.array(served, pa.string())
        if chall_s is not None:
            per_row["challenger_score"] = lambda: pa.array(np.round(chall_s, 6))
        if rv.enabled:
            per_row["review_status"] = lambda: pa.array(np.where(held, "pending", "not_required"), pa.string())
            per_row["review_reason"] = lambda: pa.array(reason, pa.string())
        return pa.RecordBatch.from_pydict(
            {
                f.name: per_row[f.name]() if f.name in per_row else pa.repeat(pa.scalar(constants[f.name], f.type), n)
                for f in schema
            },
            schema=schema,
        )

    return build


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
