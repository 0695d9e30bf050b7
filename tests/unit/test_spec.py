"""Pipeline spec: the shipped example loads; malformed specs fail with path + reason."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsloop.errors import SpecError
from opsloop.spec import load_spec, parse_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "pipelines" / "customer_ops_ai.yaml"


@pytest.fixture
def base() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_reproduces_playbook(base: dict[str, Any]) -> None:
    spec = load_spec(EXAMPLE)
    assert spec.name == "customer_ops_ai" and spec.mode == "incremental"
    crm = spec.source("crm_contacts")
    assert crm.type == "crm" and crm.sync.watermark_field == "updated_at"
    assert crm.sync.every is not None and crm.sync.every.total_seconds() == 7200
    pg = spec.source("postgres_main")
    assert spec.is_cdc(pg) and {t.name for t in pg.tables} >= {"customers", "transactions"}
    assert pg.sync.every is not None and pg.sync.every.total_seconds() == 600
    dd = next(d for d in spec.transform.deduplicate if d.keys == ["customer_id"])
    assert dd.order_column == "updated_at" and dd.descending
    rules = {(q.column, q.rule): q.value for q in spec.transform.quality_checks}
    assert rules[("amount", "min")] == 0
    assert ("customer_id", "not_null") in rules
    assert rules[("event_time", "max_age_minutes")] == 120
    assert set(spec.transform.pii.mask) == {"email", "phone"} and spec.transform.pii.hash == ["email"]
    assert spec.transform.pii.salt_secret_ref == "secret/opsloop-pii-salt"
    tx = spec.warehouse_destination("postgres_main", "transactions")
    assert tx is not None and tx.dataset == "ops_ai" and tx.merge_keys == ["event_id"]
    sf = next(d for d in spec.reverse_etl() if d.crm == "salesforce")
    assert sf.field_map == {"predicted_churn_risk": "AI_Churn_Risk__c", "next_best_action": "AI_Next_Action__c"}
    assert spec.model is not None and spec.model.params["n_estimators"] == 300


def test_snake_case_keys_are_accepted(base: dict[str, Any]) -> None:
    base["cdc"]["slot_name"] = base["cdc"].pop("slotName")
    assert parse_spec(base).cdc.slot_name == "opsloop_customer_ops_ai"


def _set(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    cur: Any = d
    parts = path.split(".")
    for p in parts[:-1]:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    last = parts[-1]
    if value is _DELETE:
        if last.isdigit():
            del cur[int(last)]
        else:
            del cur[last]
    elif last.isdigit():
        cur[int(last)] = value
    else:
        cur[last] = value
    return d


_DELETE = object()

BAD = [
    ("destinations.0.mergeKeys", _DELETE, "destinations[0].mergeKeys", "required when writeMode is merge"),
    ("destinations.0.table", "tx; DROP TABLE x", "destinations[0].table", "not a valid identifier"),
    ("name", "customer ops", "name", "not a valid identifier"),
    ("mode", "sometimes", "mode", "'incremental' or 'full'"),
    ("sources.0.type", "ftp", "sources[0].type", "'database', 'crm' or 'file'"),
    ("sources.1.tabels", ["x"], "sources[1].tabels", "unknown field (did you mean 'tables'?)"),
    ("sources.1.connection", _DELETE, "sources[1].connection", "required for a database source"),
    ("transform.qualityChecks.0.value", "zero", "transform.qualityChecks[0].value", "needs a number"),
    ("transform.qualityChecks.0.rule", "positive", "transform.qualityChecks[0].rule", "Input should be"),
    ("transform.pii.saltSecretRef", _DELETE, "transform.pii.saltSecretRef", "required when hash lists columns"),
    ("cdc.source", "nope", "cdc.source", "is not one of the source ids"),
    ("destinations.4.fieldMap", {}, "destinations[4].fieldMap", "map at least one prediction column"),
    ("destinations.0.stream", "postgres_main.orders", "destinations[0].stream", "is not a source stream"),
    ("sources.0.sync.lag", "soon", "sources[0].sync.lag", "is not a duration"),
    ("transform.qualityChecks.3.rule", "regex", "transform.qualityChecks[3].value", "not a valid regex"),
    ("destinations.0.clusterBy", ["a", "b", "c", "d", "e"], "destinations[0].clusterBy", "at most 4"),
    ("model.features.numeric.0", "churned", "model.features.target", "cannot also be a feature"),
]


@pytest.mark.parametrize(("path", "value", "where", "reason"), BAD, ids=[b[2] + ":" + b[3][:20] for b in BAD])
def test_bad_spec_names_path_and_reason(base: dict[str, Any], path: str, value: Any, where: str, reason: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_set(base, path, value), "customer_ops_ai.yaml")
    found = err.value.problems
    assert any(p == where and reason in r for p, r in found), found
    assert where in str(err.value) and "customer_ops_ai.yaml" in str(err.value)


def test_every_problem_is_reported_at_once(base: dict[str, Any]) -> None:
    bad = _set(_set(base, "name", "a b"), "destinations.0.table", "x-y")
    bad = _set(bad, "sources.0.tipe", "crm")
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    paths = {p for p, _ in err.value.problems}
    assert {"name", "destinations[0].table", "sources[0].tipe"} <= paths


def test_unreadable_yaml_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsources: [\n  - id: a\n")
    with pytest.raises(SpecError) as err:
        load_spec(p)
    assert err.value.problems[0][0].startswith("line ")


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "ident",
    ["x`; DROP TABLE t; --", 'a"b', "a.b", "1abc", "a b", "", "é"],
)
def test_identifiers_with_sql_are_rejected(base: dict[str, Any], ident: str) -> None:
    with pytest.raises(SpecError, match="identifier"):
        parse_spec(_set(base, "destinations.1.mergeKeys", [ident]))
