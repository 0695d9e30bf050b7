"""Mapped payloads, column at a time: canonical JSON text, hash and push-ready values per batch.

A payload is ``{crm_field: value}`` for one entity. Its canonical text is
``json.dumps(payload, sort_keys=True, separators=(",", ":"))`` after :func:`jsonable` (timestamps
as ISO ``…Z`` strings, decimals as floats, NaN/inf as null) and its hash the first 32 hex digits of
that text's SHA-256 — the values ``_sync_state`` holds. :func:`encode_batch` produces exactly the
same text and hash for a whole Arrow batch without building a dict per row: each column is encoded
once (low-cardinality columns — enums, the run's ``scored_at`` — through their dictionary of
distinct values), the columns are joined element-wise by Arrow, and only the SHA-256 runs per row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]  # what json.dumps uses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsloop.crm.base import FieldSpec, iso_z

VALUE_PREFIX = "f:"  # staged candidates carry each mapped value as column "f:<crm field>"


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


Hasher = Callable[[pa.Array], pa.Array]


def hash_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    sha = hashlib.sha256
    return pa.array([sha(t.encode()).hexdigest()[:32] for t in texts.to_pylist()], pa.string())


HASH_SPLIT = 4


def duckdb_hasher(con: Any, min_rows: int = 5000) -> Hasher:
    """:func:`hash_texts` computed by DuckDB's ``sha256`` on connection ``con``: the same digests
    (SHA-256 of the UTF-8 text, first 32 hex digits) from one C++ loop instead of a hashlib call per
    row — about a third of the CPU — handed over as :data:`HASH_SPLIT` record batches, which DuckDB
    hashes in parallel (50k payloads on 2 cores: 17-21 → 9 ms). Batches under ``min_rows`` (a
    query's fixed cost) use hashlib."""

    def hashes(texts: pa.Array) -> pa.Array:
        n = len(texts)
        if n < min_rows:
            return hash_texts(texts)
        order = pa.array(np.arange(n, dtype=np.int64))
        # in a few record batches, so DuckDB hashes them on all its threads (one batch: one thread)
        parts = pa.table({"i": order, "t": texts}).to_batches(max_chunksize=-(-n // HASH_SPLIT))
        con.register("_opsloop_payload_texts", pa.Table.from_batches(parts))
        try:
            out = con.sql("SELECT i, left(sha256(t), 32) AS h FROM _opsloop_payload_texts").to_arrow_table()
        finally:
            con.unregister("_opsloop_payload_texts")
        if out.num_rows != n:
            raise RuntimeError(f"DuckDB hashed {out.num_rows} of {n} payloads")
        digests = out.column("h").combine_chunks().cast(pa.string())
        pos = out.column("i").combine_chunks()
        if not pc.all(pc.equal(pos, order)).as_py():  # row order not kept: restore it
            digests = digests.take(pc.sort_indices(pos))
        return digests

    return hashes


def _by_distinct(col: pa.Array, fn: Callable[[Any], str | None]) -> pa.Array:
    """``fn`` applied once per distinct value, spread back over the column (nulls stay null)."""
    enc = pc.dictionary_encode(col)
    mapped = pa.array([fn(v) for v in enc.dictionary.to_pylist()], pa.string())
    return mapped.take(enc.indices)


# |x| in [1e-4, 1e10) or 0: Arrow's float → string cast gives the shortest round-trip digits in the
# positional form repr() uses, "100" for repr's "100.0" aside. Outside it the two differ ("1e-9" vs
# "1e-09"; Arrow switches to an exponent from 1e10 on, repr from 1e16): repr() per value there.
_ARROW_REPR_RANGE = (1e-4, 1e10)


def _float_texts(col: pa.Array) -> pa.Array:
    """The JSON text ``json.dumps`` writes for each value (repr(); null for null, NaN and ±inf), from
    Arrow's cast for the usual magnitudes (scores, amounts) and repr() only for the others."""
    text = col.cast(pa.string())
    # in the usual range Arrow writes no exponent and no inf/nan: only repr's ".0" can be missing
    text = pc.if_else(pc.match_substring(text, "."), text, pc.binary_join_element_wise(text, ".0", ""))
    finite = pc.fill_null(pc.is_finite(col), False)
    size = pc.abs(col)
    low, high = _ARROW_REPR_RANGE
    usual = pc.or_(pc.and_(pc.greater_equal(size, low), pc.less(size, high)), pc.equal(col, 0.0))
    other = pc.and_(finite, pc.invert(pc.fill_null(usual, False)))
    if pc.any(other).as_py():
        rest = col.filter(other).to_pylist()
        text = pc.replace_with_mask(text, other, pa.array([repr(v) for v in rest], pa.string()))
    return pc.if_else(finite, text, pa.scalar("null"))


# text that is a JSON string once put between quotes: no quote, backslash, control or non-ASCII character
_PLAIN_TEXT = r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$"


def json_strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each string of ``col`` as a JSON string literal, as ``json.dumps`` writes it (nulls stay
    null), for columns of mostly distinct values (ids): quoted by Arrow when no value needs escaping,
    else escaped once per distinct value. Low-cardinality columns (enums, one timestamp) are quicker
    through :func:`_by_distinct` alone (50k values: 0.8 vs 3 ms); 50k distinct ids are not (6.5 vs 2.4 ms)."""
    col = (col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).cast(pa.string())
    if pc.all(pc.match_substring_regex(col, _PLAIN_TEXT)).as_py() is not False:
        return pc.binary_join_element_wise('"', col, '"', "")
    return _by_distinct(col, encode_basestring_ascii)


def _generic_json(v: Any) -> str:
    return json.dumps(jsonable(v), sort_keys=True, separators=(",", ":"), default=str)


def encode_column(col: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(JSON text of each value, the value as it is pushed) for one mapped column."""
    t = col.type
    if pa.types.is_floating(t):
        clean = pc.if_else(pc.is_finite(col), col, pa.scalar(None, t))
        return _float_texts(col.cast(pa.float64())), clean
    if pa.types.is_decimal(t):
        as_float = col.cast(pa.float64())
        return encode_column(as_float)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = _by_distinct(col, encode_basestring_ascii)
        return pc.fill_null(text, "null"), col.cast(pa.string())
    if pa.types.is_boolean(t):
        text = pc.if_else(col, pa.scalar("true"), pa.scalar("false"))
        return pc.fill_null(text, "null"), col
    if pa.types.is_integer(t):
        return pc.fill_null(col.cast(pa.string()), "null"), col.cast(pa.int64())
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        iso = _by_distinct(col, iso_z)
        return pc.fill_null(_by_distinct(iso, encode_basestring_ascii), "null"), iso
    values = [jsonable(v) for v in col.to_pylist()]
    return pa.array([_generic_json(v) for v in values], pa.string()), pa.array(
        [None if v is None else str(v) for v in values], pa.string()
    )


def encode_batch(
    table: pa.Table, fields: list[FieldSpec], hasher: Hasher = hash_texts
) -> tuple[pa.Array, pa.Array, dict[str, pa.Array]]:
    """(canonical JSON texts, their hashes, {crm field: push-ready values}) for one batch."""
    parts: list[Any] = []
    values: dict[str, pa.Array] = {}
    for i, f in enumerate(sorted(fields, key=lambda f: f.crm_name)):
        col = table.column(f.column).combine_chunks()
        text, value = encode_column(col)
        values[f.crm_name] = value
        parts += [("{" if i == 0 else ",") + encode_basestring_ascii(f.crm_name) + ":", text]
    if not parts:
        texts = pa.array(["{}"] * table.num_rows, pa.string())
    else:
        texts = pc.binary_join_element_wise(*parts, "}", "")
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    return texts, hasher(texts), {f.crm_name: values[f.crm_name] for f in fields}


def payload_rows(values: dict[str, pa.Array], indices: list[int] | None = None) -> list[dict[str, Any]]:
    """Python payload dicts for (some) rows — for samples, review logs and the significance rule."""
    names = list(values)
    take = None if indices is None else pa.array(indices, pa.int64())
    cols = [(values[n] if take is None else values[n].take(take)).to_pylist() for n in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*cols, strict=True)] if cols else []
