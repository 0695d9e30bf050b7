"""Bad rows and schema changes from a real PostgreSQL source (CDC through a pgoutput slot, or
watermark reads) into DuckDB: quarantine with reasons, the gate before MERGE, schema drift under
each policy, 1 MB values, non-UTF-8 text, far-future stamps, an emptied source, a dropped slot."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime

import psycopg
import pytest

from opsloop.devstack.postgres import PgCluster
from opsloop.errors import QualityGateError, TerminalError
from opsloop.transform.quality import SchemaDriftError
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.bad_inputs.conftest import TX_DDL, count, exec_sql, ingest_pg, pg_spec, quarantine

TX = "ops.transactions"
GOOD = "INSERT INTO transactions (event_id, customer_id, amount, currency, qty, note) SELECT 'E' || g, 'C' || g, g, 'EUR', g, 'n' || g FROM generate_series(1, {n}) g"  # noqa: E501
BAD_ROWS = (
    "INSERT INTO transactions (event_id, customer_id, amount, currency, qty) VALUES "
    "('N1', 'C1', -5, 'EUR', 1), ('N2', NULL, 7, 'EUR', 1), ('N3', 'C3', 8, 'CHF', 1), "
    "('N4', 'C4', 9, 'USD', 1), ('N5', 'C5', 10, 'GBP', 1)"
)
REASONS = [  # ordered by reason
    ("min", "amount", "amount = -5.000000000 is below min 0", "N1"),
    ("accepted_values", "currency", "currency = CHF is not one of [EUR, USD, GBP]", "N3"),
    ("not_null", "customer_id", "customer_id is NULL", "N2"),
]


def _slot(dsn: str, slot: str) -> str | None:
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        found = row.fetchone()
    return str(found[0]) if found else None


def _keys(wh: DuckDBAdapter) -> list[str]:
    return [r["event_id"] for r in wh.query(f"SELECT event_id FROM {TX} ORDER BY event_id").to_pylist()]


def test_negative_amount_null_customer_and_unknown_currency_are_quarantined(pg_dsn, wh, slots) -> None:
    """BI-10: the shipped spec's transaction rules on CDC changes: each bad row lands in _quarantine with
    rule, column and reason; read = merged + quarantined."""
    exec_sql(pg_dsn, TX_DDL, GOOD.format(n=20))
    spec = pg_spec("cdc", max_share=0.9)
    slots.append(spec.cdc.slot_name)
    assert ingest_pg(wh, spec, pg_dsn, "r1")["inserted"] == 20
    exec_sql(pg_dsn, BAD_ROWS)
    out = ingest_pg(wh, spec, pg_dsn, "r2")
    assert (out["rows_read"], out["inserted"], out["rows_quarantined"]) == (5, 2, 3)
    got = [(r["rule"], r["column_name"], r["reason"], json.loads(r["row_json"])["event_id"]) for r in quarantine(wh)]
    assert got == REASONS
    assert count(wh, TX) == 22 and {"N4", "N5"} <= set(_keys(wh)) and not {"N1", "N2", "N3"} & set(_keys(wh))


def test_gate_above_max_share_merges_nothing_and_the_fixed_rerun_converges(pg_dsn, wh, slots) -> None:
    """BI-11: 3 of 5 changed rows fail → QualityGateError naming the rules before MERGE; neither the
    target, the committed LSN nor the slot moved. Fixing the rows at the source and rerunning lands all."""
    exec_sql(pg_dsn, TX_DDL, GOOD.format(n=20))
    spec = pg_spec("cdc", max_share=0.2)
    slots.append(spec.cdc.slot_name)
    ingest_pg(wh, spec, pg_dsn, "r1")
    state, slot = wh.get_state("bi", "pg.transactions"), _slot(pg_dsn, spec.cdc.slot_name)
    exec_sql(pg_dsn, BAD_ROWS)
    with pytest.raises(QualityGateError) as err:
        ingest_pg(wh, spec, pg_dsn, "r2")
    assert str(err.value) == (
        "ops.transactions: 3 of 5 rows (60.0%) failed quality checks, above quarantine.maxShare 20.0% — nothing was "
        "merged. Failing rules: min:amount: 1 row(s), not_null:customer_id: 1 row(s), "
        "accepted_values:currency: 1 row(s). The rows are in _quarantine with their reasons."
    )
    assert count(wh, TX) == 20 and wh.get_state("bi", "pg.transactions")["cursor"] == state["cursor"]
    assert _slot(pg_dsn, spec.cdc.slot_name) == slot and len(quarantine(wh, "r2")) == 3
    exec_sql(
        pg_dsn,
        "UPDATE transactions SET amount = 5, customer_id = COALESCE(customer_id, 'C2'), currency = 'EUR', "
        "updated_at = now() WHERE event_id IN ('N1', 'N2', 'N3')",
    )
    out = ingest_pg(wh, spec, pg_dsn, "r3")  # replays the inserts, the updates supersede them
    assert (out["rows_quarantined"], out["inserted"], count(wh, TX)) == (0, 5, 25)


@pytest.mark.parametrize("policy", ["evolve", "freeze"])
def test_new_source_column(pg_dsn, wh, slots, policy) -> None:
    """BI-12: ALTER TABLE ADD COLUMN between runs (CDC): ``evolve`` adds the column (old rows NULL) and
    says so; ``freeze`` stops naming the column with nothing merged and the slot kept, and a rerun
    with ``evolve`` (same slot) converges."""
    exec_sql(pg_dsn, TX_DDL, GOOD.format(n=3))
    spec = pg_spec("cdc", schema_policy={"onNewColumn": policy})
    slots.append(spec.cdc.slot_name)
    ingest_pg(wh, spec, pg_dsn, "r1")
    exec_sql(
        pg_dsn,
        "ALTER TABLE transactions ADD COLUMN channel text",
        "INSERT INTO transactions (event_id, customer_id, amount, currency, channel) "
        "VALUES ('E9', 'C9', 9, 'EUR', 'web')",
        "UPDATE transactions SET amount = 11, updated_at = now() WHERE event_id = 'E1'",
    )
    if policy == "freeze":
        slot = _slot(pg_dsn, spec.cdc.slot_name)
        with pytest.raises(SchemaDriftError) as err:
            ingest_pg(wh, spec, pg_dsn, "r2")
        assert str(err.value) == (
            "ops.transactions: the source schema changed and transform.schemaPolicy freezes it: "
            "unexpected new column 'channel' (STRING)"
        )
        assert count(wh, TX) == 3 and _slot(pg_dsn, spec.cdc.slot_name) == slot
        spec = pg_spec("cdc", slot=spec.cdc.slot_name)  # the operator accepts the column
    out = ingest_pg(wh, spec, pg_dsn, "r3")
    assert "new column channel added to the target" in out["streams"]["transactions"]["flags"]
    assert (out["inserted"], out["updated"]) == (1, 1)
    got = wh.query(f"SELECT event_id, amount, channel FROM {TX} ORDER BY event_id").to_pylist()
    assert [(r["event_id"], float(r["amount"]), r["channel"]) for r in got] == [
        ("E1", 11.0, None),
        ("E2", 2.0, None),
        ("E3", 3.0, None),
        ("E9", 9.0, "web"),
    ]


@pytest.mark.parametrize("policy", ["evolve", "freeze"])
def test_removed_source_column(pg_dsn, wh, policy) -> None:
    """BI-13: ALTER TABLE DROP COLUMN (watermark reads): ``evolve`` loads it as NULL for changed rows
    (unchanged rows keep their value) and says so; ``freeze`` names the missing column."""
    exec_sql(pg_dsn, TX_DDL, GOOD.format(n=3))
    spec = pg_spec("watermark", schema_policy={"onMissingColumn": policy})
    ingest_pg(wh, spec, pg_dsn, "r1")
    exec_sql(
        pg_dsn,
        "ALTER TABLE transactions DROP COLUMN note",
        "UPDATE transactions SET amount = 22, updated_at = now() + interval '1 second' WHERE event_id = 'E2'",
    )
    if policy == "freeze":
        with pytest.raises(SchemaDriftError, match=r"freezes it: column 'note' is missing from the source$"):
            ingest_pg(wh, spec, pg_dsn, "r2")
        assert [r["note"] for r in wh.query(f"SELECT note FROM {TX} ORDER BY event_id").to_pylist()] == [
            "n1",
            "n2",
            "n3",
        ]
        return
    out = ingest_pg(wh, spec, pg_dsn, "r2")
    assert "column note missing in the source; loaded as NULL" in out["streams"]["transactions"]["flags"]
    got = wh.query(f"SELECT event_id, amount, note FROM {TX} ORDER BY event_id").to_pylist()
    assert [(r["event_id"], float(r["amount"]), r["note"]) for r in got] == [
        ("E1", 1.0, "n1"),
        ("E2", 22.0, None),
        ("E3", 3.0, "n3"),
    ]


def test_changed_column_type(pg_dsn, wh, slots) -> None:
    """BI-14: ALTER COLUMN qty TYPE text (CDC): the default ``onTypeChange: freeze`` names the column and
    both types; ``evolve`` casts back to the target's INT64 when the values allow it."""
    exec_sql(pg_dsn, TX_DDL, GOOD.format(n=3))
    spec = pg_spec("cdc")
    slots.append(spec.cdc.slot_name)
    ingest_pg(wh, spec, pg_dsn, "r1")
    exec_sql(
        pg_dsn,
        "ALTER TABLE transactions ALTER COLUMN qty TYPE text",
        "UPDATE transactions SET qty = '42', updated_at = now() WHERE event_id = 'E1'",
    )
    with pytest.raises(SchemaDriftError) as err:
        ingest_pg(wh, spec, pg_dsn, "r2")
    assert str(err.value).endswith("freezes it: column 'qty' changed type INT64 → STRING")
    evolve = pg_spec("cdc", schema_policy={"onTypeChange": "evolve"}, slot=spec.cdc.slot_name)
    out = ingest_pg(wh, evolve, pg_dsn, "r3")
    assert "column qty arrives as STRING, cast to the target's INT64" in out["streams"]["transactions"]["flags"]
    assert wh.query(f"SELECT qty FROM {TX} WHERE event_id = 'E1'").to_pylist() == [{"qty": 42}]


def test_one_megabyte_text_values_land_intact(pg_dsn, wh, slots) -> None:
    """BI-15: 1 MiB text values through the snapshot COPY and the CDC stream land byte for byte; a
    1 MiB row that fails a rule is quarantined with a short reason (the value is cut at 80 chars)."""
    mib = "repeat(md5(g::text), 32768)"  # 32 hex chars × 32768 = 1 MiB per value
    exec_sql(
        pg_dsn,
        TX_DDL,
        f"INSERT INTO transactions (event_id, customer_id, amount, currency, note) "
        f"SELECT 'E' || g, 'C' || g, g, 'EUR', {mib} FROM generate_series(1, 3) g",
    )
    spec = pg_spec("cdc", checks=[{"column": "note", "rule": "regex", "value": "^[0-9a-f]*$"}], max_share=0.9)
    slots.append(spec.cdc.slot_name)
    ingest_pg(wh, spec, pg_dsn, "r1")
    exec_sql(
        pg_dsn,
        f"INSERT INTO transactions (event_id, customer_id, amount, currency, note) "
        f"SELECT 'S' || g, 'C' || g, g, 'EUR', {mib} FROM generate_series(4, 5) g",
        "INSERT INTO transactions (event_id, customer_id, amount, currency, note) "
        "VALUES ('X1', 'C9', 1, 'EUR', repeat('Z', 1048576))",
    )
    out = ingest_pg(wh, spec, pg_dsn, "r2")
    assert (out["inserted"], out["rows_quarantined"]) == (2, 1)
    with psycopg.connect(pg_dsn) as c:
        src = dict(c.execute("SELECT event_id, md5(note) FROM transactions WHERE event_id <> 'X1'").fetchall())
    got = wh.query(f"SELECT event_id, note FROM {TX}").to_pylist()
    assert {r["event_id"]: hashlib.md5(r["note"].encode()).hexdigest() for r in got} == src
    assert {len(r["note"]) for r in got} == {1 << 20}
    (q,) = quarantine(wh)
    assert q["reason"] == f"note = {'Z' * 77}... does not match regex ^[0-9a-f]*$"
    assert len(json.loads(q["row_json"])["note"]) == 1 << 20  # the whole row is kept for repair


def _database(cluster: PgCluster, encoding: str) -> str:
    name = f"enc_{uuid.uuid4().hex[:8]}"
    exec_sql(
        cluster.dsn(), f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )
    return cluster.dsn(name)


def test_latin1_source_lands_as_utf8(pg_cluster, wh, slots) -> None:
    """BI-16a: a LATIN1 database: the connection asks the server for UTF-8, so 'Müller' lands as UTF-8
    through COPY and the CDC stream (COPY used to hand Latin-1 bytes to the UTF-8 CSV reader)."""
    dsn = _database(pg_cluster, "LATIN1")
    exec_sql(
        dsn,
        TX_DDL,
        "INSERT INTO transactions (event_id, customer_id, amount, currency, note) "
        "VALUES ('E1', 'C1', 1, 'EUR', 'Müller')",
    )
    spec = pg_spec("cdc")
    slots.append(spec.cdc.slot_name)
    ingest_pg(wh, spec, dsn, "r1")
    exec_sql(
        dsn,
        "INSERT INTO transactions (event_id, customer_id, amount, currency, note) "
        "VALUES ('E2', 'C2', 2, 'EUR', 'Gruß')",
    )
    ingest_pg(wh, spec, dsn, "r2")
    got = wh.query(f"SELECT event_id, note FROM {TX} ORDER BY event_id").to_pylist()
    assert [r["note"] for r in got] == ["Müller", "Gruß"]


@pytest.mark.parametrize("strategy", ["watermark", "cdc"])
def test_invalid_utf8_in_a_sql_ascii_source_names_the_table(pg_cluster, wh, slots, strategy) -> None:
    """BI-16b: a SQL_ASCII database holding a raw 0xFC byte: the read fails naming the table and the
    byte (it used to fail with ``wal_level is b'logical'`` / ``primaryKey column(s) do not exist``)."""
    dsn = _database(pg_cluster, "SQL_ASCII")
    exec_sql(
        dsn,
        TX_DDL,
        "INSERT INTO transactions (event_id, customer_id, amount, currency, note) "
        "VALUES ('E1', 'C1', 1, 'EUR', 'ok'), ('E2', 'C2', 2, 'EUR', E'M\\374ller')",
    )
    spec = pg_spec(strategy)
    slots.append(spec.cdc.slot_name)
    copy = "snapshot COPY" if strategy == "cdc" else "COPY"
    with pytest.raises(TerminalError) as err:
        ingest_pg(wh, spec, dsn, "r1")
    assert str(err.value) == (
        f'Postgres {copy} of public.transactions failed: ERROR:  invalid byte sequence for encoding "UTF8": 0xfc'
    )
    assert count(wh, TX) == 0


def test_far_future_updated_at_does_not_stop_later_reads(pg_dsn, wh) -> None:
    """BI-17: a row with updated_at in 2999 (watermark reads): it lands, the committed watermark is the
    extract time (with a warning), and a change made afterwards is still read."""
    exec_sql(
        pg_dsn, TX_DDL, GOOD.format(n=2), "UPDATE transactions SET updated_at = '2999-01-01' WHERE event_id = 'E2'"
    )
    spec = pg_spec("watermark")
    first = ingest_pg(wh, spec, pg_dsn, "r1")
    assert first["inserted"] == 2 and len(first["warnings"]) == 1
    assert first["warnings"][0].startswith("transactions: watermark: newest value 2999-01-01T00:00:00+00:00 is in the")
    assert wh.get_state("bi", "pg.transactions")["watermark"] <= datetime.now(UTC)
    exec_sql(
        pg_dsn, "UPDATE transactions SET amount = 77, updated_at = now() + interval '2 seconds' WHERE event_id = 'E1'"
    )
    second = ingest_pg(wh, spec, pg_dsn, "r2")
    assert second["updated"] == 1
    assert wh.query(f"SELECT amount FROM {TX} WHERE event_id = 'E1'").to_pylist()[0]["amount"] == 77


def test_emptied_source_never_empties_the_target(pg_dsn, wh, slots) -> None:
    """BI-18: every source row deleted: the watermark key scan skips deletes with a warning, and a CDC
    re-snapshot (full_refresh) of the empty table fails instead of dropping the target's rows."""
    exec_sql(pg_dsn, TX_DDL, GOOD.format(n=4))
    spec = pg_spec("watermark")
    ingest_pg(wh, spec, pg_dsn, "r1")
    exec_sql(pg_dsn, "DELETE FROM transactions")
    out = ingest_pg(wh, spec, pg_dsn, "r2")
    assert (out["rows_read"], out["deleted"], count(wh, TX)) == (0, 0, 4)
    assert out["warnings"] == [
        "transactions: key scan returned no keys: deletes skipped (an empty source never empties the target)"
    ]
    cdc = pg_spec("cdc")
    slots.append(cdc.cdc.slot_name)
    with pytest.raises(
        TerminalError,
        match=r"^ops.transactions: the snapshot of pg.transactions read 0 rows, so the "
        r"table's 4 row\(s\) were kept",
    ):
        ingest_pg(wh, cdc, pg_dsn, "r3", full_refresh=True)
    assert count(wh, TX) == 4


def test_dropped_or_moved_slot_fails_clearly_and_full_refresh_recovers(pg_dsn, wh, slots) -> None:
    """BI-19: the slot was dropped → error naming it and asking for full_refresh; someone recreated it
    (now past the committed LSN) → error saying changes are lost; full_refresh re-snapshots exactly."""
    exec_sql(pg_dsn, TX_DDL, GOOD.format(n=5))
    spec = pg_spec("cdc")
    slot = str(spec.cdc.slot_name)
    slots.append(slot)
    ingest_pg(wh, spec, pg_dsn, "r1")
    committed = wh.get_state("bi", "pg.transactions")["cursor"]
    exec_sql(pg_dsn, f"SELECT pg_drop_replication_slot('{slot}')", "DELETE FROM transactions WHERE event_id = 'E1'")
    with pytest.raises(TerminalError) as err:
        ingest_pg(wh, spec, pg_dsn, "r2")
    assert str(err.value) == (
        f"replication slot {slot!r} no longer exists (dropped?); the changes after LSN {committed} committed in the "
        "warehouse cannot be replayed. A full resync is needed: rerun ingest with full_refresh=True"
    )
    exec_sql(pg_dsn, f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
    with pytest.raises(
        TerminalError,
        match=rf"^replication slot {slot!r} is at .*, past the position the warehouse "
        rf"committed \({committed}\): changes in between are lost",
    ):
        ingest_pg(wh, spec, pg_dsn, "r3")
    assert count(wh, TX) == 5  # nothing half-applied
    out = ingest_pg(wh, spec, pg_dsn, "r4", full_refresh=True)
    assert out["streams"]["transactions"]["kind"] == "snapshot" and _keys(wh) == ["E2", "E3", "E4", "E5"]
    exec_sql(pg_dsn, "UPDATE transactions SET amount = 50, updated_at = now() WHERE event_id = 'E5'")
    assert ingest_pg(wh, spec, pg_dsn, "r5")["updated"] == 1  # streaming again from the new slot
