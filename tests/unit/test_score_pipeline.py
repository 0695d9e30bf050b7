"""The overlapped scoring pipeline (reader thread → predict_proba → staging thread → one MERGE) on a
real DuckDB file and a real fitted sklearn pipeline: every row scored exactly once with the score the
model gives it, MERGE semantics (newer wins, replay changes nothing, duplicate keys fall back to the
deduplicating MERGE), history replacement, and failures that leave the predictions untouched."""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from opsloop.errors import TerminalError
from opsloop.ml import score_write
from opsloop.ml.features import target_array, to_frame
from opsloop.ml.models import ResolvedModels, ScoringModel
from opsloop.ml.score import score_partition
from opsloop.ml.score_io import PopulationReader, rebatch
from opsloop.ml.train import make_pipeline
from opsloop.spec import PipelineSpec
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.support.ml_spec import write_spec

AS_OF = date(2026, 11, 1)
N = 5_300


def _features(wh: DuckDBAdapter, n: int) -> None:
    wh.ensure_dataset("ops_ai")
    wh.execute(f"""
CREATE OR REPLACE TABLE ops_ai.customer_features AS
WITH b AS (SELECT i, hash(i) % 1000 / 1000.0 AS r1, hash(i + 7) % 1000 / 1000.0 AS r2 FROM range({n}) t(i))
SELECT printf('C%06d', i) AS customer_id, DATE '{AS_OF}' AS as_of,
       CASE WHEN r1 < 0.05 THEN NULL ELSE 49 + 2000 * r2 END AS mrr, CAST(20 + 1400 * r1 AS BIGINT) AS tenure_days,
       CAST(30 * r2 AS BIGINT) AS tx_count_90d, 3000 * r1 * r2 AS tx_amount_90d, CAST(6 * r1 AS BIGINT) AS tickets_90d,
       CAST(3 * r2 AS BIGINT) AS open_tickets, CAST(120 * r1 AS BIGINT) AS days_since_last_tx,
       ['smb', 'mid', 'enterprise'][1 + CAST(floor(r2 * 3) AS BIGINT)] AS segment,
       ['basic', 'pro'][1 + CAST(floor(r1 * 2) AS BIGINT)] AS plan,
       CASE WHEN r2 > 0.9 THEN NULL ELSE ['DE', 'FR', 'US'][1 + CAST(floor(r2 * 3) AS BIGINT)] END AS country,
       (r1 * 0.7 + r2 * 0.3) > 0.6 AS churned
FROM b""")


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    wh = DuckDBAdapter(tmp_path / "wh.duckdb")
    _features(wh, N)
    _, spec = write_spec(tmp_path, model={"params": {"n_estimators": 8, "max_depth": 4, "random_state": 3}})
    assert spec.model is not None
    table = wh.query("SELECT * FROM ops_ai.customer_features ORDER BY customer_id")
    pipe = make_pipeline(spec.model)
    pipe.fit(to_frame(table, spec.model.features), target_array(table, spec.model.features))
    expected = dict(
        zip(table.column("customer_id").to_pylist(), pipe.predict_proba(to_frame(table, spec.model.features))[:, 1])
    )
    return {"wh": wh, "spec": spec, "pipe": pipe, "expected": expected, "tmp": tmp_path}


def _small_chunks(spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch) -> PipelineSpec:
    """Chunks of 700 rows (several row groups in the staging file) and hash batches of 2,000."""
    monkeypatch.setattr(score_write, "HASH_BATCH_ROWS", 2_000)
    return spec.model_copy(update={"scoring": spec.scoring.model_copy(update={"chunk_rows": 700})})


def _run(setup: dict[str, Any], spec: PipelineSpec, batch: str, at: datetime, model: Any = None) -> Any:
    assert spec.model is not None
    models = ResolvedModels(ScoringModel(spec.model.name, "1", "champion", model or setup["pipe"]))
    return score_partition(
        setup["wh"], spec, models, as_of=AS_OF, run_id=f"run-{batch}", batch_id=batch, scored_at=at,
        workdir=setup["tmp"],
    )  # fmt: skip


def _preds(wh: DuckDBAdapter, table: str = "predictions") -> pd.DataFrame:
    return wh.query(f"SELECT * FROM ops_ai.{table} ORDER BY customer_id").to_pandas()


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("opsloop-score")]


def _tables(wh: DuckDBAdapter) -> set[str]:
    return {r["table_name"] for r in wh.query("SELECT table_name FROM information_schema.tables").to_pylist()}


def test_rebatch_gives_exact_chunks_in_order() -> None:
    sizes = [3, 5, 0, 7, 2]
    start = np.cumsum([0, *sizes])
    batches = [pa.record_batch({"i": np.arange(a, a + s)}) for a, s in zip(start, sizes, strict=False)]
    out = list(rebatch(iter(batches), 4))
    assert [b.num_rows for b in out] == [4, 4, 4, 4, 1]
    assert np.concatenate([b.column(0).to_numpy() for b in out]).tolist() == list(range(sum(sizes)))
    # a short first chunk (scoring starts sooner), then full ones
    out = list(rebatch(iter(batches), 6, first=2))
    assert [b.num_rows for b in out] == [2, 6, 6, 3]
    assert np.concatenate([b.column(0).to_numpy() for b in out]).tolist() == list(range(sum(sizes)))


@pytest.mark.parametrize("overlap", [True, False])
def test_population_reader_hands_over_every_row_in_order(tmp_path: Path, overlap: bool) -> None:
    """Overlapped, the first chunk is handed over while the read goes on; read-first (DuckDB), only once
    the source is exhausted — the same rows either way, and a failing read raises in the consumer."""
    done = threading.Event()

    def source(fail: bool = False) -> Any:
        for i in range(0, 100, 10):
            if fail and i == 50:
                raise OSError("warehouse read broke at row 50")
            yield pa.record_batch({"i": np.arange(i, i + 10)})
            if i == 10 and overlap:  # the first chunk (an eighth of 40 = 5 rows) is out by now
                assert done.wait(5), "the first chunk was not handed over while the read went on"
            elif i == 10:  # still reading: an overlapping reader would have handed the first chunk over
                time.sleep(0.3)
        done.set()

    def consume(reader: PopulationReader) -> list[int]:
        out: list[int] = []
        for b in reader:
            if not out and overlap:
                done.set()  # lets the source go on: it waits for this first hand-over
            elif not out:
                assert not reader._thread.is_alive()  # the whole read landed first
            out.extend(b.column(0).to_pylist())
        return out

    reader = PopulationReader(source, 40, tmp_path, overlap=overlap)
    try:
        assert consume(reader) == list(range(100))
    finally:
        reader.close()
    assert not list(tmp_path.glob("population_*"))
    done.clear()
    failing = PopulationReader(lambda: source(fail=True), 40, tmp_path, overlap=overlap)
    with pytest.raises(OSError, match="row 50"):
        consume(failing)
    failing.close()


def test_every_row_scored_once_with_the_models_score(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _small_chunks(setup["spec"], monkeypatch)
    pa.set_memory_pool(pa.system_memory_pool())  # as a process that has not started a stage yet
    res = _run(setup, spec, "b1", datetime.now(UTC))
    assert pa.default_memory_pool().backend_name == "jemalloc"  # the stage moved Arrow to the pool that returns memory
    assert res.rows == res.inserted == N and res.updated == 0
    p = _preds(setup["wh"])
    assert len(p) == p["customer_id"].nunique() == N
    expected = np.round([setup["expected"][k] for k in p["customer_id"]], 6)
    np.testing.assert_allclose(p["predicted_churn_risk"].to_numpy(), expected, atol=1e-9)
    assert (p["partition"] == 0).all() and (p["batch_id"] == "b1").all()
    assert len(_preds(setup["wh"], "prediction_history")) == N
    assert not {t for t in _tables(setup["wh"]) if t.startswith("_stg_")}  # no staging table left
    assert not _our_threads()  # reader, prefetch and staging threads ended
    assert not list(setup["tmp"].glob("opsloop-score-*"))  # chunk files removed


def test_newer_run_replaces_older_replay_changes_nothing(setup: dict[str, Any]) -> None:
    wh, spec = setup["wh"], setup["spec"]
    t1 = datetime.now(UTC)
    _run(setup, spec, "b1", t1)
    again = _run(setup, spec, "b2", t1 + timedelta(hours=1))
    assert (again.inserted, again.updated) == (0, N)
    p = _preds(wh)
    assert len(p) == N and (p["batch_id"] == "b2").all()
    hist = _preds(wh, "prediction_history")
    assert len(hist) == N and (hist["batch_id"] == "b2").all()  # one row per entity and score date
    old = _run(setup, spec, "b0", t1 - timedelta(hours=1))  # a late replay of an older run
    assert (old.inserted, old.updated) == (0, 0)
    assert (_preds(wh)["batch_id"] == "b2").all()


def test_duplicate_keys_fall_back_to_the_deduplicating_merge(setup: dict[str, Any]) -> None:
    wh = setup["wh"]
    wh.execute(
        "INSERT INTO ops_ai.customer_features SELECT * FROM ops_ai.customer_features WHERE customer_id < 'C000010'"
    )
    res = _run(setup, setup["spec"], "b1", datetime.now(UTC))
    assert res.rows == N + 10 and res.inserted == N
    p = _preds(wh)
    assert len(p) == p["customer_id"].nunique() == N
    h = _preds(wh, "prediction_history")  # the history holds what the MERGE kept
    assert len(h) == N and h.set_index("customer_id")["predicted_churn_risk"].equals(
        p.set_index("customer_id")["predicted_churn_risk"]
    )


def test_null_key_is_refused_and_the_predictions_stay(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    wh, spec = setup["wh"], _small_chunks(setup["spec"], monkeypatch)
    _run(setup, spec, "b1", datetime.now(UTC))
    wh.execute("UPDATE ops_ai.customer_features SET customer_id = NULL WHERE customer_id = 'C004000'")
    with pytest.raises(TerminalError, match=r"NULL merge key 'customer_id'"):
        _run(setup, spec, "b2", datetime.now(UTC) + timedelta(hours=1))
    p = _preds(wh)
    assert len(p) == N and (p["batch_id"] == "b1").all()


class _FailsOnThirdChunk:
    """A model that breaks mid-run (as a worker running out of memory would)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.calls = pipe, 0

    def predict_proba(self, x: pd.DataFrame) -> np.ndarray:
        self.calls += 1
        if self.calls == 3:
            raise MemoryError("chunk 3")
        return np.asarray(self.pipe.predict_proba(x))


def test_failure_mid_run_stops_the_threads_and_leaves_the_target(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    wh, spec = setup["wh"], _small_chunks(setup["spec"], monkeypatch)
    _run(setup, spec, "b1", datetime.now(UTC))
    with pytest.raises(MemoryError, match="chunk 3"):
        _run(setup, spec, "b2", datetime.now(UTC) + timedelta(hours=1), model=_FailsOnThirdChunk(setup["pipe"]))
    assert not _our_threads()
    assert (_preds(wh)["batch_id"] == "b1").all()
    assert not list(setup["tmp"].glob("opsloop-score-*"))


@pytest.mark.slow  # starts the BigQuery emulator
def test_generic_path_on_bigquery(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, bigquery_emulator_wh: Any
) -> None:
    """No transactions, no DuckDB SQL: the scored rows spilled locally and staged by one load job, the
    MERGE statement, the history from the staging table — same rows and scores as on DuckDB."""
    bq, spec = bigquery_emulator_wh, _small_chunks(setup["spec"], monkeypatch)
    features = setup["wh"].query("SELECT * FROM ops_ai.customer_features WHERE customer_id < 'C003000'")
    bq.append(TableRef("ops_ai", "customer_features"), features)
    t1 = datetime.now(UTC)
    bq.jobs.clear()
    res = _run({**setup, "wh": bq}, spec, "b1", t1)
    assert (res.rows, res.inserted, res.updated) == (3_000, 3_000, 0)
    kinds = [j.kind for j in bq.jobs]
    assert kinds.count("load") == 1 and "append" not in kinds and "merge" in kinds  # one load job (quota)
    again = _run({**setup, "wh": bq}, spec, "b2", t1 + timedelta(hours=1))
    assert (again.inserted, again.updated) == (0, 3_000)
    p = bq.query(
        f"SELECT customer_id, predicted_churn_risk, batch_id FROM {bq.quote(TableRef('ops_ai', 'predictions'))}"
    )
    got = {r["customer_id"]: r for r in p.to_pylist()}
    assert len(got) == 3_000 and {r["batch_id"] for r in got.values()} == {"b2"}
    assert all(abs(r["predicted_churn_risk"] - round(setup["expected"][k], 6)) < 1e-9 for k, r in got.items())
    hist = bq.query(f"SELECT COUNT(*) AS n FROM {bq.quote(TableRef('ops_ai', 'prediction_history'))}")
    assert hist.column(0)[0].as_py() == 3_000
