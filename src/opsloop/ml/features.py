"""Spec-driven features: build the feature table in the warehouse as of a date, read it back in
Arrow chunks, and the sklearn preprocessing that travels inside the logged model.

Point-in-time: the build SQL sees only events before ``@as_of`` and rows are keyed on
(entity key, as-of), so a snapshot never mixes information from two dates.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from opsloop.errors import TerminalError
from opsloop.ml.sql import merge_from_query, partition_predicate, render_sql
from opsloop.spec.ml import FeatureSpec
from opsloop.warehouse.base import TableRef, Warehouse
from opsloop.warehouse.write import WriteResult

MISSING = "__missing__"


def feature_table(fs: FeatureSpec) -> TableRef:
    return TableRef(fs.dataset, fs.table)


def build_features(wh: Warehouse, fs: FeatureSpec, as_of: date) -> WriteResult:
    """Run the spec's build SQL as of ``as_of`` and MERGE the snapshot into the feature table."""
    if fs.build is None:
        raise TerminalError(f"model.features.build: no SQL configured for {fs.dataset}.{fs.table}")
    if fs.as_of is None:
        raise TerminalError("model.features.asOf: required when the feature table is built by SQL")
    sql = render_sql(wh, fs.build.sql)
    keys = (fs.entity_key, fs.as_of)
    return merge_from_query(
        wh, feature_table(fs), sql, {"as_of": as_of}, keys, staging_suffix="_build", required=(*fs.columns, fs.target)
    )


def check_columns(wh: Warehouse, fs: FeatureSpec, extra: Sequence[str] = (), need_target: bool = True) -> None:
    """Fail before reading when the feature table lacks a configured column, naming spec path and table."""
    ref = feature_table(fs)
    schema = wh.table_schema(ref)
    if schema is None:
        raise TerminalError(f"model.features.table: {ref} does not exist (run the build_features step first)")
    have = set(schema.names)
    wanted = [("entityKey", fs.entity_key)]
    wanted += [("asOf", fs.as_of)] if fs.as_of else []
    wanted += [("target", fs.target)] if need_target else []
    wanted += [("numeric", c) for c in fs.numeric] + [("categorical", c) for c in fs.categorical]
    wanted += [("extra", c) for c in extra]
    missing = [f"model.features.{where}: column {col!r}" for where, col in wanted if col not in have]
    if missing:
        raise TerminalError(f"{ref} lacks configured columns: {'; '.join(missing)} (table has {sorted(have)})")


def latest_as_of(wh: Warehouse, fs: FeatureSpec) -> date | None:
    if fs.as_of is None:
        return None
    t = wh.query(f"SELECT MAX({wh.quote(fs.as_of)}) AS d FROM {wh.quote(feature_table(fs))}")
    value = t.column(0)[0].as_py()
    return value.date() if hasattr(value, "date") and not isinstance(value, date) else value


def read_feature_batches(
    wh: Warehouse,
    fs: FeatureSpec,
    columns: Sequence[str],
    as_of: date | None = None,
    where: str | None = None,
    partition: tuple[int, int] | None = None,
    batch_rows: int = 100_000,
) -> Iterator[pa.RecordBatch]:
    """Stream ``columns`` of one as-of snapshot (optionally one hash partition) as Arrow batches."""
    cols = ", ".join(wh.quote(c) for c in dict.fromkeys(columns))
    conds: list[str] = []
    params: dict[str, Any] = {}
    if as_of is not None and fs.as_of is not None:
        conds.append(f"{wh.quote(fs.as_of)} = {wh.param('as_of')}")
        params["as_of"] = as_of
    if where:
        conds.append(where)
    if partition is not None:
        conds.append(partition_predicate(wh, fs.entity_key, partition[1], partition[0]))
    sql = f"SELECT {cols} FROM {wh.quote(feature_table(fs))}"
    if conds:
        sql += " WHERE " + " AND ".join(f"({c})" for c in conds)
    yield from wh.read_batches(sql, params or None, batch_rows=batch_rows)


def to_frame(data: pa.Table | pa.RecordBatch, fs: FeatureSpec) -> pd.DataFrame:
    """Model input: numeric features as float64 (NULL → NaN), categoricals as object (NULL → NaN)."""
    out: dict[str, Any] = {}
    for name in fs.numeric:
        out[name] = numeric_values(data.column(name))
    for name in fs.categorical:
        out[name] = pd.Series(_categorical(data.column(name)), dtype=object, copy=False)
    return pd.DataFrame(out, columns=fs.columns)


def numeric_values(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric (or boolean) feature column as float64, NULL → NaN (read-only when zero-copy)."""
    if pa.types.is_boolean(col.type):
        col = pc.cast(col, pa.int8())
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def string_values(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A categorical feature column as one Arrow string array (NULL stays NULL)."""
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _categorical(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Strings as an object array (NULL → NaN) built from the column's distinct values: one Python
    string per level instead of one per row (4× cheaper on 1M rows)."""
    enc = pc.dictionary_encode(string_values(col))
    levels = np.asarray([*enc.dictionary.to_pylist(), np.nan], dtype=object)
    return levels[enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)]


def target_array(data: pa.Table, fs: FeatureSpec) -> np.ndarray:
    """The target as 0/1 int; only bool, 0/1 integers and 'true'/'false' strings are accepted."""
    col = data.column(fs.target)
    if pa.types.is_boolean(col.type):
        return np.asarray(pc.cast(col, pa.int8()).to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type):
        vals = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        bad = ~np.isin(vals, (0.0, 1.0))
    else:
        low = pc.utf8_lower(pc.cast(col, pa.string()))
        vals = np.where(np.asarray(low.to_pylist(), dtype=object) == "true", 1.0, 0.0)
        bad = ~np.isin(np.asarray(low.to_pylist(), dtype=object), ("true", "false"))
    if bad.any():
        first = col.to_pylist()[int(np.argmax(bad))]
        raise TerminalError(f"model.features.target: {fs.target!r} must be boolean or 0/1; found {first!r}")
    return vals.astype(np.int64)


def make_preprocessor(fs: FeatureSpec, scale: bool) -> ColumnTransformer:
    """Imputation (+ missing indicators), scaling for linear models, one-hot ignoring unknown levels."""
    num_steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median", add_indicator=True))]
    if scale:
        num_steps.append(("scale", StandardScaler()))
    cat = Pipeline(
        [
            ("impute", SimpleImputer(strategy="constant", fill_value=MISSING)),
            ("onehot", OneHotEncoder(handle_unknown="ignore", max_categories=64, sparse_output=False)),
        ]
    )
    parts: list[tuple[str, Any, list[str]]] = []
    if fs.numeric:
        parts.append(("num", Pipeline(num_steps), list(fs.numeric)))
    if fs.categorical:
        parts.append(("cat", cat, list(fs.categorical)))
    return ColumnTransformer(parts, remainder="drop")


def stable_bucket(keys: Sequence[Any]) -> np.ndarray:
    """A per-key number in [0, 1) that never changes (SHA-256 of the key): canary assignment."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, k in enumerate(keys):
        digest = hashlib.sha256(str(k).encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def default_jobs() -> int:
    """Parallel jobs for tree ensembles: every core up to 4 (the workers have 1–4 vCPUs)."""
    return max(1, min(4, os.cpu_count() or 1))
