"""Fixtures of the CRM push tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsloop.warehouse.duckdb import DuckDBAdapter


@pytest.fixture
def wh(tmp_path: Path) -> DuckDBAdapter:
    """An empty DuckDB warehouse file for one test."""
    return DuckDBAdapter(tmp_path / "wh.duckdb")
