"""Bad rows through the file source (CSV) → dedup → gates → MERGE into DuckDB: NULL keys, wrong types,
duplicate keys in one batch, far-future timestamps, non-UTF-8 text, empty extracts.

Each test asserts the exact outcome (error text naming the column / record / file, or quarantine rows
with their reason) and the row counts: read = landed + quarantined + superseded, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opsloop.errors import TerminalError
from opsloop.transform.quality import SchemaDriftError
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.bad_inputs.conftest import count, file_spec, ingest_files, quarantine

HEADER = "id,code,amount,updated_at\n"
T0 = "2026-11-01T00:00:0{}Z"
EVENTS = "raw_files.events"


def _csv(d: Path, name: str, body: str | bytes, header: str = HEADER) -> Path:
    d.mkdir(exist_ok=True)
    path = d / name
    data = header.encode() + (body if isinstance(body, bytes) else body.encode())
    path.write_bytes(data)
    return path


def _ids(wh: DuckDBAdapter) -> list[int]:
    return [r["id"] for r in wh.query(f"SELECT id FROM {EVENTS} ORDER BY id").to_pylist()]


def test_null_keys_are_quarantined_each_never_collapsed(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-01: two rows with a NULL key in one batch — both land in _quarantine (dedup used to merge
    them into one and drop the other silently)."""
    _csv(
        tmp_path / "in",
        "p1.csv",
        f"1,A,10.5,{T0.format(0)}\n,B,11.5,{T0.format(1)}\n,C,12.5,{T0.format(2)}\n2,D,13.5,{T0.format(3)}\n",
    )
    spec = file_spec(tmp_path / "in" / "*.csv", checks=[{"column": "id", "rule": "not_null"}])
    out = ingest_files(wh, spec, "r1")
    assert (out["rows_read"], out["inserted"], out["rows_quarantined"]) == (4, 2, 2)
    q = quarantine(wh)
    assert [(r["rule"], r["column_name"], r["reason"]) for r in q] == [("not_null", "id", "id is NULL")] * 2
    assert sorted(r["row_json"].split('"code": ')[1][1] for r in q) == ["B", "C"]  # both rows, with their data
    assert _ids(wh) == [1, 2] and out["quarantined_by_rule"] == {"not_null:id": 2}


def test_null_merge_key_without_a_rule_fails_naming_the_key(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-02: no not_null rule on the key → the load stops before staging completes, naming the key."""
    _csv(tmp_path / "in", "p1.csv", f"1,A,1.0,{T0.format(0)}\n,B,2.0,{T0.format(1)}\n,C,3.0,{T0.format(2)}\n")
    spec = file_spec(tmp_path / "in" / "*.csv")
    with pytest.raises(TerminalError) as err:
        ingest_files(wh, spec, "r1")
    assert str(err.value) == (
        f"{EVENTS}: 2 row(s) with NULL merge key 'id' (first at row 1); "
        "add a not_null quality check on it so they are quarantined"
    )
    assert count(wh, EVENTS) == 0 and wh.get_state("bi_files", "files.events") is None


def test_value_of_the_wrong_type_in_a_later_file_names_file_column_and_row(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-03: 'abc' in an INT64 column of a later file → TerminalError naming the file, column and CSV
    row (was a raw pyarrow ArrowInvalid); the target and its watermark are untouched."""
    _csv(tmp_path / "in", "p1.csv", f"1,A,10,{T0.format(0)}\n2,B,11,{T0.format(1)}\n")
    spec = file_spec(tmp_path / "in" / "*.csv")
    ingest_files(wh, spec, "r1")
    before = wh.get_state("bi_files", "files.events")
    bad = _csv(tmp_path / "in", "p2.csv", f"3,C,12,{T0.format(5)}\n4,D,abc,{T0.format(6)}\n")
    with pytest.raises(TerminalError) as err:
        ingest_files(wh, spec, "r2")
    msg = str(err.value)
    assert msg.startswith("source files.events: ") and str(bad) in msg
    assert "column #2 ('amount'): Row #3: CSV conversion error to int64: invalid value 'abc'" in msg
    assert _ids(wh) == [1, 2] and wh.get_state("bi_files", "files.events") == before


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        (
            "freeze",
            "raw_files.events: the source schema changed and transform.schemaPolicy freezes it: "
            "column 'amount' changed type INT64 → STRING",
        ),
        ("evolve", "column 'amount' changed type and its values do not convert to the target's int64"),
    ],
    ids=["freeze", "evolve"],
)
def test_column_that_changed_type_follows_the_schema_policy(
    tmp_path: Path, wh: DuckDBAdapter, policy: str, error: str
) -> None:
    """BI-04: the files rotate and the new export has text in ``amount`` (target INT64): ``freeze``
    refuses the type change, ``evolve`` tries the cast and names the column whose values do not fit."""
    first = _csv(tmp_path / "in", "p1.csv", f"1,A,10,{T0.format(0)}\n")
    spec = file_spec(tmp_path / "in" / "*.csv", schema_policy={"onTypeChange": policy})
    ingest_files(wh, spec, "r1")
    first.unlink()
    _csv(tmp_path / "in", "p2.csv", f"2,B,12 EUR,{T0.format(5)}\n")
    with pytest.raises(SchemaDriftError, match="^" + error.replace("(", r"\(").replace(")", r"\)")):
        ingest_files(wh, spec, "r2")
    assert _ids(wh) == [1] and wh.table_schema(TableRef("raw_files", "events")).column("amount").type == "INT64"


def test_rule_on_a_column_of_the_wrong_type_names_rule_and_column(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-05: a numeric rule (min) on a text column is a configuration error naming rule, column, type."""
    _csv(tmp_path / "in", "p1.csv", f"1,A,10,{T0.format(0)}\n")
    spec = file_spec(tmp_path / "in" / "*.csv", checks=[{"column": "code", "rule": "min", "value": 0}])
    with pytest.raises(
        TerminalError,
        match=r"^raw_files.events: quality rule min on 'code' needs a numeric column, "
        r"the data has string$",
    ):
        ingest_files(wh, spec, "r1")
    assert count(wh, EVENTS) == 0


def test_duplicate_keys_in_one_batch_keep_the_latest_and_are_counted(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-06: three versions of id 1 in one file → the latest wins and the two older ones are reported
    as superseded; a repeated value of a ``unique`` column is quarantined. A rerun changes nothing."""
    _csv(
        tmp_path / "in",
        "p1.csv",
        f"1,A,10,{T0.format(1)}\n1,A,30,{T0.format(3)}\n1,A,20,{T0.format(2)}\n2,B,5,{T0.format(0)}\n"
        f"3,B,6,{T0.format(0)}\n",
    )
    spec = file_spec(tmp_path / "in" / "*.csv", checks=[{"column": "code", "rule": "unique"}])
    out = ingest_files(wh, spec, "r1")
    flags = out["streams"]["events"]["flags"]
    assert (out["rows_read"], out["inserted"], out["rows_quarantined"]) == (5, 2, 1)
    assert "dedup: 2 row(s) superseded by a later version of the same key in one load (transform.deduplicate)" in flags
    assert [(r["rule"], r["reason"]) for r in quarantine(wh)] == [
        ("unique", "code = B repeats (duplicate within this load)")
    ]
    assert wh.query(f"SELECT id, amount FROM {EVENTS} ORDER BY id").to_pylist() == [
        {"id": 1, "amount": 30},
        {"id": 2, "amount": 5},
    ]
    again = ingest_files(wh, spec, "r2")
    assert (again["inserted"], again["updated"], count(wh, EVENTS)) == (0, 0, 2)


def test_far_future_timestamp_does_not_poison_the_watermark(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-07: a row stamped 2999 lands (no rule forbids it), but the committed watermark is capped at
    the extract time with a warning — before, the next runs read from 2999 on and silently skipped
    every later change."""
    now = datetime.now(UTC).replace(microsecond=0)
    _csv(tmp_path / "in", "p1.csv", f"1,A,1,{(now - timedelta(hours=1)).isoformat()}\n2,B,2,2999-01-01T00:00:00Z\n")
    spec = file_spec(tmp_path / "in" / "*.csv")
    out = ingest_files(wh, spec, "r1")
    assert out["inserted"] == 2
    assert [w.split(" (extract time")[0] for w in out["warnings"]] == [
        "events: watermark: newest value 2999-01-01T00:00:00+00:00 is in the future"
    ]
    wm = wh.get_state("bi_files", "files.events")["watermark"]
    assert now - timedelta(minutes=1) <= wm <= datetime.now(UTC)
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    _csv(tmp_path / "in", "p2.csv", f"3,C,3,{later.isoformat()}\n")
    again = ingest_files(wh, spec, "r2")
    assert (again["rows_read"], again["inserted"], again["updated"]) == (2, 1, 0)  # the 2999 row re-read, unchanged
    assert _ids(wh) == [1, 2, 3]


def test_non_utf8_text_in_a_file_names_file_column_and_record(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-08: a Latin-1 byte in a UTF-8 export → TerminalError naming the file, the column and the
    record's key (was a bare ``ArrowInvalid: Invalid UTF8 payload``); nothing is loaded."""
    bad = _csv(
        tmp_path / "in",
        "p1.csv",
        f"1,A,1,{T0.format(0)}\n2,".encode() + "Müller".encode("latin-1") + f",2,{T0.format(1)}\n".encode(),
    )
    spec = file_spec(tmp_path / "in" / "*.csv")
    with pytest.raises(TerminalError) as err:
        ingest_files(wh, spec, "r1")
    assert str(err.value) == (
        f"source files.events: {bad}: column 'code' is not valid UTF-8 text at the record {{'id': 2}} "
        "(value b'M\\xfcller'): Invalid UTF8 payload"
    )
    assert count(wh, EVENTS) == 0 and wh.get_state("bi_files", "files.events") is None


def test_empty_extract_changes_nothing_and_a_full_refresh_never_truncates(tmp_path: Path, wh: DuckDBAdapter) -> None:
    """BI-09: an incremental run over an empty export changes nothing; a full refresh whose extract is
    empty fails loudly and keeps the table (it used to drop it and load nothing)."""
    data = _csv(tmp_path / "in", "p1.csv", f"1,A,1,{T0.format(0)}\n2,B,2,{T0.format(1)}\n")
    spec = file_spec(tmp_path / "in" / "*.csv")
    ingest_files(wh, spec, "r1")
    state = wh.get_state("bi_files", "files.events")
    _csv(tmp_path / "in", "p2.csv", "")  # header only
    out = ingest_files(wh, spec, "r2")
    assert (out["inserted"], out["updated"], out["deleted"], count(wh, EVENTS)) == (0, 0, 0, 2)
    data.write_text(HEADER)  # the whole export is empty now
    with pytest.raises(TerminalError) as err:
        ingest_files(wh, spec, "r3", full_refresh=True)
    assert str(err.value) == (
        f"{EVENTS}: the full refresh of files.events read 0 rows, so the table's 2 row(s) were kept and its "
        "position not moved (an empty extract never empties a table). If the source really is empty now, drop "
        "the table yourself, then rerun"
    )
    assert _ids(wh) == [1, 2] and wh.get_state("bi_files", "files.events")["watermark"] == state["watermark"]
