"""Which runbook a failure belongs to, and what an operator should do next.

Flows turn a failed stage into one message an operator can act on: what broke, the runbook
section (``docs/runbooks.md#<anchor>``; the anchors are stable, other docs and specs link to them)
and the exact command that reruns the right thing. Classification looks at the stage, the
exception's class names (so no stage module has to be imported here) and its message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

RUNBOOK_DOC = "docs/runbooks.md"

# anchor → title; the order is the order of docs/runbooks.md
RUNBOOKS: dict[str, str] = {
    "data-break": "Data break: a quality gate failed",
    "drift": "Drift: features or scores moved away from the training baseline",
    "source-outage": "Source outage: Postgres / Salesforce / HubSpot cannot be read",
    "mlflow-outage": "MLflow outage: tracking server or registry unreachable",
    "crm-outage": "CRM outage: the push to Salesforce / HubSpot fails",
    "api-budget-exhausted": "API budget exhausted: the CRM push stopped at its daily budget",
    "cost-overrun": "Cost overrun: a run cost more than its budget",
    "slow-stage": "Slow stage: a stage breached its p95 duration SLO",
    "failed-runs": "Failed runs: the failure-rate SLO is breached",
    "stage-failed": "Any other stage failure (configuration, bug)",
    "erasure-request": "Erasure request: forget one data subject (GDPR Art. 17)",
}


def runbook_link(anchor: str) -> str:
    if anchor not in RUNBOOKS:
        raise KeyError(f"unknown runbook anchor {anchor!r}; known: {sorted(RUNBOOKS)}")
    return f"{RUNBOOK_DOC}#{anchor}"


@dataclass(frozen=True)
class Advice:
    """What an operator reads in the failed run's message and the nightly summary."""

    anchor: str
    title: str
    action: str
    rerun: str

    @property
    def link(self) -> str:
        return runbook_link(self.anchor)

    def message(self, stage: str, error: str, status: str = "failed") -> str:
        return (
            f"{stage} {status}: {error}\n"
            f"What to do: {self.action}\n"
            f"Runbook: {self.link} ({self.title})\n"
            f"Then rerun: {self.rerun}"
        )


_LINK = re.compile(r"runbooks\.md#([a-z0-9-]+)")
_OUTAGE_WORDS = (
    "unreachable",
    "timed out",
    "timeout",
    "connection refused",
    "connection reset",
    "could not connect",
    "connection error",
    "unavailable",
    " 503",
    " 502",
    " 504",
)
_SOURCE_WORDS = ("postgres", "salesforce", "hubspot", "source", "replication slot", "psycopg")


def _names(exc: BaseException | None) -> set[str]:
    """Class names of the exception, its bases and its causes (walks ``__cause__`` / ``__context__``)."""
    out: set[str] = set()
    seen: set[int] = set()
    cur = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.update(c.__name__ for c in type(cur).__mro__)
        cur = cur.__cause__ or cur.__context__
    return out


def _has(text: str, words: Iterable[str]) -> bool:
    return any(w in text for w in words)


def classify(stage: str, exc: BaseException | None, message: str = "") -> str:
    """The runbook anchor for a failure of ``stage`` (``ingest``, ``train``, ``score``, ``sync``, ``cost``)."""
    names = _names(exc)
    kinds = " ".join(n.lower() for n in names)
    text = f"{message} {exc or ''}".lower()
    linked = [a for a in _LINK.findall(text) if a in RUNBOOKS]
    if linked:  # the error already names its runbook (SLO breaches, cost budget)
        return linked[0]
    if "QualityGateError" in names:
        return "data-break"
    if "request_limit_exceeded" in text or ("budget" in kinds and "cost" not in kinds):
        return "api-budget-exhausted"
    if "budget" in text and _has(text, ("api call", "api budget", "calls left", "quota", "daily limit")):
        return "api-budget-exhausted"
    if "cost" in kinds or ("cost" in text and _has(text, ("budget", "overrun", "exceed"))):
        return "cost-overrun"
    if "drift" in text or "drift" in kinds:
        return "drift"
    if "GateBlockedError" in names:
        return "data-break"
    if "ConfigError" in names or "SpecError" in names:
        return "stage-failed"
    if "mlflow" in text:
        return "mlflow-outage"
    transient = bool(names & {"TransientError", "ConnectionError", "TimeoutError"}) or _has(text, _OUTAGE_WORDS)
    if stage == "sync" and (transient or _has(text, ("salesforce", "hubspot", "crm"))):
        return "crm-outage"
    if transient and (stage == "ingest" or _has(text, _SOURCE_WORDS)):
        return "source-outage"
    return "stage-failed"


_ACTIONS: dict[str, str] = {
    "data-break": (
        "open the ingest run's summary artifact (quarantined rows by rule), inspect ops_ai._quarantine for this "
        "run id, fix the source or relax the rule in the spec; nothing was merged or pushed."
    ),
    "drift": (
        "open the score run's drift artifact (PSI per feature); if the shift is real, retrain "
        "(nightly with retrain=always) or push anyway after review; if the data is broken, treat it as a data break."
    ),
    "source-outage": (
        "check the source is reachable with the credentials in its block (prefect block inspect …); "
        "incremental state was not advanced, so a rerun resumes where the last good run stopped."
    ),
    "mlflow-outage": (
        "check the MLflow tracking URI in the opsloop-mlflow block answers (/health); scoring falls back to "
        "`previous` or the rules score only when the spec allows it."
    ),
    "crm-outage": (
        "check the CRM's status page and the sync run's artifact (failed by error code); records not "
        "confirmed stay queued in _sync_log and are retried by the next sync."
    ),
    "api-budget-exhausted": (
        "the push stopped cleanly before the daily API budget; the rest is retried tomorrow, or raise "
        "sync.apiBudgetShare in the spec, or rerun sync with a limit after the quota resets."
    ),
    "cost-overrun": (
        "open the run's cost table artifact (BigQuery bytes billed, compute seconds, API calls per stage); "
        "find the stage that grew and check for a full refresh or a missing partition filter."
    ),
    "slow-stage": "compare the stage's duration with its row counts in the KPI table; scale the work pool or fan out.",
    "failed-runs": "list the failed runs in the Prefect UI (filter by tag opsloop) and follow each one's runbook.",
    "stage-failed": (
        "read the stage's log and error: a ConfigError names the block or setting to fix "
        "(make bootstrap creates the local ones); anything else is a bug to report with the flow run link."
    ),
}


def advice(stage: str, exc: BaseException | None, message: str = "", rerun: str = "") -> Advice:
    anchor = classify(stage, exc, message)
    return Advice(anchor, RUNBOOKS[anchor], _ACTIONS[anchor], rerun or "prefect deployment run 'nightly/nightly'")
