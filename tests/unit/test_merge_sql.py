"""The one MERGE builder: exact SQL per dialect; the BigQuery form parses with sqlglot's BigQuery dialect."""

from __future__ import annotations

import pytest
import sqlglot

from opsloop.warehouse.base import Column, MergeSpec, TableRef, TableSchema
from opsloop.warehouse.merge import Dialect, create_table_sql, merge_sql, state_merge_sql

SPEC = MergeSpec(
    TableRef("ops_ai", "transactions"),
    ("event_id", "customer_id", "amount", "event_time", "updated_at"),
    ("event_id",),
    ("updated_at",),
    tiebreak="_opsloop_seq",
    delete_flag="_deleted",
    partition_column="event_time",
)
STG = TableRef("ops_ai", "_stg_transactions")

DUCKDB_SQL = """MERGE INTO "ops_ai"."transactions" AS t
USING (
    SELECT * FROM "ops_ai"."_stg_transactions" WHERE TRUE
    QUALIFY ROW_NUMBER() OVER (PARTITION BY "event_id" ORDER BY "updated_at" DESC NULLS LAST, "_opsloop_seq" DESC) = 1
) AS s
ON t."event_id" = s."event_id"
WHEN MATCHED AND COALESCE(s."_deleted", FALSE) AND (t."updated_at" IS NULL OR s."updated_at" >= t."updated_at") THEN DELETE
WHEN MATCHED AND NOT COALESCE(s."_deleted", FALSE) AND (t."updated_at" IS NULL OR s."updated_at" > t."updated_at") THEN UPDATE SET "customer_id" = s."customer_id", "amount" = s."amount", "event_time" = s."event_time", "updated_at" = s."updated_at"
WHEN NOT MATCHED AND NOT COALESCE(s."_deleted", FALSE) THEN INSERT ("event_id", "customer_id", "amount", "event_time", "updated_at") VALUES (s."event_id", s."customer_id", s."amount", s."event_time", s."updated_at")"""  # noqa: E501

BIGQUERY_SQL = """MERGE INTO `proj.ops_ai.transactions` AS t
USING (
    SELECT * FROM `proj.ops_ai._stg_transactions` WHERE TRUE
    QUALIFY ROW_NUMBER() OVER (PARTITION BY `event_id` ORDER BY `updated_at` DESC NULLS LAST, `_opsloop_seq` DESC) = 1
) AS s
ON t.`event_id` = s.`event_id` AND (t.`event_time` IS NULL OR t.`event_time` BETWEEN TIMESTAMP '2026-11-01 00:00:00+00:00' AND TIMESTAMP '2026-11-27 23:00:00+00:00')
WHEN MATCHED AND COALESCE(s.`_deleted`, FALSE) AND (t.`updated_at` IS NULL OR s.`updated_at` >= t.`updated_at`) THEN DELETE
WHEN MATCHED AND NOT COALESCE(s.`_deleted`, FALSE) AND (t.`updated_at` IS NULL OR s.`updated_at` > t.`updated_at`) THEN UPDATE SET `customer_id` = s.`customer_id`, `amount` = s.`amount`, `event_time` = s.`event_time`, `updated_at` = s.`updated_at`
WHEN NOT MATCHED AND NOT COALESCE(s.`_deleted`, FALSE) THEN INSERT (`event_id`, `customer_id`, `amount`, `event_time`, `updated_at`) VALUES (s.`event_id`, s.`customer_id`, s.`amount`, s.`event_time`, s.`updated_at`)"""  # noqa: E501

BOUNDS = ("2026-11-01 00:00:00+00:00", "2026-11-27 23:00:00+00:00")


def test_duckdb_merge_exact() -> None:
    assert merge_sql(Dialect("duckdb"), SPEC, staging=STG) == DUCKDB_SQL


def test_bigquery_merge_exact_and_parses() -> None:
    sql = merge_sql(Dialect("bigquery", "proj"), SPEC, staging=STG, partition_bounds=BOUNDS)
    assert sql == BIGQUERY_SQL
    tree = sqlglot.parse_one(sql, read="bigquery")
    assert isinstance(tree, sqlglot.exp.Merge)
    whens = tree.find_all(sqlglot.exp.When)
    assert len(list(whens)) == 3


def test_bigquery_merge_transpiles_to_duckdb_and_runs() -> None:
    """The BigQuery text, transpiled by sqlglot, is accepted by DuckDB too (same semantics)."""
    import duckdb

    sql = merge_sql(Dialect("bigquery"), SPEC, staging=STG)
    duck = sqlglot.transpile(sql, read="bigquery", write="duckdb")[0]
    con = duckdb.connect()
    con.execute("CREATE SCHEMA ops_ai")
    cols = "event_id VARCHAR, customer_id VARCHAR, amount DOUBLE, event_time TIMESTAMPTZ, updated_at TIMESTAMPTZ"
    con.execute(f"CREATE TABLE ops_ai.transactions ({cols})")
    con.execute(f"CREATE TABLE ops_ai._stg_transactions ({cols}, _deleted BOOLEAN, _opsloop_seq BIGINT)")
    con.execute("INSERT INTO ops_ai._stg_transactions VALUES ('e1','c1',1,now(),now(),false,1)")
    con.execute(duck)
    assert con.execute("SELECT count(*) FROM ops_ai.transactions").fetchone() == (1,)


def test_merge_without_order_updates_only_changed_rows() -> None:
    spec = MergeSpec(TableRef("d", "t"), ("id", "a", "b"), ("id",))
    sql = merge_sql(Dialect("duckdb"), spec, staging=TableRef("d", "s"))
    assert 'WHEN MATCHED AND (t."a" IS DISTINCT FROM s."a" OR t."b" IS DISTINCT FROM s."b") THEN UPDATE' in sql
    assert "DELETE" not in sql


def test_state_merge_parses_in_bigquery() -> None:
    sql = state_merge_sql(Dialect("bigquery", "p"), "opsloop_meta")
    assert "`p.opsloop_meta._opsloop_state`" in sql and "@pipeline" in sql
    sqlglot.parse_one(sql, read="bigquery")
    assert "$pipeline" in state_merge_sql(Dialect("duckdb"), "opsloop_meta")


def test_create_table_partition_and_cluster_on_bigquery_only() -> None:
    schema = TableSchema(
        (Column("event_id", "STRING"), Column("event_time", "TIMESTAMP"), Column("amount", "NUMERIC")),
        partition_by="event_time",
        cluster_by=("event_id",),
    )
    bq = create_table_sql(Dialect("bigquery", "p"), TableRef("d", "t"), schema)
    assert bq.endswith("PARTITION BY DATE(`event_time`)\nCLUSTER BY `event_id`")
    assert "`amount` NUMERIC" in bq
    sqlglot.parse_one(bq, read="bigquery")
    duck = create_table_sql(Dialect("duckdb"), TableRef("d", "t"), schema)
    assert "PARTITION" not in duck and '"amount" DECIMAL(38, 9)' in duck


def test_dataset_prefix_applies_everywhere() -> None:
    d = Dialect("bigquery", "p", dataset_prefix="dev_")
    assert d.table(TableRef("ops_ai", "t")) == "`p.dev_ops_ai.t`"


@pytest.mark.parametrize("bad", ["a;b", "a`b", 'a"b', "a b", "x--"])
def test_builder_refuses_unsafe_identifiers(bad: str) -> None:
    with pytest.raises(ValueError, match="identifier"):
        MergeSpec(TableRef("d", "t"), ("id", bad), ("id",))
    with pytest.raises(ValueError, match="identifier"):
        TableRef("d", bad)


def test_unsafe_partition_bound_rejected() -> None:
    with pytest.raises(ValueError, match="unsafe"):
        merge_sql(Dialect("bigquery"), SPEC, staging=STG, partition_bounds=("2026' OR 1=1 --", "x"))


@pytest.mark.parametrize("payload", ["amount", "rowid"])
@pytest.mark.parametrize("ordered", [True, False])
def test_duckdb_merge_plan_ends_where_the_merge_statement_ends(payload: str, ordered: bool) -> None:
    """DuckDB runs :func:`merge_plan` (a work table of staging row ids, DELETE, INSERT by row id; a
    column named ``rowid`` hides the pseudo-column, so the work table then carries whole rows). Both
    forms must leave the target exactly as the one MERGE statement does: in-batch duplicates (latest
    wins), older and equal versions ignored, deletes, new keys, unchanged rows untouched."""
    import duckdb

    from opsloop.warehouse.merge import merge_plan

    spec = MergeSpec(
        TableRef("d", "t"),
        ("id", payload, "v") if ordered else ("id", payload),
        ("id",),
        ("v",) if ordered else (),
        tiebreak="seq" if ordered else None,
        delete_flag="del" if ordered else None,
    )
    cols = f'id BIGINT, "{payload}" VARCHAR' + (", v BIGINT" if ordered else "")
    target = [(i, f"old{i}", 10) for i in range(1, 9)]
    staged = [  # id, payload, v, seq, del
        (1, "newer", 11, 1, False),  # update
        (2, "older", 9, 2, False),  # older: ignored
        (3, "same-v", 10, 3, False),  # equal version: ignored (ordered) / changed value (unordered)
        (4, None, 12, 4, True),  # delete
        (5, "first", 11, 5, False),  # duplicates: the later seq wins
        (5, "second", 11, 6, False),
        (6, "old6", 10, 7, False),  # no change at all
        (20, "new", 1, 8, False),  # insert
        (21, None, 1, 9, True),  # delete of a key the target never had
        (22, "a", 1, 10, False),
        (22, "b", 2, 11, False),  # duplicate insert: the newer version
    ]
    if not ordered:
        staged = [r for r in staged if not r[4] and r[0] not in (5, 22)]
    ends = []
    for form in ("statement", "plan"):
        con = duckdb.connect()
        con.execute("CREATE SCHEMA d")
        con.execute(f"CREATE TABLE d.t ({cols})")
        con.execute(f"CREATE TABLE d.s ({cols}, seq BIGINT, del BOOLEAN)")
        width = 3 if ordered else 2
        con.executemany(f"INSERT INTO d.t VALUES ({', '.join('?' * width)})", [r[:width] for r in target])
        names = ", ".join(["id", f'"{payload}"', "v"][:width])
        fill = f"INSERT INTO d.s ({names}, seq, del) VALUES ({', '.join('?' * (width + 2))})"
        con.executemany(fill, [(*r[:width], *r[3:]) for r in staged])
        if form == "statement":
            con.execute(merge_sql(Dialect("duckdb"), spec, staging=TableRef("d", "s")))
            counts = None
        else:
            plan = merge_plan(Dialect("duckdb"), spec, TableRef("d", "s"))
            assert ("_opsloop_row" in plan.statements[0]) == (payload != "rowid")
            for stmt in plan.statements:
                con.execute(stmt)
            counts = con.execute(plan.counts or "").fetchone()
        ends.append((con.execute("SELECT * FROM d.t ORDER BY id").fetchall(), counts))
    (want, _), (got, counts) = ends
    assert got == want
    ids = {r[0]: r[1] for r in got}
    if ordered:
        assert ids[1] == "newer" and ids[2] == "old2" and ids[3] == "old3" and 4 not in ids
        assert ids[5] == "second" and ids[22] == "b" and 21 not in ids
        assert counts == (2, 2, 1)  # inserted 20, 22; updated 1, 5; deleted 4
    else:
        assert ids[3] == "same-v" and ids[6] == "old6" and ids[20] == "new"
        assert counts == (1, 3, 0)  # inserted 20; updated 1, 2, 3 (values differ); 6 is equal: untouched
