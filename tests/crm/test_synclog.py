"""The sync log's flush on DuckDB: Arrow tables upserted straight into ``_sync_state`` / ``_sync_retry``
must give what the generic staged MERGE gives (newer state wins, retry rows counted then cleared,
one row per entity even when a flush repeats an entity)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from opsloop.crm.base import BatchResult
from opsloop.crm.synclog import STATE_ARROW, SyncTables
from opsloop.warehouse.duckdb import DuckDBAdapter


@pytest.fixture
def tables(tmp_path: Path) -> SyncTables:
    t = SyncTables(DuckDBAdapter(tmp_path / "wh.duckdb"), "pipe", "dest")
    t.ensure()
    return t


def _rows(entities: list[str], hashes: list[str], attempt: int = 1, pending: bool = False) -> pa.Table:
    n = len(entities)
    return pa.table(
        {
            "entity": entities,
            "external_id": entities,
            "payload": [f'{{"h":"{h}"}}' for h in hashes],
            "payload_hash": hashes,
            "attempt": pa.array([attempt] * n, pa.int64()),
            "bucket": ["high"] * n,
            "is_new": [False] * n,
            "pending_retry": [pending] * n,
        }
    )


def _result(entities: list[str], hashes: list[str], status: list[str], **kw: Any) -> BatchResult:
    n = len(entities)
    rows = _rows(entities, hashes, kw.get("attempt", 1), kw.get("pending", False))
    code, msg = kw.get("code", [None] * n), kw.get("msg", [None] * n)
    return BatchResult(rows, list(status), kw.get("crm", [None] * n), code, msg, "bulk")


def _read(tables: SyncTables, ref: Any) -> dict[str, dict[str, Any]]:
    rows = tables.wh.query(f"SELECT * FROM {tables.wh.quote(ref)}").to_pylist()
    assert len({r["entity"] for r in rows}) == len(rows), rows  # one row per entity
    return {r["entity"]: r for r in rows}


def test_flush_upserts_state_and_retry_like_the_merge(tables: SyncTables) -> None:
    first = _result(
        ["a", "b", "c"],
        ["h1"] * 3,
        ["created", "failed", "updated"],
        crm=["1", None, "3"],
        code=[None, "E1", None],
        msg=[None, "bad", None],
    )
    counts = tables.flush([first], "r1", retry_cap=3, job_key="r1_1")
    assert counts["created"] == 1 and counts["updated"] == 1 and counts["failed_by_code"] == {"E1": 1}
    state, retry = _read(tables, tables.state), _read(tables, tables.retry)
    assert sorted(state) == ["a", "c"] and state["a"]["crm_id"] == "1"
    assert retry["b"]["attempts"] == 1 and retry["b"]["error_code"] == "E1"

    # a newer state row (another run's) is not overwritten by this flush; "b" now succeeds
    future = datetime.now(UTC) + timedelta(days=1)
    newer: dict[str, Any] = {"pipeline": "pipe", "destination": "dest", "entity": "c", "external_id": "c"}
    newer["payload_hash"] = "h9"
    newer.update(payload="{}", crm_id="3", run_id="later", pushed_at=future)
    with tables.wh.connect() as con:  # type: ignore[attr-defined]
        con.execute(f"DELETE FROM {tables.wh.quote(tables.state)} WHERE entity = 'c'")
    tables.wh.append(tables.state, pa.Table.from_pylist([newer], schema=STATE_ARROW))
    second = _result(["a", "b", "c"], ["h2"] * 3, ["updated"] * 3, crm=["1", "2", "3"], pending=True)
    tables.flush([second], "r2", retry_cap=3, job_key="r2_1")
    state, retry = _read(tables, tables.state), _read(tables, tables.retry)
    assert state["a"]["payload_hash"] == "h2" and state["b"]["payload_hash"] == "h2"
    assert state["c"]["payload_hash"] == "h9" and state["c"]["run_id"] == "later"
    assert retry == {}
    log = tables.wh.query(f"SELECT run_id, status FROM {tables.wh.quote(tables.log)}").to_pylist()
    assert len(log) == 6 and sum(r["status"] == "failed" for r in log) == 1


def test_flush_with_a_repeated_entity_keeps_one_state_row(tables: SyncTables) -> None:
    twice = _result(["x", "x"], ["h1", "h2"], ["updated"] * 2, crm=["9", "9"])
    tables.flush([twice], "r1", retry_cap=3, job_key="r1_1")
    state = _read(tables, tables.state)
    assert list(state) == ["x"] and state["x"]["payload_hash"] in ("h1", "h2")
    failed = _result(["y", "y"], ["h1"] * 2, ["failed"] * 2, attempt=2, code=["E"] * 2, msg=["m"] * 2)
    tables.flush([failed], "r2", retry_cap=5, job_key="r2_1")
    assert _read(tables, tables.retry)["y"]["attempts"] == 2


def test_flush_replaces_older_state_rows_of_its_destination_only(tables: SyncTables) -> None:
    other = SyncTables(tables.wh, "pipe", "other")
    tables.flush([_result(["x", "y"], ["h1"] * 2, ["created"] * 2, crm=["1", "2"])], "r1", retry_cap=3, job_key="k1")
    other.flush([_result(["x"], ["o1"], ["created"], crm=["7"])], "r1", retry_cap=3, job_key="k2")
    # every state row of "dest" is older than this flush's: one join replaces x, y stays, "other" untouched
    tables.flush([_result(["x"], ["h2"], ["updated"], crm=["1"])], "r2", retry_cap=3, job_key="k3")
    rows = tables.wh.query(
        f"SELECT destination, entity, payload_hash, run_id FROM {tables.wh.quote(tables.state)} ORDER BY 1, 2"
    ).to_pylist()
    assert [tuple(r.values()) for r in rows] == [
        ("dest", "x", "h2", "r2"),
        ("dest", "y", "h1", "r1"),
        ("other", "x", "o1", "r1"),
    ]
