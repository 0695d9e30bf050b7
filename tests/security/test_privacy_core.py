"""The erasure core on real parts (DuckDB, the CRM sandbox through the real clients): find a subject
by e-mail, erase it from every table that can hold it, clear its CRM AI fields without creating
records, keep it out of later loads (suppression list), and converge on a rerun."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from opsloop import privacy
from opsloop.crm.clients import hubspot_client, salesforce_client
from opsloop.crm.erase import clear_destination
from opsloop.errors import ConfigError
from opsloop.ingest import ingest_source
from opsloop.sources.files import FileSource
from opsloop.spec import PipelineSpec, load_spec, parse_spec
from opsloop.suppression import Suppression
from opsloop.transform.pii import KeyedHasher, PiiTransformer
from opsloop.warehouse.base import TableRef, TableSchema
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient
from tests.crm.helpers import cid, push, write_predictions, write_spec
from tests.crm.helpers import predictions as make_predictions

SALT = b"core-test-salt"
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def customers(n: int, hours: int = 0) -> pa.Table:
    return pa.table(
        {
            "customer_id": [cid(i) for i in range(1, n + 1)],
            "email": [f"Person.{i}@Example.org" for i in range(1, n + 1)],
            "phone": [f"+49 170 000 {i:04d}" for i in range(1, n + 1)],
            "full_name": [f"Person Number{i}" for i in range(1, n + 1)],
            "mrr": [-1.0 if i == 4 else 10.0 * i for i in range(1, n + 1)],  # row 4 is quarantined
            "updated_at": pa.array([T0 + timedelta(hours=hours, seconds=i) for i in range(n)], pa.timestamp("us")),
        }
    )


def file_spec(path: str) -> PipelineSpec:
    return parse_spec(
        {
            "name": "privacy_core",
            "sources": [
                {"id": "files", "type": "file", "path": path,
                 "tables": [{"name": "customers", "primaryKey": ["customer_id"]}],
                 "sync": {"strategy": "watermark", "watermarkField": "updated_at"}}
            ],
            "transform": {
                "qualityChecks": [{"column": "mrr", "rule": "min", "value": 0}],
                "pii": {"mask": ["email", "phone"], "hash": ["email"], "saltSecretRef": "secret/core-salt"},
                "quarantine": {"maxShare": 0.5},
            },
            "destinations": [{"type": "warehouse", "stream": "files.customers", "dataset": "ops_ai",
                              "table": "customers", "mergeKeys": ["customer_id"], "orderBy": "updated_at"}],
        }
    )  # fmt: skip


def test_suppression_keeps_an_erased_subject_out_of_later_loads(tmp_path: Path, duckdb_wh: DuckDBAdapter) -> None:
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    pq.write_table(customers(6), src_dir / "part-1.parquet")
    spec = file_spec(str(src_dir / "*.parquet"))
    source = spec.sources[0]
    out = ingest_source(duckdb_wh, spec, source, FileSource(spec, source), "r1", salt=SALT)
    assert (out["inserted"], out["rows_quarantined"]) == (5, 1)
    hasher = KeyedHasher(SALT)
    q = json.loads(duckdb_wh.query("SELECT row_json FROM opsloop_meta._quarantine").column(0)[0].as_py())
    assert q["customer_id"] == cid(4) and q["email"] == "P***@Example.org" and "Person.4" not in json.dumps(q)

    # erase C0000002 (asked by e-mail, any case) and the quarantined C0000004 (by key)
    two = privacy.find_subject(duckdb_wh, spec, hasher, email="  person.2@EXAMPLE.org ")
    assert two.keys == {cid(2)} and len(two.email_hashes) == 1
    four = privacy.find_subject(duckdb_wh, spec, hasher, entity=f" {cid(4).lower()} ")  # as typed in a ticket
    assert privacy.erase_rows(duckdb_wh, spec, two) == {"ops_ai.customers": 1}
    assert privacy.erase_rows(duckdb_wh, spec, four) == {"opsloop_meta._quarantine": 1}
    assert privacy.suppress(duckdb_wh, spec, two, "e1") == 2 and privacy.suppress(duckdb_wh, spec, two, "e1") == 0
    privacy.suppress(duckdb_wh, spec, four, "e2")
    # asked again later (rows gone), by key or by e-mail: the same subject, the same pseudonym
    for again in (dict(entity=cid(2)), dict(email="person.2@example.org")):
        found = privacy.find_subject(duckdb_wh, spec, hasher, **again)
        assert (found.pseudonym, found.key_hashes, found.email_hashes) == (
            two.pseudonym,
            two.key_hashes,
            two.email_hashes,
        )
        assert privacy.erase_rows(duckdb_wh, spec, found) == {}
    stored = duckdb_wh.query("SELECT * FROM opsloop_meta._erasure_suppress").to_pylist()
    assert cid(2) not in json.dumps(stored, default=str) and {r["column_name"] for r in stored} == {
        "customer_id",
        "email",
    }

    # the source still has both (the operator has not deleted them there yet): a full reload and an
    # incremental change leave them out, counted in the stream's flags
    again = ingest_source(duckdb_wh, spec, source, FileSource(spec, source), "r2", salt=SALT, full_refresh=True)
    flags = again["streams"]["customers"]["flags"]
    assert any(f.startswith("privacy: 2 row(s) of erased data subjects skipped") for f in flags), flags
    ids = {r["customer_id"] for r in duckdb_wh.query("SELECT customer_id FROM ops_ai.customers").to_pylist()}
    assert ids == {cid(1), cid(3), cid(5), cid(6)}
    assert duckdb_wh.query("SELECT count(*) FROM opsloop_meta._quarantine").column(0)[0].as_py() == 0
    changed = customers(6, hours=2).set_column(2, "phone", pa.array(["+1"] * 6))
    pq.write_table(changed.filter(pa.array([False, True, False, False, False, False])), src_dir / "part-2.parquet")
    inc = ingest_source(duckdb_wh, spec, source, FileSource(spec, source), "r3", salt=SALT)
    assert inc["inserted"] == 0 and inc["updated"] == 0
    # a subject known only by e-mail is suppressed through its e-mail column too
    only_mail = privacy.Subject(email_hashes={hasher.one("person.5@example.org")})
    privacy.suppress(duckdb_wh, spec, only_mail, "e3")
    pq.write_table(customers(6, hours=4).slice(4, 1), src_dir / "part-3.parquet")
    inc = ingest_source(duckdb_wh, spec, source, FileSource(spec, source), "r4", salt=SALT)
    assert inc["rows_read"] >= 1 and inc["inserted"] + inc["updated"] == 0
    assert any(f.startswith("privacy: ") for f in inc["streams"]["customers"]["flags"])
    # matching needs the keyed hash: no salt, no silent pass-through
    with pytest.raises(ConfigError, match="no PII salt"):
        Suppression.load(duckdb_wh, spec.name).split(customers(2), None, "ops_ai.customers")


def test_erase_warehouse_and_crm_then_rerun_is_harmless(
    tmp_path: Path, duckdb_wh: DuckDBAdapter, crm_sandbox: SandboxClient
) -> None:
    base = write_spec(tmp_path)
    data = yaml.safe_load((tmp_path / "crm_test.yaml").read_text())
    data["transform"] = {"pii": {"mask": ["email"], "hash": ["email"], "saltSecretRef": "secret/core-salt"}}
    (tmp_path / "crm_test.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(tmp_path / "crm_test.yaml")
    assert base.name == spec.name
    hasher = KeyedHasher(SALT)
    wh = duckdb_wh
    crm_sandbox.seed("salesforce", "Contact", 4)
    write_predictions(wh, make_predictions(4))
    for crm in ("salesforce", "hubspot"):
        assert push(wh, spec, crm, crm_sandbox)["failed"] == 0
    people = pa.table({"customer_id": [cid(i) for i in range(1, 5)], "email": [f"p{i}@x.org" for i in range(1, 5)]})
    landed = PiiTransformer(spec.transform.pii, SALT).apply(people)
    wh.ensure_table(TableRef("ops_ai", "customers"), TableSchema.from_arrow(landed.schema))
    wh.append(TableRef("ops_ai", "customers"), landed)
    wh.append(TableRef("ops_ai", "_stg_customers_leftover"), landed.slice(1, 1))  # a crashed run's staging

    subject = privacy.find_subject(wh, spec, hasher, email="p2@x.org")
    assert subject.keys == {cid(2)}
    typed = privacy.find_subject(wh, spec, hasher, entity=f"{cid(2).lower()} ")  # the stored spelling is used
    assert (typed.keys, typed.pseudonym) == ({cid(2)}, subject.pseudonym)
    assert privacy.erase_rows(wh, spec, subject, dry_run=True) == privacy.erase_rows(wh, spec, subject, dry_run=True)
    done = privacy.erase_rows(wh, spec, subject)
    assert done == {
        "ops_ai._stg_customers_leftover": 1,
        "ops_ai.customers": 1,
        "ops_ai.predictions": 1,
        "opsloop_meta._sync_log": 2,
        "opsloop_meta._sync_state": 2,
    }
    assert privacy.erase_rows(wh, spec, subject) == {}
    log = wh.query("SELECT entity, external_id, status FROM opsloop_meta._sync_log ORDER BY entity").to_pylist()
    assert len(log) == 8 and sum(r["entity"] == subject.pseudonym == r["external_id"] for r in log) == 2
    assert cid(2) not in json.dumps(wh.query("SELECT * FROM opsloop_meta._sync_log").to_pylist(), default=str)

    clients = {
        "salesforce": salesforce_client(crm_sandbox.url, crm_sandbox.salesforce_token, timeout=(5, 60)),
        "hubspot": hubspot_client(crm_sandbox.hubspot_token, crm_sandbox.url, timeout=(5, 60)),
    }
    results = {}
    for dest in spec.reverse_etl():
        ref = str(dest.connection)
        keys = [*subject.keys, "C9999999"]  # one the CRMs never had: looked up, never created
        results[dest.crm] = clear_destination(dest, clients[str(dest.crm)], ref, keys, subject.pseudonym).as_dict()
        again = clear_destination(dest, clients[str(dest.crm)], ref, keys, subject.pseudonym).as_dict()
        assert (again["status"], again["cleared"], again["already_clear"]) == ("already_clear", 0, 1)
    assert {k: (v["status"], v["found"], v["cleared"]) for k, v in results.items()} == {
        "salesforce": ("cleared", 1, 1),
        "hubspot": ("cleared", 1, 1),
    }
    sf = crm_sandbox.by_key("salesforce", "Contact", "Customer_Id__c")
    hs = crm_sandbox.by_key("hubspot", "contacts", "customer_id")
    assert "C9999999" not in sf and "C9999999" not in hs
    assert all(sf[cid(2)].get(f) is None for f in ("AI_Churn_Risk__c", "AI_Next_Action__c", "AI_Risk_Bucket__c"))
    assert all(hs[cid(2)].get(p) in (None, "") for p in ("ai_churn_risk", "ai_next_action", "ai_risk_bucket"))
    assert sf[cid(1)]["AI_Churn_Risk__c"] is not None and hs[cid(3)]["ai_churn_risk"] not in (None, "")

    # a CRM error names the subject by its pseudonym only
    crm_sandbox.fault(r"/query", status=400, body=[{"errorCode": "MALFORMED_QUERY", "message": f"bad {cid(3)}"}])
    dest = spec.reverse_etl()[0]
    with pytest.raises(Exception) as err:
        clear_destination(dest, clients["salesforce"], "b", [cid(3)], "erased:abc")
    assert cid(3) not in str(err.value) and "erased:abc" in str(err.value) and err.value.__cause__ is None
