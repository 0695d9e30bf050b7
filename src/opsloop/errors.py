"""Error hierarchy: every failure opsloop raises is terminal (do not retry) or transient (retry).

Vendor errors are translated once, at the adapter boundary, with ``raise ... from exc`` and
identifiers (table, block, field, record) in the message. Prefect task retries only fire on
:class:`TransientError` (see ``tasks/_retry.py``).
"""

from __future__ import annotations


class OpsloopError(Exception):
    """Base class for every error opsloop raises on purpose."""


class TerminalError(OpsloopError):
    """Retrying will not help: bad input, bad config, missing privilege, rejected credentials."""


class TransientError(OpsloopError):
    """May succeed on retry: timeouts, 429/5xx, connection resets, backend unavailable."""


class SpecError(TerminalError):
    """A pipeline spec is invalid. ``problems`` holds ``(path, reason)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        super().__init__(f"invalid pipeline spec {source} ({len(problems)} problem(s)):\n{lines}")


class ConfigError(TerminalError):
    """A block, secret or setting is missing or wrong."""


class QualityGateError(TerminalError):
    """Too many rows failed the quality gates; the run stops before MERGE."""


class GateBlockedError(TerminalError):
    """An upstream gate (quality, drift, review) blocks a downstream stage such as the CRM push."""


class InjectedFault(OpsloopError):
    """Raised by :func:`opsloop.faults.checkpoint` when a test asks for a fault at a named point."""
