"""The Arrow preprocessing batch scoring uses: the same matrix, cell for cell, as the fitted
ColumnTransformer on ``to_frame``'s DataFrame — or no Arrow path at all for shapes it does not copy."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from opsloop.ml.arrow_prep import ArrowPreprocessor
from opsloop.ml.features import make_preprocessor, to_frame
from opsloop.ml.models import ScoringModel
from opsloop.ml.train import make_pipeline
from opsloop.spec.ml import FeatureSpec, ModelSpec

FS = FeatureSpec(
    dataset="ops_ai",
    table="f",
    entity_key="id",
    target="y",
    numeric=["mrr", "tenure", "vip", "credit", "score"],
    categorical=["plan", "region", "tier"],
)


def _table(n: int, seed: int, *, unseen: bool) -> pa.Table:
    """Messy feature rows: NULLs in most columns, integers, booleans, decimals, integer-coded levels
    and — for the scoring side — levels the model never saw and NULLs where training had none."""
    rng = np.random.default_rng(seed)

    def holes(values: list[Any], share: float) -> list[Any]:
        return [None if rng.random() < share else v for v in values]

    plans = ["basic", "pro", "enterprise", *(["legacy"] if unseen else [])]
    return pa.table(
        {
            "id": pa.array([f"C{i}" for i in range(n)]),
            "mrr": pa.array(holes(list(rng.normal(500, 200, n)), 0.1), pa.float64()),
            "tenure": pa.array(holes([int(v) for v in rng.integers(0, 2000, n)], 0.05), pa.int64()),
            "vip": pa.array(holes([bool(v) for v in rng.random(n) < 0.2], 0.05 if unseen else 0.0), pa.bool_()),
            "credit": pa.array(
                holes([Decimal(f"{v:.2f}") for v in rng.uniform(0, 900, n)], 0.02), pa.decimal128(12, 2)
            ),
            "score": pa.array(list(rng.uniform(0, 1, n)), pa.float32()),
            "plan": pa.array(holes([plans[i] for i in rng.integers(0, len(plans), n)], 0.1)),
            "region": pa.array(holes([int(v) for v in rng.integers(1, 6 if unseen else 5, n)], 0.05), pa.int32()),
            "tier": pa.array(holes(["gold", "silver"] * (n // 2), 0.0 if not unseen else 0.2), pa.large_string()),
            "y": pa.array([bool(v) for v in rng.random(n) < 0.3]),
        }
    )


def _fit(kind: str, train: pa.Table) -> Any:
    pipe = make_pipeline(ModelSpec.model_validate({"name": "m", "kind": kind, "params": _small(kind), "features": FS}))
    return pipe.fit(to_frame(train, FS), np.asarray(train.column("y")).astype(int))


def _small(kind: str) -> dict[str, Any]:
    if kind == "random_forest":
        return {"n_estimators": 15, "max_depth": 5, "random_state": 0, "n_jobs": 1}
    return {"max_iter": 15, "early_stopping": False} if kind == "hist_gradient_boosting" else {}


@pytest.mark.parametrize("kind", ["random_forest", "logistic_regression", "hist_gradient_boosting"])
def test_arrow_matrix_and_scores_equal_sklearns(kind: str) -> None:
    pipe = _fit(kind, _table(3000, 1, unseen=False))
    score = _table(2500, 2, unseen=True)
    chunked = pa.concat_tables([score.slice(0, 1000), score.slice(1000)])  # a table of several chunks
    prep = ArrowPreprocessor.compile(pipe)
    assert prep is not None, "opsloop's own pipeline must take the Arrow path"
    for data in (score, chunked, score.to_batches(max_chunksize=700)[1]):
        frame = to_frame(data, FS)
        expected = pipe[:-1].transform(frame)
        got = prep.transform(data)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        sm = ScoringModel("m", "1", "champion", pipe)
        prepared = sm.prepare_batch(data, lambda f=frame: f)  # type: ignore[misc]
        np.testing.assert_array_equal(sm.scores_prepared(prepared), pipe.predict_proba(frame)[:, 1])
    # the scoring side had unseen levels and NULLs where training had none: they show in the matrix
    frame = to_frame(score, FS)
    assert frame["plan"].eq("legacy").any() and frame["tier"].isna().any()


def test_shapes_it_does_not_copy_go_through_sklearn() -> None:
    train = _table(2000, 4, unseen=False)
    y = np.asarray(train.column("y")).astype(int)
    frame = to_frame(train, FS)

    def fitted(pre: Any, data: pd.DataFrame = frame) -> Any:
        rf = RandomForestClassifier(n_estimators=5, random_state=0)
        return Pipeline([("prep", pre), ("model", rf)]).fit(data, y)

    few_levels = make_preprocessor(FS, scale=False)
    few_levels.set_params(cat__onehot__max_categories=2)  # "basic"/"pro"/… become infrequent
    empty = frame.assign(mrr=np.nan)  # an all-missing training column: sklearn drops it
    pandas_out = make_preprocessor(FS, scale=False).set_output(transform="pandas")
    other = make_preprocessor(FS, scale=False)
    other.set_params(num=FunctionTransformer(np.nan_to_num))
    cases = {
        "infrequent levels": fitted(few_levels),
        "all-missing column": fitted(make_preprocessor(FS, scale=False), empty),
        "pandas output": fitted(pandas_out),
        "another transformer": fitted(other),
        "not a pipeline": LogisticRegression().fit(frame[["tenure"]].fillna(0), y),
    }
    for why, model in cases.items():
        assert ArrowPreprocessor.compile(model) is None, why
    # the fallback still gives the pipeline's own scores
    sm = ScoringModel("m", "1", "champion", cases["infrequent levels"])
    got = sm.scores_prepared(sm.prepare_batch(train.to_batches()[0], lambda: frame))
    np.testing.assert_array_equal(got, cases["infrequent levels"].predict_proba(frame)[:, 1])


def test_an_infinite_value_is_refused_naming_the_feature() -> None:
    pipe = _fit("random_forest", _table(1000, 5, unseen=False))
    bad = _table(10, 6, unseen=False)
    bad = bad.set_column(bad.schema.get_field_index("mrr"), "mrr", pa.array([1.0] * 9 + [np.inf]))
    prep = ArrowPreprocessor.compile(pipe)
    assert prep is not None
    with pytest.raises(ValueError, match=r"'mrr'.*infinite"):
        prep.transform(bad)
    with pytest.raises(ValueError, match="infinity"):  # what sklearn itself says
        pipe[:-1].transform(to_frame(bad, FS))


def test_frame_columns_are_what_the_arrow_path_reads() -> None:
    """The Arrow path reads the same columns to_frame builds; a missing one is a KeyError naming it."""
    pipe = _fit("random_forest", _table(800, 7, unseen=False))
    prep = ArrowPreprocessor.compile(pipe)
    assert prep is not None
    with pytest.raises(KeyError, match="tier"):
        prep.transform(_table(10, 8, unseen=False).drop_columns(["tier"]))
    assert isinstance(to_frame(_table(10, 8, unseen=False), FS), pd.DataFrame)
