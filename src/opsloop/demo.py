"""A small generated customer dataset for the first nightly run (before real sources are wired)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

DEMO_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("segment", pa.string()),
        ("mrr", pa.float64()),
        ("tickets_30d", pa.int64()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


def demo_customers(n: int, round_no: int, seed: int = 7) -> pa.Table:
    """Round 0: ``n`` customers. Round k > 0: 10% of them changed (newer updated_at) and 5% new ones."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    segments = np.array(["smb", "mid", "enterprise"])[rng.integers(0, 3, n)]
    mrr = rng.gamma(2.0, 150.0, n).round(2)
    tickets = rng.poisson(1.5, n)
    stamp = np.full(n, base, dtype=object)
    if round_no > 0:
        rng2 = np.random.default_rng(seed + round_no)
        changed = rng2.random(n) < 0.10
        mrr = np.where(changed, (mrr * rng2.uniform(0.5, 1.5, n)).round(2), mrr)
        tickets = np.where(changed, tickets + rng2.integers(1, 5, n), tickets)
        stamp = np.where(changed, base + timedelta(days=round_no), stamp)  # type: ignore[call-overload]
        ids = ids[changed]
        extra = np.arange(n, n + n // 20)
        sel = changed
        return pa.Table.from_pydict(
            {
                "customer_id": [f"C{i:07d}" for i in np.concatenate([ids, extra])],
                "segment": np.concatenate([segments[sel], np.full(len(extra), "smb")]).tolist(),
                "mrr": np.concatenate([mrr[sel], np.full(len(extra), 99.0)]).tolist(),
                "tickets_30d": np.concatenate([tickets[sel], np.zeros(len(extra), dtype=int)]).tolist(),
                "updated_at": [*stamp[sel].tolist(), *[base + timedelta(days=round_no)] * len(extra)],
            },
            schema=DEMO_SCHEMA,
        )
    return pa.Table.from_pydict(
        {
            "customer_id": [f"C{i:07d}" for i in ids],
            "segment": segments.tolist(),
            "mrr": mrr.tolist(),
            "tickets_30d": tickets.tolist(),
            "updated_at": stamp.tolist(),
        },
        schema=DEMO_SCHEMA,
    )
