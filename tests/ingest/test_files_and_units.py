"""File source (Parquet / CSV backfills) and small pure pieces: dedup, LSN helpers, pgoutput tuples."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from opsloop.errors import TerminalError
from opsloop.ingest import ingest_source
from opsloop.sources.files import FileSource
from opsloop.sources.pgoutput import UNCHANGED, lsn_to_int, lsn_to_str, parse_tuple
from opsloop.spec import parse_spec
from opsloop.transform.dedup import latest_per_key
from opsloop.warehouse.base import TableRef

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def file_spec(path: str, fmt: str | None = None):
    src = {"id": "files", "type": "file", "path": path, "tables": [{"name": "events", "primaryKey": ["id"]}],
           "sync": {"strategy": "watermark", "watermarkField": "updated_at"}, "chunkRows": 1000}  # fmt: skip
    if fmt:
        src["format"] = fmt
    return parse_spec({"name": "f", "sources": [src], "transform": {"qualityChecks": [
        {"column": "amount", "rule": "min", "value": 0}]}})  # fmt: skip


def events(n: int, start: int = 0, hours: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int32()),
            "amount": pa.array([-1.0 if i == 3 else float(i % 50) for i in range(start, start + n)]),
            "updated_at": pa.array([T0 + timedelta(hours=hours, seconds=i) for i in range(n)], pa.timestamp("ms")),
        }
    )


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_file_backfill_then_incremental(tmp_path, wh, fmt) -> None:
    d = tmp_path / "in"
    d.mkdir()
    write = (lambda t, p: pq.write_table(t, p)) if fmt == "parquet" else (lambda t, p: pcsv.write_csv(t, p))
    write(events(2500), d / f"part-1.{fmt}")
    spec = file_spec(str(d / f"*.{fmt}"))
    src = spec.sources[0]
    out = ingest_source(wh, spec, src, FileSource(spec, src), "r1")
    assert (out["rows_read"], out["inserted"], out["rows_quarantined"]) == (2500, 2499, 1)
    assert wh.query("SELECT count(*) AS n FROM raw_files.events").to_pylist() == [{"n": 2499}]
    write(events(10, start=2500, hours=5), d / f"part-2.{fmt}")
    again = ingest_source(wh, spec, src, FileSource(spec, src), "r2")
    assert again["rows_read"] == 11 and again["inserted"] == 10  # the boundary row + the new file's rows
    types = {c.name: c.type for c in wh.table_schema(TableRef("raw_files", "events")).columns}
    assert (types["id"], types["updated_at"]) == ("INT64", "TIMESTAMP")
    assert types["amount"] == ("FLOAT64" if fmt == "parquet" else "INT64")  # CSV types are inferred


def test_missing_files_are_a_clear_error(tmp_path, wh) -> None:
    spec = file_spec(str(tmp_path / "nothing*.parquet"))
    with pytest.raises(TerminalError, match="no files match"):
        ingest_source(wh, spec, spec.sources[0], FileSource(spec, spec.sources[0]), "r1")


def test_latest_per_key_keeps_the_newest_row() -> None:
    t = pa.table({"k": [1, 1, 2, 1, 3], "ts": [1, 3, 1, 2, None], "v": ["a", "b", "c", "d", "e"]})
    out = latest_per_key(t, ["k"], "ts")
    assert sorted(zip(out["k"].to_pylist(), out["v"].to_pylist(), strict=True)) == [(1, "b"), (2, "c"), (3, "e")]
    assert latest_per_key(t.slice(2, 1), ["k"], "ts").num_rows == 1


def test_lsn_roundtrip_and_tuple_parsing() -> None:
    assert lsn_to_int("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert lsn_to_str(lsn_to_int("0/1528E60")) == "0/1528E60"
    body = struct.pack("!h", 3) + b"t" + struct.pack("!i", 3) + b"abc" + b"n" + b"u"
    values, end = parse_tuple(body, 0)
    assert values == [b"abc", None, UNCHANGED] and end == len(body)
