"""Browser test: an operator starts a custom nightly run from the Prefect UI and watches it complete.

Debian's headless ``chromium`` (tests/support/deps.d/20-chromium.sh) driven by the Python
``playwright`` package with ``executable_path=/usr/bin/chromium`` — never ``playwright install``.
Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest

from opsloop.devstack.process import Service
from tests.support.browser import SHOTS, chromium
from tests.support.fixtures.operations import OpsStack, wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def page(prefect_api: str) -> Iterator[Any]:
    with chromium() as browser:
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg


def _field(pg: Any, label: str, tag: str) -> Any:
    """The form control right after a parameter's label in the custom-run form."""
    match = f"normalize-space()='{label}' or starts-with(normalize-space(), '{label} (')"
    return pg.locator(f"xpath=//label[{match}]/following::{tag}[1]")


def test_custom_run_from_the_ui(
    page: Any, prefect_api: str, local_deployments: dict[str, UUID], local_worker: Service, ops_stack: OpsStack
) -> None:
    from playwright.sync_api import expect
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    ui = prefect_api.removesuffix("/api")
    run_name = f"ui-custom-{int(time.time())}"

    # find the nightly deployment in the deployments list
    page.goto(f"{ui}/deployments", wait_until="networkidle")
    page.locator('a[href*="/deployments/deployment/"]').filter(has_text=re.compile(r"^nightly$")).first.click()
    page.wait_for_url("**/deployments/deployment/**")
    page.get_by_text("flows/nightly.py:nightly").first.wait_for()

    # Run → Custom run → the parameter form
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url("**/run?**")
    page.get_by_text("Validate parameters").wait_for()
    _field(page, "Run Name", "input").fill(run_name)
    _field(page, "spec_path", "textarea").fill(ops_stack.spec_path)
    _field(page, "warehouse", "textarea").fill(ops_stack.warehouse)
    _field(page, "mlflow", "textarea").fill(ops_stack.mlflow)
    dry_run = _field(page, "dry_run", "*[@role='switch']")
    expect(dry_run).to_have_attribute("aria-checked", "false")  # the flow's default
    dry_run.click()
    expect(dry_run).to_have_attribute("aria-checked", "true")  # retried: the switch re-renders after the click
    page.screenshot(path=str(SHOTS / "prefect-ui-custom-run-form.png"), full_page=True)
    page.get_by_role("button", name="Submit").click()

    # Submit shows a "View run" toast for 5 s and routes back to the deployment's Runs tab. On a
    # loaded machine the toast can be gone (or leaving) before a click lands — CI once saw the click
    # do nothing — so open the run as an operator who missed the toast does: from the Runs tab.
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]+(\?[^/]*)?$"))
    with get_client(sync_client=True) as client:
        created = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
    assert len(created) == 1, f"the UI's Submit created {len(created)} runs named {run_name}"
    page.locator('a[href*="/runs/flow-run/"]').filter(has_text=run_name).first.click()
    page.wait_for_url("**/runs/flow-run/**")
    run_id = UUID(page.url.rstrip("/").split("/")[-1].split("?")[0])
    assert run_id == created[0].id
    # the run's own state badge in the page heading (subflow / task badges elsewhere do not count)
    page.locator(".page-heading-flow-run .state-badge.state--completed").wait_for(timeout=900_000)
    page.get_by_text(run_name).first.wait_for()
    page.screenshot(path=str(SHOTS / "prefect-ui-nightly-completed.png"), full_page=True)

    run = wait_for_run(run_id, timeout=60)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    assert run.name == run_name
    assert run.parameters["dry_run"] is True
    assert run.parameters["spec_path"] == ops_stack.spec_path
    with get_client(sync_client=True) as client:
        same = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
    assert [r.id for r in same] == [run_id]
    assert (SHOTS / "prefect-ui-nightly-completed.png").stat().st_size > 20_000
