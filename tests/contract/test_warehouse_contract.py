"""One body per behaviour, run on every warehouse adapter (see conftest.WAREHOUSE_PARAMS)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pyarrow as pa
import pytest

from opsloop import faults
from opsloop.errors import InjectedFault, TerminalError
from opsloop.warehouse.base import MergeSpec, StateUpdate, TableRef, TableSchema
from opsloop.warehouse.write import staging_ref, write_merge

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("amount", pa.decimal128(38, 9)),
        ("n", pa.int64()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("_deleted", pa.bool_()),
    ]
)
COLS = ("id", "amount", "n", "updated_at")


def rows(*items: tuple[str, float, int, int, bool]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"id": i, "amount": Decimal(str(a)), "n": n, "updated_at": T0 + timedelta(hours=h), "_deleted": d}
            for i, a, n, h, d in items
        ],
        schema=SCHEMA,
    )


@pytest.fixture
def target(wh) -> TableRef:  # type: ignore[no-untyped-def]
    return TableRef(f"c_{uuid.uuid4().hex[:8]}", "items")


def _write(wh, target: TableRef, data: pa.Table, run: str = "r1", state: StateUpdate | None = None):  # type: ignore[no-untyped-def]
    spec = MergeSpec(target, COLS, ("id",), ("updated_at",), delete_flag="_deleted")
    schema = TableSchema.from_arrow(SCHEMA.remove(SCHEMA.get_field_index("_deleted")))
    return write_merge(
        wh, target, schema, SCHEMA, data.to_batches(max_chunksize=2), spec, f"{run}_{target.table}", state
    )


def _snapshot(wh, target: TableRef) -> list[dict]:  # type: ignore[no-untyped-def]
    return wh.query(f"SELECT id, amount, n, updated_at FROM {wh.quote(target)} ORDER BY id").to_pylist()


def test_create_and_schema_roundtrip(wh, target) -> None:  # type: ignore[no-untyped-def]
    schema = TableSchema.from_arrow(SCHEMA)
    got = wh.ensure_table(target, schema)
    assert [(c.name, c.type) for c in got.columns] == [(c.name, c.type) for c in schema.columns]
    # evolve: a new column is added, existing data untouched
    wider = TableSchema.from_arrow(SCHEMA.append(pa.field("note", pa.string())))
    assert "note" in wh.ensure_table(target, wider).names


def test_merge_insert_update_older_ignored_duplicates_delete(wh, target) -> None:  # type: ignore[no-untyped-def]
    r = _write(wh, target, rows(("a", 1.5, 1, 0, False), ("b", 2, 1, 0, False), ("c", 3, 1, 0, False)))
    assert (r.inserted, r.updated, r.deleted) == (3, 0, 0)
    batch = rows(
        ("a", 10, 2, 2, False),  # update (newer)
        ("a", 11, 3, 1, False),  # duplicate key in the batch, older than the row above -> loses
        ("b", 99, 9, -1, False),  # older than the target row -> ignored
        ("c", 0, 0, 5, True),  # delete
        ("d", 4, 1, 0, False),  # insert
        ("e", 5, 1, 0, True),  # delete of an unknown key -> nothing inserted
    )
    r = _write(wh, target, batch, run="r2")
    assert (r.inserted, r.updated, r.deleted) == (1, 1, 1)
    snap = _snapshot(wh, target)
    assert [(x["id"], float(x["amount"]), x["n"]) for x in snap] == [("a", 10.0, 2), ("b", 2.0, 1), ("d", 4.0, 1)]


def test_replaying_a_batch_changes_nothing(wh, target) -> None:  # type: ignore[no-untyped-def]
    data = rows(("a", 1, 1, 0, False), ("b", 2, 1, 1, False))
    _write(wh, target, data)
    before = _snapshot(wh, target)
    r = _write(wh, target, data, run="r2")
    assert (r.inserted, r.updated, r.deleted) == (0, 0, 0)
    assert _snapshot(wh, target) == before


def test_empty_batch_never_truncates(wh, target) -> None:  # type: ignore[no-untyped-def]
    _write(wh, target, rows(("a", 1, 1, 0, False)))
    r = _write(wh, target, SCHEMA.empty_table(), run="r2", state=StateUpdate("p", "s", "r2", cursor="9"))
    assert r.rows_staged == 0 and len(_snapshot(wh, target)) == 1
    assert wh.get_state("p", "s")["cursor"] == "9"


def test_null_merge_key_is_refused_with_the_row(wh, target) -> None:  # type: ignore[no-untyped-def]
    bad = pa.Table.from_pylist(
        [
            {"id": "a", "amount": Decimal(1), "n": 1, "updated_at": T0, "_deleted": False},
            {"id": None, "amount": Decimal(1), "n": 1, "updated_at": T0, "_deleted": False},
        ],
        schema=SCHEMA,
    )
    with pytest.raises(TerminalError, match=r"NULL merge key 'id' \(first at row 1\)"):
        _write(wh, target, bad)


def test_chunked_read(wh, target) -> None:  # type: ignore[no-untyped-def]
    _write(wh, target, rows(*[(f"k{i:03d}", i, i, 0, False) for i in range(25)]))
    batches = list(wh.read_batches(f"SELECT id, n FROM {wh.quote(target)} ORDER BY id", batch_rows=10))
    assert sum(b.num_rows for b in batches) == 25
    assert max(b.num_rows for b in batches) <= 10
    assert batches[0].column("id")[0].as_py() == "k000"


def test_query_with_parameters(wh, target) -> None:  # type: ignore[no-untyped-def]
    _write(wh, target, rows(("a", 1, 1, 0, False), ("b", 2, 5, 0, False)))
    t = wh.query(f"SELECT id FROM {wh.quote(target)} WHERE n > {wh.param('m')}", {"m": 2})
    assert t.column("id").to_pylist() == ["b"]


def test_state_commit_and_read(wh) -> None:  # type: ignore[no-untyped-def]
    src = f"s_{uuid.uuid4().hex[:6]}"
    assert wh.get_state("p", src) is None
    wm = T0 + timedelta(minutes=5)
    wh.commit_state(StateUpdate("p", src, "run-1", watermark=wm, cursor="0/16B3748"))
    wh.commit_state(StateUpdate("p", src, "run-2", watermark=wm + timedelta(hours=1), cursor="0/16B9999"))
    st = wh.get_state("p", src)
    assert st["cursor"] == "0/16B9999" and st["last_run_id"] == "run-2"
    assert st["watermark"] == wm + timedelta(hours=1)


@pytest.mark.parametrize("point", ["after_stage_load", "after_merge_before_state"])
def test_crash_then_rerun_equals_clean_run(wh, target, monkeypatch, point) -> None:  # type: ignore[no-untyped-def]
    first = rows(("a", 1, 1, 0, False), ("b", 2, 1, 0, False))
    second = rows(("a", 7, 2, 3, False), ("b", 0, 0, 4, True), ("c", 3, 1, 0, False))
    src = f"s_{uuid.uuid4().hex[:6]}"
    clean = TableRef(target.dataset + "x", "items")
    _write(wh, clean, first)
    _write(wh, clean, second, run="r2", state=StateUpdate("p", src + "c", "r2", cursor="2"))

    _write(wh, target, first)
    monkeypatch.setenv("OPSLOOP_FAULT", point)
    with pytest.raises(InjectedFault):
        _write(wh, target, second, run="r2", state=StateUpdate("p", src, "r2", cursor="2"))
    monkeypatch.delenv("OPSLOOP_FAULT")
    faults.reset()
    st = wh.get_state("p", src)
    # state never ahead of the data: either not committed, or committed with the data (BigQuery)
    assert st is None or _snapshot(wh, target) == _snapshot(wh, clean)
    _write(wh, target, second, run="r3", state=StateUpdate("p", src, "r3", cursor="2"))
    assert _snapshot(wh, target) == _snapshot(wh, clean)
    assert wh.get_state("p", src)["cursor"] == "2"
    assert staging_ref(target).table == "_stg_items"
