"""Demo operational data in Postgres: customers, transactions, support tickets — with messiness.

    python -m opsloop.demodata seed --dsn postgresql://…/source --customers 5000
    python -m opsloop.demodata seed --dsn … --customers 1000000 --transactions 10000000   # load test size
    python -m opsloop.demodata advance --dsn postgresql://…/source        # "the next day"

``seed`` generates and COPYs ``chunk`` customers (with their transactions and tickets) at a time, so
memory stays flat at any size (≈ 100k customers + their ~3.4M default transactions per chunk).

Churn is learnable: the label depends on plan, tenure, MRR, support tickets in the last 90 days and
falling transaction activity, with noise (~10–20 % positives; NULL = unknown for new customers).
Messiness the gates should catch or the pipeline must survive: NULL e-mails/phones/countries/MRR,
transactions without a customer, negative amounts, unknown or lower-case currencies, duplicate
events (same customer, amount and time under another id), back-dated updates, deletes.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

DDL = """
CREATE TABLE IF NOT EXISTS customers (
  customer_id text PRIMARY KEY, email text, phone text, full_name text, country text,
  segment text, plan text, mrr numeric(12,2), signup_date date, churned boolean,
  churned_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS transactions (
  event_id text PRIMARY KEY, customer_id text, amount numeric(12,2), currency text,
  event_time timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS support_tickets (
  ticket_id text PRIMARY KEY, customer_id text, priority text, status text,
  opened_at timestamptz, closed_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS transactions_updated_at ON transactions (updated_at);
CREATE INDEX IF NOT EXISTS customers_updated_at ON customers (updated_at);
CREATE INDEX IF NOT EXISTS support_tickets_updated_at ON support_tickets (updated_at);
"""
TABLES = ("customers", "transactions", "support_tickets")
_FIRST = "anna ben clara david emma felix greta hugo ida jonas karl lea max nora otto paula quinn rosa sam tom una"
_LAST = "müller schmidt meyer wagner becker hoffmann koch richter klein wolf neumann schwarz braun lange krause"
FIRST, LAST = np.array(_FIRST.split(" ")), np.array(_LAST.split(" "))
COUNTRIES = np.array(["DE", "DE", "DE", "FR", "GB", "US", "NL", "ES", "IT", "PL", "SE"])
CURRENCY = {"GB": "GBP", "US": "USD"}
SEGMENTS, PLANS = np.array(["smb", "mid", "enterprise"]), np.array(["basic", "pro", "enterprise"])
PRIORITIES = np.array(["low", "normal", "high", "urgent"])
DAY_US = 86_400_000_000
SEED_CHUNK = 100_000  # customers generated and COPYed per step of seed()
TX_PER_CUSTOMER = 34.0  # transactions per customer at activity 1.0 (33.95 measured over 100k customers)


def _ts(now: datetime, us_ago: np.ndarray) -> pa.Array:
    base = int(now.timestamp() * 1_000_000)
    return pa.array(base - us_ago.astype(np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def _num(values: np.ndarray) -> pa.Array:
    return pa.array(np.round(values, 2)).cast(pa.decimal128(12, 2))


def _nullify(arr: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask, pa.bool_()), pa.scalar(None, arr.type), arr)


def _copy(conn: psycopg.Connection, table: str, data: pa.Table) -> None:
    buf = io.BytesIO()
    pcsv.write_csv(data, buf, pcsv.WriteOptions(include_header=False, quoting_style="needed"))
    cols = ", ".join(data.column_names)
    with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT csv)") as cp:
        cp.write(buf.getvalue())


@dataclass
class Customers:
    table: pa.Table
    churned: np.ndarray  # True / False (the generating truth, before NULL labels)
    churned_days: np.ndarray  # days before now (churners)
    rate: np.ndarray  # transactions per 30 days
    tickets90: np.ndarray
    tenure: np.ndarray


def make_customers(n: int, now: datetime, rng: np.random.Generator, start_id: int = 1) -> Customers:
    seg_i = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    plan_p = np.array([[0.6, 0.35, 0.05], [0.3, 0.5, 0.2], [0.05, 0.35, 0.6]])
    plan_i = np.array([rng.choice(3, p=plan_p[s]) for s in seg_i])
    tenure = rng.integers(20, 1500, n)
    mrr = np.array([49.0, 199.0, 999.0])[plan_i] * np.array([1.0, 1.5, 3.0])[seg_i] * rng.lognormal(0, 0.3, n)
    logit = (
        -2.3
        + 0.9 * (plan_i == 0)
        - 0.8 * (plan_i == 2)
        - 0.5 * np.log(tenure / 365)
        - 0.2 * np.log(mrr / 150)
        + rng.normal(0, 0.7, n)
    )
    churned = rng.random(n) < 1 / (1 + np.exp(-logit))
    tickets90 = rng.poisson(0.5 + 1.8 * churned + 0.3 * np.clip(logit + 1.5, 0, None))
    rate = np.array([2.0, 4.0, 7.0])[seg_i] * rng.lognormal(0, 0.3, n)
    churn_days = np.where(churned, rng.uniform(1, 60, n), 0.0)
    first, last = FIRST[rng.integers(0, len(FIRST), n)], LAST[rng.integers(0, len(LAST), n)]
    ids = np.arange(start_id, start_id + n)
    email = np.char.add(np.char.add(np.char.add(np.char.add(first, "."), last), ids.astype(str)), "@example.com")
    shouty = rng.random(n) < 0.01
    email = np.where(shouty, np.char.add(" ", np.char.upper(email)), email)
    phone = np.char.add("+49 170 ", rng.integers(1_000_000, 9_999_999, n).astype(str))
    label = pa.array(churned)
    unknown = (tenure < 60) | (rng.random(n) < 0.03)
    churned_at = _ts(now, (churn_days * DAY_US).astype(np.int64))
    t = pa.table(
        {
            "customer_id": [f"C{i:07d}" for i in ids],
            "email": _nullify(pa.array(email), rng.random(n) < 0.02),
            "phone": _nullify(pa.array(phone), rng.random(n) < 0.10),
            "full_name": np.char.add(np.char.add(np.char.capitalize(first), " "), np.char.capitalize(last)),
            "country": _nullify(pa.array(COUNTRIES[rng.integers(0, len(COUNTRIES), n)]), rng.random(n) < 0.01),
            "segment": SEGMENTS[seg_i],
            "plan": PLANS[plan_i],
            "mrr": _nullify(_num(mrr), rng.random(n) < 0.01),
            "signup_date": pa.array([now.date() - timedelta(days=int(d)) for d in tenure], pa.date32()),
            "churned": _nullify(label, unknown),
            "churned_at": _nullify(churned_at, ~churned | unknown),
            "updated_at": _ts(now, rng.integers(DAY_US // 24, 30 * DAY_US, n)),
        }
    )
    return Customers(t, churned, churn_days, rate, tickets90, tenure)


def make_transactions(
    c: Customers, now: datetime, rng: np.random.Generator, start_id: int = 1, activity: float = 1.0
) -> pa.Table:
    """Each customer's transactions over up to a year; ``activity`` scales every purchase rate."""
    ids = c.table.column("customer_id").to_numpy(zero_copy_only=False)
    countries = np.array([x or "DE" for x in c.table.column("country").to_pylist()])
    days = np.minimum(c.tenure, 365).astype(float)
    end = c.churned_days  # days ago the activity stops (0 = still active)
    counts = rng.poisson(c.rate * activity * (days - end).clip(0) / 30)
    owner = np.repeat(np.arange(len(ids)), counts)
    ago = end[owner] + rng.random(len(owner)) * (days - end)[owner]
    # churners fade: most of their activity in the 90 days before churn disappears (with noise)
    fading = c.churned[owner] & (ago - end[owner] < 90) & (rng.random(len(owner)) < 0.7)
    fading |= ~c.churned[owner] & (ago < 90) & (rng.random(len(owner)) < 0.05)
    owner, ago = owner[~fading], ago[~fading]
    n = len(owner)
    amount = rng.lognormal(3.5, 0.8, n) * np.where(rng.random(n) < 0.01, -1, 1)  # 1 % refunds (negative)
    currency = np.array([CURRENCY.get(x, "EUR") for x in countries[owner]])
    odd = rng.random(n)
    currency = np.where(odd < 0.003, "usd", np.where(odd > 0.998, "CHF", currency))
    event_us = (ago * DAY_US).astype(np.int64)
    delay = rng.integers(1_000_000, 30 * 60_000_000, n)  # recorded 1 s – 30 min after the event
    late = rng.random(n) < 0.005  # back-dated corrections, days later
    delay = np.where(late, rng.integers(DAY_US, 10 * DAY_US, n), delay)
    upd_us = np.maximum(event_us - delay, 0)
    cust = pa.array(ids[owner])
    t = pa.table(
        {
            "event_id": [f"E{i:09d}" for i in range(start_id, start_id + n)],
            "customer_id": _nullify(cust, rng.random(n) < 0.003),
            "amount": _num(amount),
            "currency": currency,
            "event_time": _ts(now, event_us),
            "updated_at": _ts(now, upd_us),
        }
    )
    dup = np.flatnonzero(rng.random(n) < 0.01)  # the same event submitted twice under a new id
    if len(dup):
        extra = t.take(pa.array(dup))
        more = range(start_id + n, start_id + n + len(dup))
        extra = extra.set_column(0, "event_id", pa.array([f"E{i:09d}" for i in more]))
        t = pa.concat_tables([t, extra])
    return t


def make_tickets(c: Customers, now: datetime, rng: np.random.Generator, start_id: int = 1) -> pa.Table:
    ids = c.table.column("customer_id").to_numpy(zero_copy_only=False)
    recent_owner = np.repeat(np.arange(len(ids)), c.tickets90)
    old_owner = np.repeat(np.arange(len(ids)), rng.poisson(1.0, len(ids)))
    owner = np.concatenate([recent_owner, old_owner])
    ago = np.concatenate([c.churned_days[recent_owner] + rng.uniform(0, 90, len(recent_owner)),
                          rng.uniform(90, 365, len(old_owner))])  # fmt: skip
    n = len(owner)
    p_hot = np.where(c.churned[owner][:, None], [0.15, 0.35, 0.3, 0.2], [0.35, 0.45, 0.15, 0.05])
    prio = PRIORITIES[(rng.random((n, 1)) > np.cumsum(p_hot, axis=1)).sum(axis=1).clip(0, 3)]
    closed = (ago > 14) & (rng.random(n) < 0.95) | (ago <= 14) & (rng.random(n) < 0.5)
    open_us = (ago * DAY_US).astype(np.int64)
    close_us = np.maximum(open_us - rng.integers(3_600_000_000, 10 * DAY_US, n), 0)
    return pa.table(
        {
            "ticket_id": [f"T{i:08d}" for i in range(start_id, start_id + n)],
            "customer_id": _nullify(pa.array(ids[owner]), rng.random(n) < 0.002),
            "priority": prio,
            "status": np.where(closed, "closed", "open"),
            "opened_at": _ts(now, open_us),
            "closed_at": _nullify(_ts(now, close_us), ~closed),
            "updated_at": _ts(now, np.where(closed, close_us, open_us)),
        }
    )


def seed(
    dsn: str,
    customers: int = 5000,
    seed: int = 7,
    now: datetime | None = None,
    drop: bool = True,
    transactions: int | None = None,
    chunk: int = SEED_CHUNK,
    progress: Callable[[dict[str, int]], None] | None = None,
) -> dict[str, int]:
    """Create the three tables and fill them, ``chunk`` customers at a time (one transaction);
    returns the row counts.

    ``transactions`` aims the transaction count at this total (±0.5 %) by scaling every customer's
    purchase rate; default ≈ 34 per customer. With one chunk (``customers ≤ chunk``) and no target,
    the rows are exactly those of earlier versions for the same seed.
    """
    now = now or datetime.now(UTC)
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(TABLES, 0)
    activity = 1.0 if transactions is None else transactions / customers / TX_PER_CUSTOMER
    with psycopg.connect(dsn, autocommit=True) as conn:
        if drop:
            conn.execute("DROP TABLE IF EXISTS " + ", ".join(TABLES))
        conn.execute(DDL)
        with conn.transaction():
            done, units = 0, 0.0  # units: Σ customers × activity (to learn transactions per unit)
            while done < customers:
                n = min(max(chunk, 1), customers - done)
                c = make_customers(n, now, rng, start_id=done + 1)
                tx = make_transactions(c, now, rng, counts["transactions"] + 1, activity)
                tickets = make_tickets(c, now, rng, counts["support_tickets"] + 1)
                for table, data in (("customers", c.table), ("transactions", tx), ("support_tickets", tickets)):
                    _copy(conn, table, data)
                    counts[table] += data.num_rows
                done, units = done + n, units + n * activity
                if transactions is not None and done < customers:  # aim the rest at the target
                    per_unit = counts["transactions"] / units if units > 0 else TX_PER_CUSTOMER
                    left = max(transactions - counts["transactions"], 0)
                    activity = left / (customers - done) / max(per_unit, 1e-9)
                if progress is not None:
                    progress(dict(counts))
    return counts


def _next_id(conn: psycopg.Connection, table: str, column: str) -> int:
    row = conn.execute(f"SELECT COALESCE(max(substr({column}, 2)::bigint), 0) + 1 FROM {table}").fetchone()
    return int(row[0]) if row else 1


def advance(dsn: str, seed: int | None = None, now: datetime | None = None) -> dict[str, int]:
    """One "next day" of changes: new customers, transactions and tickets, plan/MRR changes, churn
    labels, ticket closures, a few back-dated corrections and deletes. Returns what changed."""
    now = now or datetime.now(UTC)
    rng = np.random.default_rng(seed if seed is not None else int(now.timestamp()))
    out: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        active = [r[0] for r in conn.execute("SELECT customer_id FROM customers WHERE churned IS NOT TRUE").fetchall()]
        new_c = make_customers(max(len(active) // 250, 3), now, rng, _next_id(conn, "customers", "customer_id"))
        fresh = new_c.table.set_column(new_c.table.schema.get_field_index("churned"), "churned",
                                       pa.nulls(new_c.table.num_rows, pa.bool_()))  # fmt: skip
        fresh = fresh.set_column(fresh.schema.get_field_index("churned_at"), "churned_at",
                                 pa.nulls(fresh.num_rows, pa.timestamp("us", tz="UTC")))  # fmt: skip
        _copy(conn, "customers", fresh)
        out["customers_new"] = fresh.num_rows
        # today's transactions of active customers, recorded within minutes
        buyers = rng.choice(active, size=max(len(active) // 8, 5))
        n = len(buyers)
        ago = rng.integers(10 * 60_000_000, 20 * 3_600_000_000, n)
        late = rng.random(n) < 0.005  # a few arrive days late
        ago = np.where(late, rng.integers(DAY_US, 3 * DAY_US, n), ago)
        start = _next_id(conn, "transactions", "event_id")
        tx = pa.table(
            {
                "event_id": [f"E{i:09d}" for i in range(start, start + n)],
                "customer_id": buyers,
                "amount": _num(rng.lognormal(3.5, 0.8, n) * np.where(rng.random(n) < 0.005, -1, 1)),
                "currency": np.where(rng.random(n) < 0.8, "EUR", "USD"),
                "event_time": _ts(now, ago),
                "updated_at": _ts(now, np.where(late, 0, np.maximum(ago - rng.integers(1_000_000, 600_000_000, n), 0))),
            }
        )
        _copy(conn, "transactions", tx)
        out["transactions_new"] = n
        pick = list(rng.choice(active, size=max(len(active) // 50, 2), replace=False))
        cur = conn.execute(
            "UPDATE customers SET plan = CASE WHEN plan = 'basic' THEN 'pro' ELSE 'basic' END, "
            "mrr = round(mrr * (0.8 + random() * 0.5)::numeric, 2), updated_at = now() WHERE customer_id = ANY(%s)",
            (pick,),
        )
        out["customers_updated"] = cur.rowcount
        churn = list(rng.choice(active, size=max(len(active) // 400, 1), replace=False))
        cur = conn.execute(
            "UPDATE customers SET churned = true, churned_at = now() - interval '3 hours', updated_at = now() "
            "WHERE customer_id = ANY(%s)",
            (churn,),
        )
        out["customers_churned"] = cur.rowcount
        # rows picked by a hash salted from the seed (not Postgres' random()): one seed, one set of changes
        salt = str(int(rng.integers(0, 2**31)))
        cur = conn.execute(
            "UPDATE support_tickets SET status = 'closed', closed_at = now(), updated_at = now() "
            "WHERE status = 'open' AND substr(md5(ticket_id || %s), 1, 8) < '4ccccccd'",  # ≈ 30 %
            (salt,),
        )
        out["tickets_closed"] = cur.rowcount
        k = max(n // 250, 1)  # back-dated corrections (the max_age gate quarantines them) and deletes
        old = [
            r[0]
            for r in conn.execute(
                "SELECT event_id FROM transactions ORDER BY md5(event_id || %s), event_id LIMIT %s", (salt, 2 * k)
            )
        ]
        cur = conn.execute(
            "UPDATE transactions SET amount = round(amount * 1.1, 2), updated_at = now() WHERE event_id = ANY(%s)",
            (old[:k],),
        )
        out["transactions_corrected"] = cur.rowcount
        cur = conn.execute("DELETE FROM transactions WHERE event_id = ANY(%s)", (old[k:],))
        out["transactions_deleted"] = cur.rowcount
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m opsloop.demodata", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seed", help="(re)create the demo tables and fill them")
    s.add_argument("--dsn", required=True)
    s.add_argument("--customers", type=int, default=5000)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--transactions", type=int, default=None, help="aim for this many transactions in total")
    s.add_argument("--keep", action="store_true", help="do not drop existing tables first")
    a = sub.add_parser("advance", help="apply one day of changes")
    a.add_argument("--dsn", required=True)
    a.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "seed":
        print(seed(args.dsn, args.customers, args.seed, drop=not args.keep, transactions=args.transactions))
    else:
        print(advance(args.dsn, args.seed))


if __name__ == "__main__":
    main()
