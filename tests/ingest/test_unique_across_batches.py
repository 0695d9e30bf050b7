"""The ``unique`` quality rule across the batches of one load: exact answers from 16-byte digests."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsloop.spec import QualityCheck
from opsloop.transform.quality import QualityGate
from opsloop.transform.seen import SeenKeys

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def _gate() -> QualityGate:
    return QualityGate([QualityCheck.model_validate({"column": "event_id", "rule": "unique"})], "transactions", NOW)


def _batch(ids: list[str | None]) -> pa.Table:
    return pa.table({"event_id": pa.array(ids, pa.string()), "amount": pa.array(range(len(ids)), pa.int64())})


def test_repeats_within_and_across_batches_are_quarantined_and_nothing_else() -> None:
    gate = _gate()
    ok1, bad1 = gate.split(_batch(["E1", "E2", "E2", None, "E3"]))
    ok2, bad2 = gate.split(_batch(["E4", "E1", None, "E5", "E3", "E4"]))
    ok3, bad3 = gate.split(_batch([f"E{i}" for i in range(6, 5006)]))  # 5,000 new keys: no false repeats
    assert ok1.column("event_id").to_pylist() == ["E1", "E2", None, "E3"]
    assert bad1 is not None and bad1.column("event_id").to_pylist() == ["E2"]
    assert ok2.column("event_id").to_pylist() == ["E4", None, "E5"]
    assert bad2 is not None and sorted(bad2.column("event_id").to_pylist()) == ["E1", "E3", "E4"]
    assert "repeats" in bad2.column("_q_reason")[0].as_py()
    assert ok3.num_rows == 5000 and bad3 is None
    assert gate.by_rule["unique:event_id"] == 4


def test_seen_keys_are_exact_and_small_for_many_keys() -> None:
    seen = SeenKeys()
    n, batch = 300_000, 20_000
    keys = pa.array([f"E{i:09d}" for i in range(n)])
    for start in range(0, n, batch):
        part = keys.slice(start, batch)
        d = seen.digests(part)
        assert not seen.contains(d).any()  # every key is new
        seen.add(d)
    assert len(seen) == n and seen.nbytes == 16 * n  # 16 bytes a key, whatever the key
    again = seen.digests(pc.take(keys, pa.array(np.arange(0, n, 7))))
    assert seen.contains(again).all()
    fresh = seen.digests(pa.array([f"E{i:09d}" for i in range(n, n + 50_000)]))
    assert not seen.contains(fresh).any()
    ints = SeenKeys()
    ints.add(ints.digests(pa.array([1, 2, 3], pa.int64())))
    collide = SeenKeys()  # two keys whose first hash is equal: the second hash tells them apart
    collide.add((np.array([5, 5, 9], np.uint64), np.array([1, 2, 3], np.uint64)))
    probe = (np.array([5, 5, 5, 9], np.uint64), np.array([2, 1, 7, 3], np.uint64))
    assert collide.contains(probe).tolist() == [True, True, False, True]
    assert ints.contains(ints.digests(pa.array([3, 4], pa.int64()))).tolist() == [True, False]
