"""Quality gates through the loader into DuckDB: every rule quarantines its bad row with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pyarrow as pa
import pytest

from opsloop.errors import QualityGateError
from opsloop.ingest import ingest_source
from opsloop.transform.quality import SchemaDriftError
from opsloop.warehouse.base import TableRef
from tests.ingest.conftest import SALT, TableSource, make_spec

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("customer_id", pa.string()),
        ("amount", pa.decimal128(38, 9)),
        ("currency", pa.string()),
        ("code", pa.string()),
        ("event_time", TS),
        ("updated_at", TS),
    ]
)


def rows(n: int = 40, **bad: dict) -> pa.Table:
    """``n`` good rows; ``bad`` maps a row id to the fields it overrides."""
    out = []
    for i in range(1, n + 1):
        r = {
            "id": i,
            "customer_id": f"C{i:07d}",
            "amount": Decimal("10.5"),
            "currency": "EUR",
            "code": f"AB-{i:03d}",
            "event_time": NOW - timedelta(minutes=30),
            "updated_at": NOW - timedelta(minutes=1),
        }
        r.update(bad.get(f"r{i}", {}))
        out.append(r)
    return pa.Table.from_pylist(out, schema=SCHEMA)


CHECKS = {
    "not_null": ({"column": "customer_id", "rule": "not_null"}, {"customer_id": None}, "customer_id is NULL"),
    "min": ({"column": "amount", "rule": "min", "value": 0}, {"amount": Decimal("-3")}, "is below min 0"),
    "max": ({"column": "amount", "rule": "max", "value": 1000}, {"amount": Decimal("5000")}, "is above max 1000"),
    "max_age_minutes": (
        {"column": "event_time", "rule": "max_age_minutes", "value": 120},
        {"event_time": NOW - timedelta(hours=5)},
        "min older than updated_at (max 120)",
    ),
    "unique": ({"column": "code", "rule": "unique"}, {"code": "AB-001"}, "repeats"),
    "accepted_values": (
        {"column": "currency", "rule": "accepted_values", "value": ["EUR", "USD"]},
        {"currency": "CHF"},
        "currency = CHF is not one of [EUR, USD]",
    ),
    "regex": (
        {"column": "code", "rule": "regex", "value": r"^[A-Z]{2}-\d{3}$"},
        {"code": "bad code"},
        "does not match",
    ),
}


def _ingest(wh, spec, data, run_id="r1", **kw):
    return ingest_source(wh, spec, spec.sources[0], TableSource(spec, {"items": data}), run_id, SALT, now=NOW, **kw)


@pytest.mark.parametrize("rule", list(CHECKS))
def test_each_rule_quarantines_its_bad_row_with_a_reason(wh, rule) -> None:
    check, override, reason = CHECKS[rule]
    spec = make_spec("watermark", checks=[check])
    out = _ingest(wh, spec, rows(40, r7=override))
    assert out["rows_quarantined"] == 1 and out["inserted"] == 39
    q = wh.query("SELECT * FROM opsloop_meta._quarantine").to_pylist()
    assert len(q) == 1
    assert q[0]["rule"] == rule and q[0]["column_name"] == check["column"] and reason in q[0]["reason"]
    assert q[0]["pipeline"] == "t" and q[0]["source"] == "pg" and q[0]["run_id"] == "r1"
    assert json.loads(q[0]["row_json"])["id"] == 7
    assert 7 not in [r["id"] for r in wh.query("SELECT id FROM ops.items").to_pylist()]
    assert out["quarantined_by_rule"] == {f"{rule}:{check['column']}": 1}


def test_gate_fails_before_merge_naming_rule_and_counts(wh) -> None:
    spec = make_spec("watermark", checks=[CHECKS["min"][0], CHECKS["not_null"][0]])
    _ingest(wh, spec, rows(40))
    state = wh.get_state("t", "pg.items")
    bad = {f"r{i}": {"amount": Decimal("-1")} for i in range(1, 5)} | {"r9": {"customer_id": None}}
    changed = rows(40, **bad)
    changed = changed.set_column(6, "updated_at", pa.array([NOW] * 40, TS))
    with pytest.raises(
        QualityGateError, match=r"5 of 40 rows \(12.5%\).*min:amount: 4 row\(s\), not_null:customer_id: 1"
    ):
        _ingest(wh, spec, changed, "r2")
    assert wh.query("SELECT count(*) AS n FROM ops.items WHERE updated_at = $t", {"t": NOW}).to_pylist() == [{"n": 0}]
    assert wh.get_state("t", "pg.items")["watermark"] == state["watermark"]  # position not moved
    assert wh.query("SELECT count(*) AS n FROM opsloop_meta._quarantine WHERE run_id = 'r2'").to_pylist() == [{"n": 5}]


def test_empty_extract_is_a_normal_run_that_changes_nothing(wh) -> None:
    spec = make_spec("watermark", checks=[CHECKS["min"][0]])
    _ingest(wh, spec, rows(30))
    out = _ingest(wh, spec, rows(0), "r2")
    assert (out["rows_read"], out["inserted"], out["updated"], out["deleted"]) == (0, 0, 0, 0)
    assert wh.query("SELECT count(*) AS n FROM ops.items").to_pylist() == [{"n": 30}]


def test_row_count_cliff_is_flagged(wh) -> None:
    spec = make_spec("watermark")
    for i in range(3):
        _ingest(wh, spec, rows(100), f"r{i}", full_refresh=True)
    out = _ingest(wh, spec, rows(10), "r9", full_refresh=True)
    assert any("row-count cliff: 10 rows read vs a median of 100" in w for w in out["warnings"])
    runs = wh.query("SELECT run_id, rows_read, flags FROM opsloop_meta._ingest_runs ORDER BY finished_at").to_pylist()
    assert [r["rows_read"] for r in runs] == [100, 100, 100, 10] and "cliff" in runs[-1]["flags"]


def test_schema_evolve_adds_new_and_nulls_missing_columns(wh) -> None:
    spec = make_spec("watermark", schema_policy="evolve")
    _ingest(wh, spec, rows(5))
    grown = rows(5).drop_columns(["code"]).append_column("note", pa.array(["x"] * 5))
    grown = grown.set_column(grown.schema.get_field_index("updated_at"), "updated_at", pa.array([NOW] * 5, TS))
    out = _ingest(wh, spec, grown, "r2")
    notes = out["streams"]["items"]["flags"]
    assert any("new column note" in n for n in notes) and any("column code missing" in n for n in notes)
    got = wh.query("SELECT note, code FROM ops.items ORDER BY id").to_pylist()
    assert got == [{"note": "x", "code": None}] * 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.append_column("note", pa.array(["x"] * t.num_rows)), "unexpected new column 'note'"),
        (lambda t: t.drop_columns(["code"]), "column 'code' is missing"),
        (lambda t: t.set_column(0, "id", pa.array([str(i) for i in range(t.num_rows)])), "'id' changed type INT64"),
    ],
)
def test_schema_freeze_fails_naming_the_column(wh, change, message) -> None:
    spec = make_spec("watermark", schema_policy="freeze")
    _ingest(wh, spec, rows(5))
    with pytest.raises(SchemaDriftError, match=message):
        _ingest(wh, spec, change(rows(5)), "r2")


def test_type_change_under_evolve_casts_to_the_target_type(wh) -> None:
    spec = make_spec("watermark", schema_policy="evolve")
    _ingest(wh, spec, rows(3))
    as_text = rows(3).set_column(0, "id", pa.array(["1", "2", "3"]))
    out = _ingest(wh, spec, as_text, "r2")
    assert any("cast to the target's INT64" in n for n in out["streams"]["items"]["flags"])
    assert wh.table_schema(TableRef("ops", "items")).column("id").type == "INT64"
    assert [r["id"] for r in wh.query("SELECT id FROM ops.items ORDER BY id").to_pylist()] == [1, 2, 3]


def test_large_loads_go_in_segments_and_only_the_last_commits_the_position(wh, monkeypatch) -> None:
    from opsloop import faults
    from opsloop.errors import InjectedFault
    from opsloop.ingest.loader import StreamLoader

    spec = make_spec("watermark")
    src = spec.sources[0]
    data = rows(35).set_column(6, "updated_at", pa.array([NOW + timedelta(seconds=i) for i in range(35)], TS))

    def load(run_id: str) -> StreamLoader:
        loader = StreamLoader(wh, spec, src, run_id, segment_rows=10, now=NOW)
        TableSource(spec, {"items": data}).run(loader)
        return loader

    faults.reset()
    monkeypatch.setenv("OPSLOOP_FAULT", "after_stage_load:raise:3")  # batches of 3 → segments of 12, 12, 11
    with pytest.raises(InjectedFault):
        load("r1")
    monkeypatch.delenv("OPSLOOP_FAULT")
    assert wh.query("SELECT count(*) AS n FROM ops.items").to_pylist() == [{"n": 24}]  # two segments committed
    assert wh.get_state("t", "pg.items") is None  # no position without the last segment
    loader = load("r2")
    assert loader.runs["items"].inserted == 35 - 24 and loader.runs["items"].updated == 0
    assert wh.query("SELECT count(*) AS n FROM ops.items").to_pylist() == [{"n": 35}]
    assert wh.get_state("t", "pg.items")["watermark"] == NOW + timedelta(seconds=34)
