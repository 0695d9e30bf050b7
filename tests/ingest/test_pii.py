"""PII: masks, keyed hashes, and proof that a raw configured value reaches no warehouse table."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from opsloop.errors import ConfigError, QualityGateError
from opsloop.spec import PiiSpec
from opsloop.transform.pii import KeyedHasher, PiiTransformer, mask_email, mask_phone
from tests.ingest.conftest import exec_sql, make_spec, run_ingest, seed_items

PII = {"mask": ["email", "name"], "hash": ["email"], "saltSecretRef": "secret/test-salt"}


def test_masks() -> None:
    emails = pa.array(["john.doe@example.com", " Jane@X.org ", "no-at-sign", None])
    assert mask_email(emails).to_pylist() == ["j***@example.com", "J***@X.org", "***", None]
    assert mask_phone(pa.array(["+49 170 1234567", None])).to_pylist() == ["***67", None]


def test_keyed_hash_is_stable_normalised_and_salt_dependent() -> None:
    a, b = KeyedHasher(b"salt-1"), KeyedHasher(b"salt-2")
    values = pa.array(["John@Example.com", " john@example.com", "other@example.com", None])
    h = a.hash_values(values).to_pylist()
    assert h[0] == h[1] != h[2] and h[3] is None and len(h[0]) == 64
    assert b.hash_values(values).to_pylist()[0] != h[0]
    with pytest.raises(ConfigError, match="salt"):
        PiiTransformer(PiiSpec(hash=["email"], salt_secret_ref="secret/x"), None)


def test_mask_and_hash_columns() -> None:
    t = PiiTransformer(PiiSpec(mask=["email", "phone"], hash=["email"], salt_secret_ref="secret/x"), b"s")
    out = t.apply(pa.table({"id": [1], "email": ["ann@x.com"], "phone": ["0170 99887766"]}))
    assert out.column("email").to_pylist() == ["a***@x.com"] and out.column("phone").to_pylist() == ["***66"]
    assert out.column("email_hash").to_pylist() == [KeyedHasher(b"s").one("ann@x.com")]
    only_hash = PiiTransformer(PiiSpec(hash=["email"], salt_secret_ref="secret/x"), b"s")
    assert only_hash.apply(pa.table({"email": ["ann@x.com"]})).column_names == ["email"]


def _scan_for(path: str, needles: list[str]) -> list[str]:
    """Every text-like column of every table in the DuckDB file that contains one of ``needles``."""
    hits = []
    con = duckdb.connect(path, read_only=True)
    try:
        cols = con.execute(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE data_type NOT IN ('BIGINT','INTEGER','DOUBLE','BOOLEAN','DATE') AND data_type NOT LIKE 'DECIMAL%' "
            "AND data_type NOT LIKE 'TIMESTAMP%'"
        ).fetchall()
        assert len(cols) > 10
        for schema, table, col in cols:
            for needle in needles:
                q = f'SELECT count(*) FROM "{schema}"."{table}" WHERE lower(CAST("{col}" AS VARCHAR)) LIKE ?'
                if con.execute(q, [f"%{needle.lower()}%"]).fetchone()[0]:
                    hits.append(f"{schema}.{table}.{col} contains {needle}")
    finally:
        con.close()
    return hits


def test_raw_pii_reaches_no_warehouse_table(pg_dsn, tmp_path, slots, monkeypatch) -> None:
    from opsloop.warehouse.duckdb import DuckDBAdapter

    seed_items(pg_dsn, 40)
    exec_sql(pg_dsn, "UPDATE items SET amount = -1 WHERE id = 3")  # quarantined with its (masked) row
    checks = [{"column": "amount", "rule": "min", "value": 0}, {"column": "email", "rule": "regex", "value": "^u"}]
    spec = make_spec("cdc", checks=checks, pii=PII)
    slots.append(spec.cdc.slot_name)
    path = tmp_path / "pii.duckdb"
    wh = DuckDBAdapter(path)
    staged: list[str] = []  # every text value that reached a staging table (in memory on DuckDB)
    real_load_staging = DuckDBAdapter.load_staging

    def load_staging(self, ref, data, schema, job_key):  # type: ignore[no-untyped-def]
        job = real_load_staging(self, ref, data, schema, job_key)
        assert ref.temp, "inside the ingest session the staging table is a temporary one"
        for row in self.query(f"SELECT * FROM {self.quote(ref)}").to_pylist():
            staged.extend(v for v in row.values() if isinstance(v, str))
        return job

    monkeypatch.setattr(DuckDBAdapter, "load_staging", load_staging)
    out = run_ingest(wh, spec, pg_dsn, "r1")
    assert out["rows_quarantined"] == 1 and out["inserted"] == 39
    exec_sql(pg_dsn, "UPDATE items SET email = 'undercover.victim@secret.example' WHERE id = 30")
    assert run_ingest(wh, spec, pg_dsn, "r2")["updated"] == 1  # staged, then merged
    assert any("***@" in v for v in staged)
    # a failing gate stops the load after staging (its good rows, here none) and leaves no table behind
    exec_sql(pg_dsn, "UPDATE items SET amount = -5, email = 'Victim.Person@Secret.example' WHERE id <= 20")
    with pytest.raises(QualityGateError):
        run_ingest(wh, spec, pg_dsn, "r3")
    assert not [v for v in staged if "user" in v or "victim" in v.lower() or v.startswith("name ")]
    tables = {r["table_name"] for r in wh.query("SELECT table_name FROM information_schema.tables").to_pylist()}
    assert {"items", "_quarantine", "_opsloop_state", "_ingest_runs"} <= tables
    assert "_stg_items" not in tables  # staging never reached the file
    stored = wh.query("SELECT email, name, email_hash FROM ops.items WHERE id = 10").to_pylist()[0]
    assert stored["email"] == "u***@example.com" and stored["name"] == "n***" and len(stored["email_hash"]) == 64
    raw = [f"user{i}@example.com" for i in range(1, 41)] + ["victim.person", "undercover.victim", "name 1"]
    assert _scan_for(str(path), raw) == []
    assert _scan_for(str(path), ["u***@example.com"])  # the scan does see masked values
