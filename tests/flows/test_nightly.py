"""The nightly flow's orchestration on a real Prefect server: the chain stops at a failed gate, a
blocked gate keeps the CRM push from running, parameters reach the stages that take them, and every
run ends with its summary/table artifacts, cost-ledger rows and an operator-ready failure message.

Stage flows are swapped for small real flows here (``flows.nightly.STAGES`` points at this module)
so each path is forced exactly; the last test runs the real ingest flow."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import flow

import flows.nightly as nightly_mod
from opsloop.errors import QualityGateError
from tasks.stages import StageDef
from tests.support.fixtures.core import REPO

pytestmark = [pytest.mark.slow]

CALLS: list[tuple[str, dict[str, Any]]] = []


@flow(name="ingest")
def ingest_ok(spec_path: str, warehouse: str, full_refresh: bool = False, sources: list[str] | None = None) -> dict:
    CALLS.append(("ingest", {"full_refresh": full_refresh, "sources": sources}))
    return {"rows_read": 120, "rows_ingested": 110, "rows_quarantined": 10}


@flow(name="ingest")
def ingest_gate_fails(spec_path: str, warehouse: str) -> dict:
    CALLS.append(("ingest", {}))
    raise QualityGateError("transactions: 9.0% of rows failed min(amount) ≥ 0 (quarantine.maxShare 5%)")


@flow(name="score")
def score_ok(spec_path: str, warehouse: str, mlflow: str) -> dict:
    CALLS.append(("score", {"mlflow": mlflow}))
    return {"rows_scored": 110, "model_name": "customer_churn", "model_version": "3"}


@flow(name="score")
def score_drift_blocks(spec_path: str, warehouse: str) -> dict:
    CALLS.append(("score", {}))
    return {"rows_scored": 110, "push_blocked": True, "blocked_reason": "drift: PSI 0.41 on mrr ≥ alert 0.25"}


@flow(name="sync")
def sync_push(spec_path: str, warehouse: str, dry_run: bool = False, limit: int | None = None) -> dict:
    CALLS.append(("sync", {"dry_run": dry_run, "limit": limit}))
    return {"rows_pushed": 7, "failed": 0}


def _stages(**funcs: str) -> dict[str, StageDef]:
    out = dict(nightly_mod.STAGES)
    for stage, func in funcs.items():
        out[stage] = StageDef(stage, __name__, func, stage)
    out["train"] = StageDef("train", __name__, "no_such_flow", "train")  # not available → not run
    return out


@pytest.fixture
def run_env(prefect_api: str, tmp_path: Path, fast_flows: None) -> dict[str, str]:
    """A DuckDB warehouse block of this test and the demo spec without SLOs (they judge run history)."""
    from blocks.warehouse import DuckDBConnector
    from deployments.bootstrap import register_types

    register_types()
    name = f"nightly-{uuid.uuid4().hex[:8]}"
    DuckDBConnector(path=str(tmp_path / "wh.duckdb")).save(name, overwrite=True)
    spec = yaml.safe_load((REPO / "pipelines" / "customer_ops_ai.yaml").read_text())
    spec.pop("slos", None)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    CALLS.clear()
    return {"spec_path": str(spec_path), "warehouse": f"opsloop-duckdb/{name}", "db": str(tmp_path / "wh.duckdb")}


def _table(artifact: Any) -> list[dict[str, Any]]:
    """A table artifact's rows (the API returns the table as JSON text)."""
    import json

    data = artifact.data
    return list(json.loads(data) if isinstance(data, str) else data)


def _artifacts(run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key or f"{a.type}:{a.id}": a for a in arts}


def _ledger(db: str) -> dict[str, dict[str, Any]]:
    from opsloop import costs
    from opsloop.warehouse.duckdb import DuckDBAdapter

    return {r["stage"]: r for r in costs.read_ledger(DuckDBAdapter(Path(db)))}


def test_failed_quality_gate_stops_the_chain_before_the_push(
    run_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nightly_mod, "STAGES", _stages(ingest="ingest_gate_fails", score="score_ok", sync="sync_push"))
    state = nightly_mod.nightly(spec_path=run_env["spec_path"], warehouse=run_env["warehouse"], return_state=True)

    assert state.is_failed() and state.name == "Failed"
    assert [c[0] for c in CALLS] == ["ingest"], "nothing after a failed gate may run"
    msg = state.message or ""
    assert msg.startswith("ingest failed: QualityGateError: transactions: 9.0% of rows failed")
    assert "docs/runbooks.md#data-break" in msg
    assert "prefect deployment run 'ingest/ingest'" in msg
    arts = _artifacts(state.state_details.flow_run_id)
    summary = str(arts["nightly-summary"].data)
    assert "FAILED" in summary and "**ingest failed**" in summary and "#data-break" in summary
    rows = {r["stage"]: r["status"] for r in _table(arts["nightly-stages"])}
    assert rows == {
        "ingest": "failed",
        "train": "skipped",
        "score": "skipped",
        "sync": "skipped",
        "report": "completed",
    }
    ledger = _ledger(run_env["db"])
    assert ledger["ingest"]["status"] == "failed"  # a failed stage is still priced
    assert set(ledger) == {"ingest"}


def test_blocked_gate_ends_blocked_and_never_pushes(run_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        nightly_mod, "STAGES", _stages(ingest="ingest_ok", score="score_drift_blocks", sync="sync_push")
    )
    state = nightly_mod.nightly(spec_path=run_env["spec_path"], warehouse=run_env["warehouse"], return_state=True)

    assert state.is_failed() and state.name == "Blocked"
    assert [c[0] for c in CALLS] == ["ingest", "score"]
    assert "score blocked: drift: PSI 0.41 on mrr" in (state.message or "")
    assert "docs/runbooks.md#drift" in (state.message or "")
    rows = {r["stage"]: r["status"] for r in _table(_artifacts(state.state_details.flow_run_id)["nightly-stages"])}
    assert rows["score"] == "blocked" and rows["sync"] == "skipped"


def test_completed_run_passes_parameters_and_reports(run_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nightly_mod, "STAGES", _stages(ingest="ingest_ok", score="score_ok", sync="sync_push"))
    state = nightly_mod.nightly(
        spec_path=run_env["spec_path"],
        warehouse=run_env["warehouse"],
        mlflow="opsloop-mlflow/elsewhere",
        full_refresh=True,
        sources=["postgres_main"],
        dry_run=True,
        sync_limit=5,
        retrain="never",
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert CALLS == [
        ("ingest", {"full_refresh": True, "sources": ["postgres_main"]}),
        ("score", {"mlflow": "opsloop-mlflow/elsewhere"}),
        ("sync", {"dry_run": True, "limit": 5}),
    ]
    result = state.result()
    assert result["status"] == "completed" and result["stages"]["sync"]["rows_pushed"] == 7
    arts = _artifacts(state.state_details.flow_run_id)
    summary = str(arts["nightly-summary"].data)
    assert "# nightly · customer_ops_ai · completed" in summary
    assert "| rows ingested | 110 |" in summary and "| CRM pushes | 7 |" in summary
    assert "**Cost:** cost $" in summary
    assert any(k.startswith("progress:") for k in arts)
    ledger = _ledger(run_env["db"])
    assert set(ledger) == {"ingest", "score", "sync"}
    assert ledger["ingest"]["rows_ingested"] == 110 and ledger["sync"]["rows_pushed"] == 7
    assert ledger["score"]["model_version"] == "3"
    assert all(r["compute_usd"] > 0 for r in ledger.values())


def test_real_ingest_config_error_names_the_block(run_env: dict[str, str], tmp_path: Path) -> None:
    spec = yaml.safe_load(Path(run_env["spec_path"]).read_text())
    spec_text = yaml.safe_dump(spec).replace("opsloop-postgres/source", "opsloop-postgres/missing-block")
    (tmp_path / "broken.yaml").write_text(spec_text)
    state = nightly_mod.nightly(
        spec_path=str(tmp_path / "broken.yaml"),
        warehouse=run_env["warehouse"],
        sources=["postgres_main"],
        return_state=True,
    )
    assert state.is_failed()
    msg = state.message or ""
    assert "ingest failed: ConfigError" in msg and "opsloop-postgres/missing-block" in msg
    assert "docs/runbooks.md#stage-failed" in msg
    rows = {r["stage"]: r["status"] for r in _table(_artifacts(state.state_details.flow_run_id)["nightly-stages"])}
    assert rows["ingest"] == "failed" and rows["score"] == "skipped" and rows["sync"] == "skipped"
