"""Failure → runbook classification, the nightly summary's formatting, and that every runbook link
anywhere in the repository points at an anchor docs/runbooks.md really has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from opsloop.errors import ConfigError, GateBlockedError, QualityGateError, TerminalError, TransientError
from opsloop.runbooks import RUNBOOKS, advice, classify, runbook_link
from opsloop.runsummary import StageOutcome, final_verdict, flatten, headline, stage_rows, summary_markdown

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "runbooks.md").read_text()


class CrmBudgetExhausted(TerminalError):
    """Stand-in with the CRM layer's class name (classification goes by names, not imports)."""


class CostBudgetExceededError(TerminalError):
    pass


@pytest.mark.parametrize(
    ("stage", "exc", "anchor"),
    [
        ("ingest", QualityGateError("transactions: 9% failed min(amount)"), "data-break"),
        ("sync", GateBlockedError("quality gate of run x failed"), "data-break"),
        ("score", None, "drift"),  # message-only: see below
        ("ingest", TransientError("postgres_main: connection refused (127.0.0.1:5432)"), "source-outage"),
        ("ingest", TransientError("hubspot: 503 Service Unavailable after 5 attempts"), "source-outage"),
        ("train", TransientError("MLflow tracking server http://mlflow:5000 unreachable"), "mlflow-outage"),
        ("score", RuntimeError("cannot load models:/churn@champion from MLflow: timed out"), "mlflow-outage"),
        ("sync", TransientError("salesforce: 503 after 6 attempts"), "crm-outage"),
        ("sync", CrmBudgetExhausted("salesforce.Contact: daily API budget exhausted"), "api-budget-exhausted"),
        ("sync", TerminalError("REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded"), "api-budget-exhausted"),
        ("report", CostBudgetExceededError("run cost $7.2 exceeds costs.budgetPerRunUsd $5"), "cost-overrun"),
        ("ingest", ConfigError("sources[crm].connection: Prefect block 'opsloop-hubspot/x' not found"), "stage-failed"),
        ("train", ValueError("constant target"), "stage-failed"),
    ],
)
def test_classify(stage: str, exc: BaseException | None, anchor: str) -> None:
    message = "drift alert: PSI 0.41 on mrr, policy block_push" if exc is None else ""
    assert classify(stage, exc, message) == anchor


def test_a_runbook_link_in_the_error_wins() -> None:
    err = TerminalError("SLO ingest_p95 breached. Runbook: docs/runbooks.md#slow-stage")
    assert classify("report", err) == "slow-stage"
    assert classify("report", TerminalError("see docs/runbooks.md#no-such-anchor, drift")) == "drift"


def test_cause_chain_is_classified() -> None:
    try:
        try:
            raise ConnectionRefusedError("[Errno 111] Connection refused")
        except OSError as inner:
            raise RuntimeError("reading postgres_main failed") from inner
    except RuntimeError as outer:
        assert classify("ingest", outer) == "source-outage"


def test_advice_message_is_actionable() -> None:
    a = advice("ingest", QualityGateError("x"), rerun="prefect deployment run 'ingest/ingest'")
    msg = a.message("ingest", "QualityGateError: x")
    assert msg.splitlines()[0] == "ingest failed: QualityGateError: x"
    assert "Runbook: docs/runbooks.md#data-break" in msg and msg.endswith("prefect deployment run 'ingest/ingest'")
    with pytest.raises(KeyError):
        runbook_link("nope")


def test_every_runbook_anchor_exists_in_the_doc() -> None:
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC))
    assert set(RUNBOOKS) == anchors
    for anchor in anchors:  # each anchor is followed by its section heading
        assert re.search(rf'<a id="{anchor}"></a>\n## ', DOC), anchor
    for section in ("How it shows up", "What to check", "Fix and rerun"):
        assert DOC.count(f"**{section}**") >= 7, section


def test_every_link_in_the_repo_resolves() -> None:
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC))
    bad = []
    for path in [*REPO.glob("src/opsloop/**/*.py"), *REPO.glob("flows/*.py"), *REPO.glob("tasks/*.py")]:
        for anchor in re.findall(r"runbooks\.md#([a-z0-9-]+)", path.read_text()):
            if anchor not in anchors:
                bad.append(f"{path.relative_to(REPO)}: #{anchor}")
    for path in [*REPO.glob("docs/*.md"), *REPO.glob("pipelines/*.yaml"), REPO / "README.md"]:
        for anchor in re.findall(r"runbooks\.md#([a-z0-9-]+)", path.read_text()):
            if anchor not in anchors:
                bad.append(f"{path.relative_to(REPO)}: #{anchor}")
    assert not bad, bad


def test_flatten_and_headline() -> None:
    result = {
        "rows_read": 10,
        "drift": {"status": "warn", "rows": 5, "features": [1, 2]},
        "destinations": [{"x": 1}],
        "when": None,
    }
    flat = flatten(result)
    assert flat == {
        "rows_read": 10,
        "drift.status": "warn",
        "drift.rows": 5,
        "n_drift.features": 2,
        "n_destinations": 1,
        "when": None,
    }
    outcomes = [
        StageOutcome("ingest", "completed", 1.0, metrics={"rows_read": 1200, "rows_ingested": 1100}),
        StageOutcome("score", "completed", 2.0, metrics={"rows_scored": 900, "drift.status": "ok"}),
        StageOutcome("report", "completed", 0.5, metrics={"total_usd": 0.0123}),
    ]
    assert headline(outcomes) == [
        ("rows read", "1,200"),
        ("rows ingested", "1,100"),
        ("predictions", "900"),
        ("drift", "ok"),
        ("cost", "$0.012300"),
    ]


def test_summary_of_a_failed_run() -> None:
    adv = advice("ingest", QualityGateError("g"), rerun="prefect deployment run 'ingest/ingest'")
    outcomes = [
        StageOutcome("ingest", "failed", 3.0, "r1", "ingest", message="QualityGateError: g", advice=adv),
        StageOutcome("score", "skipped", message="not run: ingest failed"),
        StageOutcome("sync", "skipped", message="not run: ingest failed"),
    ]
    verdict, culprit = final_verdict(outcomes)
    assert verdict == "failed" and culprit is outcomes[0]
    md = summary_markdown("p", outcomes, {"spec_path": "x.yaml", "sources": None}, "cost $0.01")
    assert md.startswith("# nightly · p · FAILED")
    assert "[Data break: a quality gate failed](docs/runbooks.md#data-break)" in md
    assert "`prefect deployment run 'ingest/ingest'`" in md and "`spec_path=x.yaml`" in md and "sources" not in md
    rows = stage_rows(outcomes)
    assert rows[0]["runbook"] == "docs/runbooks.md#data-break" and rows[1]["details"] == "not run: ingest failed"
