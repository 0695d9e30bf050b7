"""prefect.yaml and the production packaging, checked without a server: every entrypoint is a Flow,
the Cloud Run job variables satisfy prefect-gcp's cloud-run-v2 template, targets are consistent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments import cloud_run
from deployments.deploy import deployment_names, load_config, target_of, with_prebuilt_image

REPO = Path(__file__).resolve().parents[2]
CONFIG = load_config(REPO / "prefect.yaml")
DEPLOYMENTS = CONFIG["deployments"]
PROD = [d for d in DEPLOYMENTS if target_of(d["name"]) == "prod"]
LOCAL = [d for d in DEPLOYMENTS if target_of(d["name"]) == "local"]
PLACEHOLDER = re.compile(r"\{\{\s*([^}]+?)\s*\}\}")
# what the placeholders resolve to in production (set by `python -m deployments.cloud_run pool`)
PROD_VALUES = {
    "build-image.image": "europe-west3-docker.pkg.dev/acme/opsloop/opsloop:abc123",
    "prefect.variables.opsloop_gcp_region": "europe-west3",
    "prefect.variables.opsloop_runtime_service_account": "opsloop-runner@acme.iam.gserviceaccount.com",
}


def _resolve(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if isinstance(value, str):
        m = PLACEHOLDER.fullmatch(value)
        if m:
            return PROD_VALUES[m.group(1)]
        assert not PLACEHOLDER.search(value), f"partial placeholder in {value!r}"
    return value


@pytest.mark.parametrize("entrypoint", sorted({d["entrypoint"] for d in DEPLOYMENTS}))
def test_every_entrypoint_imports_to_a_flow(entrypoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    fl = load_flow_from_entrypoint(entrypoint)
    assert isinstance(fl, Flow)
    # operators type '<flow>/<deployment>' (e.g. 'ingest/ingest'): the deployment is named after the flow
    for d in DEPLOYMENTS:
        if d["entrypoint"] == entrypoint:
            base = d["name"].removesuffix("-prod")
            assert base == fl.name or base == f"{fl.name}-partition", (d["name"], fl.name)


def test_targets_are_paired_and_consistent() -> None:
    local = set(deployment_names(CONFIG, "local"))
    prod = {n.removesuffix("-prod") for n in deployment_names(CONFIG, "prod")}
    assert local <= prod, f"local deployments without a production twin: {sorted(local - prod)}"
    assert {"nightly", "ingest", "train", "score", "sync", "rollback-model", "cost-report"} <= local
    for d in DEPLOYMENTS:
        limit = d["concurrency_limit"]
        if d["name"].startswith("score-partition"):  # fan-out children of one scoring batch
            assert 1 < limit["limit"] <= 16, d["name"]
        else:
            assert limit["limit"] == 1, d["name"]
        assert "opsloop" in d["tags"] and f"env:{target_of(d['name'])}" in d["tags"], d["name"]
        assert d["description"], d["name"]
    for d in LOCAL:
        assert d["work_pool"]["name"] == "opsloop-local"
        assert d.get("build") is None and d.get("push") is None  # local: no image
        refs = [v for k, v in d["parameters"].items() if k not in ("spec_path", "deployment")]
        assert all("/local" in str(v) or "/" not in str(v) for v in refs), d["name"]
    for d in PROD:
        assert d["work_pool"]["name"] == cloud_run.POOL
        assert d["build"] and d["push"], d["name"]
        assert d["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/opsloop"}}]
        refs = [v for k, v in d["parameters"].items() if isinstance(v, str) and "/" in v and k != "spec_path"]
        assert refs and all(v.endswith(("/prod", "-prod")) for v in refs), f"{d['name']} points at {refs}"
    top_pull = CONFIG["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert top_pull == "{{ $OPSLOOP_REPO }}"
    assert CONFIG["build"] is None and CONFIG["push"] is None


def test_schedules() -> None:
    by = {d["name"]: d for d in DEPLOYMENTS}
    for name in ("nightly", "nightly-prod"):
        (s,) = by[name]["schedules"]
        assert (s["cron"], s["timezone"], s["active"]) == ("0 2 * * *", "Europe/Berlin", True)
    for name in ("ingest", "ingest-prod"):
        got = {s["slug"]: (s["cron"], s["active"], s["parameters"]["sources"]) for s in by[name]["schedules"]}
        assert got == {
            "crm-every-2h": ("0 */2 * * *", False, ["crm_contacts"]),
            "postgres-every-10min": ("*/10 * * * *", False, ["postgres_main"]),
        }
        assert by[name]["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW"
    spec = yaml.safe_load((REPO / "pipelines" / "customer_ops_ai.yaml").read_text())
    ids = {s["id"] for s in spec["sources"]}
    assert {"crm_contacts", "postgres_main"} <= ids  # the schedule parameters name real sources
    assert by["train"]["schedules"][0]["cron"] == "0 4 * * 1"
    assert by["cost-report"]["schedules"][0]["cron"] == "0 6 1 * *"
    # score's fan-out children run as their own deployment: with limit 1 on score they would deadlock
    assert by["score"]["parameters"]["deployment"] == "score/score-partition"
    assert by["score-prod"]["parameters"]["deployment"] == "score/score-partition-prod"


@pytest.mark.parametrize("name", [d["name"] for d in PROD])
def test_cloud_run_job_variables_validate_against_prefect_gcp_template(name: str) -> None:
    from prefect.utilities.schema_tools import validate

    dep = next(d for d in PROD if d["name"] == name)
    job_vars = _resolve(dep["work_pool"]["job_variables"])
    schema = cloud_run.prefect_gcp_template()["variables"]
    unknown = set(job_vars) - set(schema["properties"])
    assert not unknown, f"{name}: keys the cloud-run-v2 template does not know (silently ignored): {unknown}"
    errors = validate(job_vars, schema, raise_on_error=False, ignore_required=True)
    assert not errors, [e.message for e in errors]
    assert {"image", "cpu", "memory", "region", "timeout", "service_account_name", "env"} <= set(job_vars)
    assert not any(k in job_vars for k in ("credentials", "env_from_secrets")), "credentials belong on the pool"
    # a wrong value is caught by the same check (proves the validation is not vacuous)
    bad = validate({**job_vars, "memory": "8 gigs", "timeout": 0}, schema, raise_on_error=False)
    assert {e.path[0] for e in bad} >= {"memory", "timeout"}


def test_prebuilt_image_skips_build_and_push() -> None:
    out = with_prebuilt_image(CONFIG, "registry/img:1")
    for d in out["deployments"]:
        if target_of(d["name"]) == "prod":
            assert d["build"] is None and d["push"] is None
            assert d["work_pool"]["job_variables"]["image"] == "registry/img:1"
    assert CONFIG["deployments"][-1]["build"], "the original config must not be modified"


def test_base_job_template_file_is_current_and_valid() -> None:
    committed = json.loads((REPO / "deployments" / "cloud-run-base-job-template.json").read_text())
    assert committed == json.loads(json.dumps(cloud_run.base_job_template())), (
        "run: python -m deployments.cloud_run template"
    )
    upstream = cloud_run.prefect_gcp_template()
    assert committed["job_configuration"] == upstream["job_configuration"]
    assert set(committed["variables"]["properties"]) == set(upstream["variables"]["properties"])
    assert "$ref" not in json.dumps(committed["variables"]["properties"]["credentials"].get("default", {}))
    with_ref = cloud_run.base_job_template("0b3f2a1c-0000-4000-8000-000000000000")
    assert with_ref["variables"]["properties"]["credentials"]["default"] == {
        "$ref": {"block_document_id": "0b3f2a1c-0000-4000-8000-000000000000"}
    }


def test_dockerfile_is_slim_locked_and_non_root() -> None:
    text = (REPO / "deployments" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1\d-slim", text, re.M)
    assert "uv sync --frozen --no-dev" in text
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    assert "WORKDIR /opt/opsloop" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".opsloop", ".git"} <= set(ignored)
