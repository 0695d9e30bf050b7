"""The warehouse contract runs once per adapter. ``WAREHOUSE_PARAMS`` lists the adapters; the
BigQuery ones come from tests/support/fixtures/bigquery.py (emulator, and real BigQuery = remote)."""

from __future__ import annotations

import pytest

WAREHOUSE_PARAMS = [
    pytest.param("duckdb", id="duckdb"),
    pytest.param("bigquery_emulator", id="bigquery-emulator", marks=pytest.mark.slow),
    pytest.param("bigquery_remote", id="bigquery-remote", marks=pytest.mark.remote),
]


@pytest.fixture(params=WAREHOUSE_PARAMS)
def wh(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A fresh, empty warehouse of each kind (unique datasets per test on shared backends)."""
    kind = request.param
    if kind == "duckdb":
        return request.getfixturevalue("duckdb_wh")
    return request.getfixturevalue(f"{kind}_wh")
