"""The demo generator at scale: seeded chunk by chunk (flat memory), aimed at a transaction count,
ids unique and consecutive across chunks, and one chunk = the rows earlier versions produced."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import psycopg

from opsloop import demodata

NOW = datetime(2026, 11, 1, 6, 0, tzinfo=UTC)


def _ids(dsn: str, table: str, column: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT {column} FROM {table} ORDER BY {column}")]


def test_seed_in_chunks_hits_the_transaction_target(pg_dsn: str) -> None:
    steps: list[dict[str, int]] = []
    counts = demodata.seed(pg_dsn, 2500, seed=3, now=NOW, transactions=20_000, chunk=1000, progress=steps.append)
    assert [s["customers"] for s in steps] == [1000, 2000, 2500]
    assert abs(counts["transactions"] - 20_000) <= 0.03 * 20_000, counts
    customers = _ids(pg_dsn, "customers", "customer_id")
    assert customers == [f"C{i:07d}" for i in range(1, 2501)]
    events = _ids(pg_dsn, "transactions", "event_id")
    assert len(events) == counts["transactions"] and events == [f"E{i:09d}" for i in range(1, len(events) + 1)]
    tickets = _ids(pg_dsn, "support_tickets", "ticket_id")
    assert tickets == [f"T{i:08d}" for i in range(1, counts["support_tickets"] + 1)]
    with psycopg.connect(pg_dsn) as conn:  # every transaction of a later chunk belongs to that chunk's customers
        row = conn.execute(
            "SELECT count(*) FROM transactions t LEFT JOIN customers c USING (customer_id) "
            "WHERE t.customer_id IS NOT NULL AND c.customer_id IS NULL"
        ).fetchone()
    assert row is not None and row[0] == 0


def test_one_chunk_keeps_the_rows_of_the_unchunked_generator(pg_dsn: str) -> None:
    counts = demodata.seed(pg_dsn, 800, seed=9, now=NOW)
    rng = np.random.default_rng(9)
    c = demodata.make_customers(800, NOW, rng)
    tx = demodata.make_transactions(c, NOW, rng)
    tickets = demodata.make_tickets(c, NOW, rng)
    assert counts == {"customers": 800, "transactions": tx.num_rows, "support_tickets": tickets.num_rows}
    with psycopg.connect(pg_dsn) as conn:
        got = conn.execute("SELECT amount::text FROM transactions ORDER BY event_id").fetchall()
    assert [r[0] for r in got] == [str(v) for v in tx.column("amount").to_pylist()]
