"""BigQuery-only behaviours, run through the real client on local-bigquery 0.3.2: partitioned and
clustered tables, the MERGE pruned to the staging partition range, the resumed load (a real 409
from the server), idempotent appends, Storage Read API batches and error translation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from opsloop.errors import TerminalError
from opsloop.warehouse.base import MergeSpec, TableRef, TableSchema
from opsloop.warehouse.bigquery import BigQueryAdapter
from opsloop.warehouse.write import staging_ref, write_merge

pytestmark = pytest.mark.slow

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SCHEMA = pa.schema([("id", pa.string()), ("n", pa.int64()), ("ts", pa.timestamp("us", tz="UTC"))])


def batch(items: list[tuple[str, int, int]]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "n": n, "ts": T0 + timedelta(days=d)} for i, n, d in items], schema=SCHEMA)


@pytest.fixture
def wh(bigquery_emulator_wh: BigQueryAdapter) -> BigQueryAdapter:
    return bigquery_emulator_wh


@pytest.fixture
def target() -> TableRef:
    return TableRef(f"b_{uuid.uuid4().hex[:8]}", "events")


def test_partitioned_merge_prunes_to_staging_range_and_keeps_other_partitions(wh, target) -> None:  # type: ignore[no-untyped-def]
    table_schema = TableSchema.from_arrow(SCHEMA, partition_by="ts", cluster_by=("id",))
    spec = MergeSpec(target, ("id", "n", "ts"), ("id",), partition_column="ts")  # update when a value differs
    first = [(f"k{d}", 1, d) for d in range(10)]  # one row in each of 10 daily partitions
    write_merge(wh, target, table_schema, SCHEMA, batch(first).to_batches(), spec, "p1")

    table = wh.client.get_table(wh.table_id(target))
    assert table.time_partitioning.field == "ts" and table.clustering_fields == ["id"]

    # updates for days 3..4 plus a new key on day 4; rows of the other days stay as they are
    wh.jobs.clear()
    second = [("k3", 2, 3), ("k4", 2, 4), ("new", 1, 4)]
    r = write_merge(wh, target, table_schema, SCHEMA, batch(second).to_batches(), spec, "p2")
    assert (r.inserted, r.updated, r.deleted) == (1, 2, 0)
    kinds = [j.kind for j in wh.jobs]
    assert kinds.index("merge_bounds") < kinds.index("merge")
    got = wh.query(f"SELECT id, n FROM {wh.quote(target)} ORDER BY id").to_pylist()
    assert {x["id"]: x["n"] for x in got} == {**{f"k{d}": 1 for d in range(10)}, "k3": 2, "k4": 2, "new": 1}


def test_retried_load_is_resumed_by_the_server_conflict(wh, target) -> None:  # type: ignore[no-untyped-def]
    stg = staging_ref(target)
    a = wh.load_staging(stg, batch([("a", 1, 0), ("b", 2, 0)]), SCHEMA, job_key="run-1")
    again = wh.with_labels(task="retry").load_staging(stg, batch([("a", 1, 0), ("b", 2, 0)]), SCHEMA, job_key="run-1")
    assert again.job_id == a.job_id and again.rows == a.rows == 2
    assert wh.query(f"SELECT count(*) AS c FROM {wh.quote(stg)}").column("c")[0].as_py() == 2
    table = wh.client.get_table(wh.table_id(stg))
    assert table.expires is not None and table.expires - datetime.now(UTC) > timedelta(hours=23)


def test_append_with_job_key_is_loaded_once(wh, target) -> None:  # type: ignore[no-untyped-def]
    rows = batch([("a", 1, 0), ("b", 2, 1)])
    first = wh.append(target, rows, job_key="ledger-run-9")
    second = wh.append(target, rows, job_key="ledger-run-9")
    assert first.job_id == second.job_id
    assert wh.query(f"SELECT count(*) AS c FROM {wh.quote(target)}").column("c")[0].as_py() == 2
    wh.append(target, rows)  # no key: a new job every time
    assert wh.query(f"SELECT count(*) AS c FROM {wh.quote(target)}").column("c")[0].as_py() == 4


def test_a_checked_append_reads_no_table_metadata(wh, target, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    wh.append(target, batch([("a", 1, 0)]))  # creates the table
    reads: list[str] = []
    get_table = wh.client.get_table

    def counted(ref, *a, **k):  # type: ignore[no-untyped-def]
        reads.append(str(ref))
        return get_table(ref, *a, **k)

    monkeypatch.setattr(wh.client, "get_table", counted)
    wh.append(target, batch([("b", 2, 0)]), checked=True)  # a sync-log flush: the push ensured the table
    assert reads == []
    wh.append(target, batch([("c", 3, 0)]))
    assert reads and all(r.endswith(".events") for r in reads)  # unchecked: the schema is read first
    assert wh.query(f"SELECT count(*) AS c FROM {wh.quote(target)}").column("c")[0].as_py() == 3


def test_read_batches_over_the_storage_api(wh, target) -> None:  # type: ignore[no-untyped-def]
    wh.append(target, batch([(f"r{i:04d}", i, i % 3) for i in range(2500)]))
    assert wh._storage() is not None  # the emulator's gRPC endpoint, not REST
    batches = list(wh.read_batches(f"SELECT id, n FROM {wh.quote(target)} WHERE n >= @lo", {"lo": 500}, batch_rows=700))
    assert sum(b.num_rows for b in batches) == 2000 and max(b.num_rows for b in batches) <= 700
    assert batches[0].schema.names == ["id", "n"]
    assert wh.jobs[-1].kind == "read" and wh.jobs[-1].rows == 2000


def test_bad_sql_is_terminal_and_names_the_query(wh, target) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TerminalError, match=r"query job \S+ \[SELECT \* FROM `[^`]+\.\w*b_[0-9a-f]+\.events`\]: 404"):
        wh.query(f"SELECT * FROM {wh.quote(target)}")  # the table was never created
    with pytest.raises(TerminalError, match=r"ddl job"):
        wh.execute("CREATE TABLE broken (", kind="ddl")
