"""Bad configuration: a malformed spec, a spec naming a block that does not exist (or one of the wrong
type), a missing or empty PII salt Secret — each fails before anything is read or written, with the
spec path and the block name in the message, also through the real ingest flow on a Prefect server."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsloop.errors import ConfigError, SpecError
from opsloop.ingest import ingest_source
from opsloop.spec import load_spec, parse_spec
from opsloop.warehouse.base import TableRef
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.bad_inputs.conftest import pg_spec_data

MALFORMED = """\
name: bi
sources:
  - id: pg
    type: database
    connection: opsloop-postgres/test
    tables: [transactions]
    sync: {strategy: watermark, watermarkField: updated_at}
transform:
  qualityChecks:
    - {column: amount, rule: min, value: zero}
destinations:
  - type: warehouse
    dataset: ops
    table: transactions
    mergeKey: [event_id]
"""


def test_malformed_spec_lists_every_problem_with_its_path(tmp_path: Path) -> None:
    """BI-20a: a typo'd key, a missing required key and a rule value of the wrong type are reported
    together, each with its YAML path; broken YAML names line and column."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(MALFORMED)
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    assert err.value.problems == [
        ("transform.qualityChecks[0].value", "rule min needs a number"),
        ("destinations[0].mergeKey", "unknown field (did you mean 'mergeKeys'?)"),
    ]
    bad.write_text(
        MALFORMED.replace("mergeKey:", "mergeKeys:")
        .replace("value: zero", "value: 0")
        .replace("    table: transactions\n", "")
    )
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    assert err.value.problems == [("destinations[0].table", "required for a warehouse destination")]
    assert (
        str(err.value)
        == f"invalid pipeline spec {bad} (1 problem(s)):\n  destinations[0].table: required for a warehouse destination"
    )
    bad.write_text(MALFORMED.replace("  - id: pg", "  - id: pg\n   type: [database"))
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    assert err.value.problems[0][0] == "line 4, column 4" and err.value.problems[0][1].startswith("not valid YAML")


def _flow_env(prefect_api: str, tmp_path: Path, pg_dsn: str | None = None) -> dict[str, str]:
    from blocks.postgres import PostgresConnector
    from blocks.warehouse import DuckDBConnector
    from deployments.bootstrap import register_types

    register_types()
    tag = f"bi-{uuid.uuid4().hex[:8]}"
    DuckDBConnector(path=str(tmp_path / "wh.duckdb")).save(tag, overwrite=True)
    if pg_dsn:
        PostgresConnector(dsn=pg_dsn).save(tag, overwrite=True)
    return {"tag": tag, "warehouse": f"opsloop-duckdb/{tag}", "postgres": f"opsloop-postgres/{tag}"}


def _nothing_loaded(tmp_path: Path) -> bool:
    """No target table and no committed position (the run's lease row may exist)."""
    if not (tmp_path / "wh.duckdb").exists():
        return True
    wh = DuckDBAdapter(tmp_path / "wh.duckdb")
    return wh.table_schema(TableRef("ops", "transactions")) is None and wh.get_state("bi", "pg.transactions") is None


def _spec_file(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _run_ingest(spec_path: str, warehouse: str) -> tuple[Any, BaseException]:
    from flows.ingest import ingest

    state = ingest(spec_path=spec_path, warehouse=warehouse, return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, BaseException)
    return state, exc


def test_malformed_spec_fails_the_flow_before_any_task(prefect_api: str, fast_flows: None, tmp_path: Path) -> None:
    """BI-20b: the ingest flow on a malformed spec fails at once with the SpecError text."""
    env = _flow_env(prefect_api, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(MALFORMED)
    state, exc = _run_ingest(str(bad), env["warehouse"])
    assert isinstance(exc, SpecError) and "destinations[0].mergeKey: unknown field" in str(exc)
    assert "destinations[0].mergeKey: unknown field" in (state.message or "")
    assert _nothing_loaded(tmp_path)


def test_spec_naming_a_missing_block(prefect_api: str, fast_flows: None, tmp_path: Path, pg_dsn: str) -> None:
    """BI-21: a connection, a warehouse or a CRM block that does not exist (or is of the wrong type) →
    ConfigError naming the spec path and the block; the flow fails with it and writes nothing."""
    from blocks import load_warehouse
    from tasks.ingest import build_reader
    from tasks.sync import _client

    env = _flow_env(prefect_api, tmp_path)
    data = pg_spec_data("watermark")
    data["sources"][0]["connection"] = "opsloop-postgres/nope"
    state, exc = _run_ingest(_spec_file(tmp_path, data), env["warehouse"])
    assert isinstance(exc, ConfigError)
    assert str(exc).startswith(
        "sources[pg].connection: Prefect block 'opsloop-postgres/nope' not found — create it (make bootstrap)"
    )
    assert "opsloop-postgres/nope" in (state.message or "")
    assert _nothing_loaded(tmp_path)
    with pytest.raises(ConfigError, match=r"^warehouse block 'opsloop-duckdb/nope' not found — run `make bootstrap`"):
        load_warehouse("opsloop-duckdb/nope")
    data["sources"][0]["connection"] = env["warehouse"]  # a DuckDB block where a Postgres one belongs
    spec = parse_spec(data)
    with pytest.raises(
        ConfigError, match=rf"^sources\[pg\].connection: '{env['warehouse']}' is not a Postgres connector"
    ):
        build_reader(spec, spec.sources[0])
    with pytest.raises(ConfigError, match=r"^CRM block 'opsloop-hubspot/nope' not found — run `make bootstrap`"):
        _client("opsloop-hubspot/nope")


def test_missing_or_empty_pii_salt_secret(prefect_api: str, fast_flows: None, tmp_path: Path, pg_dsn: str) -> None:
    """BI-22: pii.hash lists email but the Secret named by saltSecretRef is missing (or empty) → the
    ingest fails naming ``transform.pii.saltSecretRef`` and the Secret before any row is read, so no
    unhashed value can reach the warehouse; the core refuses to run without a salt as well."""
    from prefect.blocks.system import Secret

    from tasks.ingest import resolve_salt

    env = _flow_env(prefect_api, tmp_path, pg_dsn)
    data = pg_spec_data("watermark")
    data["sources"][0]["connection"] = env["postgres"]
    data["transform"]["pii"] = {"hash": ["customer_id"], "saltSecretRef": f"secret/{env['tag']}-salt"}
    _, exc = _run_ingest(_spec_file(tmp_path, data), env["warehouse"])
    assert isinstance(exc, ConfigError)
    assert str(exc).startswith(
        f"transform.pii.saltSecretRef: Prefect block 'secret/{env['tag']}-salt' not found — create it (make bootstrap)"
    )
    assert _nothing_loaded(tmp_path)
    wh = DuckDBAdapter(tmp_path / "wh.duckdb")
    Secret(value="").save(f"{env['tag']}-salt", overwrite=True)
    with pytest.raises(
        ConfigError, match=rf"^transform.pii.saltSecretRef: Secret block 'secret/{env['tag']}-salt' is empty$"
    ):
        resolve_salt(parse_spec(data))
    spec = parse_spec(data)
    with pytest.raises(
        ConfigError,
        match=r"^pii.hash lists \['customer_id'\] but no salt was resolved from "
        rf"'secret/{env['tag']}-salt' \(create the Prefect Secret block\)$",
    ):
        ingest_source(wh, spec, spec.sources[0], reader=None, run_id="r1", salt=None)  # type: ignore[arg-type]
