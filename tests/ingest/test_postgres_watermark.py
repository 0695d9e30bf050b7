"""Postgres watermark mode (COPY → Arrow, watermark − lag, key-scan deletes) against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from opsloop.errors import ConfigError
from tests.ingest.conftest import exec_sql, make_spec, run_ingest, seed_items, source_rows, target_rows


@pytest.mark.parametrize("delete_mode", ["hard", "soft"])
def test_watermark_replicates_inserts_updates_deletes(pg_dsn, wh, delete_mode) -> None:
    seed_items(pg_dsn)
    spec = make_spec("watermark", delete_mode=delete_mode)
    first = run_ingest(wh, spec, pg_dsn, "r1")
    assert (first["rows_read"], first["inserted"]) == (50, 50)
    assert target_rows(wh) == source_rows(pg_dsn)
    exec_sql(
        pg_dsn,
        "INSERT INTO items (id, name, amount) VALUES (100, 'new', 1.50)",
        "UPDATE items SET name = 'changed', updated_at = now() WHERE id IN (1, 2)",
        "DELETE FROM items WHERE id IN (3, 4, 5)",
    )
    second = run_ingest(wh, spec, pg_dsn, "r2")
    assert second["rows_read"] == 1 + 3  # the row at the watermark (re-read, unchanged) + the 3 changed
    assert (second["inserted"], second["updated"], second["deleted"]) == (1, 2, 3)
    if delete_mode == "hard":
        assert target_rows(wh) == source_rows(pg_dsn)
    else:
        assert target_rows(wh, where="WHERE NOT _deleted") == source_rows(pg_dsn)
        assert [r["id"] for r in wh.query("SELECT id FROM ops.items WHERE _deleted ORDER BY id").to_pylist()] == [
            3,
            4,
            5,
        ]
    state = wh.get_state("t", "pg.items")
    assert state["watermark"].timestamp() == max(r[1] for r in source_rows(pg_dsn, cols="id, updated_at"))
    third = run_ingest(wh, spec, pg_dsn, "r3")
    assert (third["inserted"], third["updated"], third["deleted"]) == (0, 0, 0)


def test_boundary_ties_are_neither_lost_nor_doubled(pg_dsn, wh) -> None:
    stamp = "2026-11-01 10:00:00+00"
    exec_sql(
        pg_dsn,
        "CREATE TABLE items (id int PRIMARY KEY, name text, amount numeric(12,2), qty int, active boolean, "
        "updated_at timestamptz)",
        f"INSERT INTO items SELECT g, 'n' || g, g, g, true, '{stamp}' FROM generate_series(1, 5) g",
    )
    spec = make_spec("watermark")
    run_ingest(wh, spec, pg_dsn, "r1")
    # a row committed later with the very same timestamp as the committed watermark
    exec_sql(pg_dsn, f"INSERT INTO items VALUES (6, 'late tie', 6, 6, true, '{stamp}')")
    out = run_ingest(wh, spec, pg_dsn, "r2")
    assert out["rows_read"] == 6 and out["inserted"] == 1 and out["updated"] == 0
    assert target_rows(wh) == source_rows(pg_dsn)
    assert wh.query("SELECT count(*) AS n FROM ops.items").to_pylist() == [{"n": 6}]


def test_lag_rereads_late_commits_behind_the_watermark(pg_dsn, wh) -> None:
    seed_items(pg_dsn, 5)
    spec = make_spec("watermark", lag="10m")
    run_ingest(wh, spec, pg_dsn, "r1")
    wm = wh.get_state("t", "pg.items")["watermark"]
    back = (wm - timedelta(minutes=5)).isoformat()
    exec_sql(pg_dsn, f"INSERT INTO items (id, name, updated_at) VALUES (77, 'back-dated', '{back}')")
    out = run_ingest(wh, spec, pg_dsn, "r2")
    assert out["inserted"] == 1 and 77 in [r[0] for r in target_rows(wh)]


def test_rereads_at_the_boundary_change_nothing_and_empty_extract_is_normal(pg_dsn, wh) -> None:
    seed_items(pg_dsn, 8)
    spec = make_spec("watermark")
    run_ingest(wh, spec, pg_dsn, "r1")
    wh.execute("UPDATE ops.items SET name = 'damaged' WHERE id = 8")
    out = run_ingest(wh, spec, pg_dsn, "r2")  # nothing new: the row at the watermark is re-read ...
    assert (out["rows_read"], out["inserted"], out["updated"]) == (1, 0, 0)  # ... and changes nothing
    assert wh.query("SELECT name FROM ops.items WHERE id = 8").to_pylist() == [{"name": "damaged"}]
    exec_sql(pg_dsn, "DELETE FROM items")  # an empty source never empties the target
    empty = run_ingest(wh, spec, pg_dsn, "r3")
    assert (empty["rows_read"], empty["inserted"], empty["deleted"]) == (0, 0, 0)
    assert len(target_rows(wh)) == 8
    assert any("key scan returned no keys" in w for w in empty["warnings"])


def test_since_repairs_rows(pg_dsn, wh) -> None:
    seed_items(pg_dsn, 8)
    spec = make_spec("watermark")
    run_ingest(wh, spec, pg_dsn, "r1")
    exec_sql(pg_dsn, "UPDATE items SET updated_at = now() - interval '2 days', name = 'fixed' WHERE id = 3")
    out = run_ingest(wh, spec, pg_dsn, "r2", since=datetime.now(UTC) - timedelta(days=3))
    assert out["rows_read"] == 8 and out["streams"]["items"]["kind"] == "incremental"
    # the repaired row is older than what the target holds, so MERGE keeps the newer target row ...
    assert wh.query("SELECT name FROM ops.items WHERE id = 3").to_pylist() == [{"name": "name 3"}]
    # ... and full_refresh replaces the target with the source
    run_ingest(wh, spec, pg_dsn, "r3", full_refresh=True)
    assert target_rows(wh) == source_rows(pg_dsn)


def test_unknown_watermark_column_is_a_config_error(pg_dsn, wh) -> None:
    exec_sql(pg_dsn, "CREATE TABLE items (id int PRIMARY KEY, changed timestamptz)")
    with pytest.raises(ConfigError, match="watermark column 'updated_at' is not a column"):
        run_ingest(wh, make_spec("watermark"), pg_dsn, "r1")
