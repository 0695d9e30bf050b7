"""After deploying both targets of prefect.yaml (local process pool, and the production Cloud Run v2
pool with credentials on the pool's base job template), no deployment stores a secret value.

`prefect deploy` resolves block references inside a deployment's job_variables and stores the
plaintext; a negative control deploys exactly that mistake and proves the check catches it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments import cloud_run
from tests.support.fixtures.core import REPO
from tests.support.fixtures.operations import run_deploy

pytestmark = [pytest.mark.slow]

IMAGE = "europe-west3-docker.pkg.dev/acme/opsloop/opsloop:test"
CREDS = "ops-leak-check"


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{path}.{k}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_leaves(v, f"{path}[{i}]"))
        return out
    return {path: value}


MIN_LEN = 16  # shorter masked values are field-like words ("service_account"), not secret material


def server_secrets() -> set[str]:
    """Every secret value held in a block document on the server (masked vs. unmasked reads)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        masked = {d.id: d.data for d in client.read_block_documents(include_secrets=False)}
        plain = {d.id: d.data for d in client.read_block_documents(include_secrets=True)}
    secrets: set[str] = set()
    for doc_id, data in plain.items():
        hidden = _leaves(masked.get(doc_id, {}))
        for path, value in _leaves(data).items():
            shown = hidden.get(path, next((v for p, v in hidden.items() if path.startswith(p + ".")), None))
            if shown != value and isinstance(value, str):
                secrets.update(line for line in value.splitlines() if len(line) >= MIN_LEN and "-----" not in line)
    return secrets


def leaks() -> dict[str, list[str]]:
    """``flow/deployment -> [where a secret appears]`` over every deployment on the server."""
    from prefect.client.orchestration import get_client

    secrets = server_secrets()
    assert secrets, "the check needs secrets on the server to look for"
    found: dict[str, list[str]] = {}
    with get_client(sync_client=True) as client:
        for dep in client.read_deployments():
            stored = {
                "job_variables": dep.job_variables,
                "parameters": dep.parameters,
                "pull_steps": dep.pull_steps,
            }
            for part, value in stored.items():
                text = json.dumps(value, default=str)
                if any(s in text for s in secrets):
                    found.setdefault(f"{client.read_flow(dep.flow_id).name}/{dep.name}", []).append(part)
    return found


@pytest.fixture(scope="module")
def both_targets(prefect_api: str, local_deployments: dict[str, Any]) -> dict[str, Any]:
    from prefect.blocks.system import Secret
    from prefect_gcp import GcpCredentials

    from blocks.postgres import PostgresConnector
    from tests.flows.test_blocks_standard import _pem

    GcpCredentials(
        service_account_info={
            "type": "service_account",
            "project_id": "acme",
            "private_key_id": "k1",
            "private_key": _pem(),
            "client_email": "deployer@acme.iam.gserviceaccount.com",
            "token_uri": "http://127.0.0.1:9/token",
        }
    ).save(CREDS, overwrite=True)
    PostgresConnector(dsn="postgresql://opsloop:pw-0f9c2e7b1a@db.internal:5432/prod").save(CREDS, overwrite=True)
    Secret(value=f"salt-{uuid.uuid4().hex}").save(CREDS, overwrite=True)
    cloud_run.ensure_pool(cloud_run.POOL, "cloud-run-v2", credentials_block=f"gcp-credentials/{CREDS}")
    cloud_run.set_variables(
        {
            "opsloop_gcp_region": "europe-west3",
            "opsloop_runtime_service_account": "opsloop-runner@acme.iam.gserviceaccount.com",
            "opsloop_image_repository": IMAGE.rsplit(":", 1)[0],
        }
    )
    run_deploy("prod", "--image", IMAGE)
    return local_deployments


def test_no_deployment_stores_a_secret(both_targets: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.utilities.schema_tools import validate

    from deployments.deploy import deployment_names, load_config

    config = load_config()
    with get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments()}
        pool = client.read_work_pool(cloud_run.POOL)
    assert set(deployment_names(config, "prod")) <= set(deps)
    assert set(deployment_names(config, "local")) <= set(deps)
    assert leaks() == {}

    # the credentials stay a reference on the pool, resolved by Prefect only when it submits a job
    creds = pool.base_job_template["variables"]["properties"]["credentials"]["default"]
    assert set(creds) == {"$ref"} and "block_document_id" in creds["$ref"]
    # what landed on the server is a valid cloud-run-v2 job configuration, without placeholders left
    for name in deployment_names(config, "prod"):
        jv = deps[name].job_variables
        assert jv["image"] == IMAGE and jv["region"] == "europe-west3", (name, jv)
        assert jv["service_account_name"] == "opsloop-runner@acme.iam.gserviceaccount.com"
        assert "{{" not in json.dumps(jv)
        assert not validate(jv, pool.base_job_template["variables"], raise_on_error=False, ignore_required=True)
        assert (
            deps[name].parameters["warehouse" if "warehouse" in deps[name].parameters else "mlflow"].endswith("/prod")
        )


def test_the_check_catches_a_block_reference_in_job_variables(both_targets: dict[str, Any], tmp_path: Path) -> None:
    """Negative control: the mistake the design avoids really leaks, and the check sees it."""
    from prefect.client.orchestration import get_client

    bad = {
        "deployments": [
            {
                "name": "leak-demo",
                "entrypoint": "flows/nightly.py:nightly",
                "work_pool": {
                    "name": cloud_run.POOL,
                    "job_variables": {
                        "image": IMAGE,
                        "credentials": f"{{{{ prefect.blocks.gcp-credentials.{CREDS} }}}}",
                    },
                },
                "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/opsloop"}}],
            }
        ]
    }
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(bad))
    import subprocess
    import sys

    from tests.support.fixtures.operations import ops_env

    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "prefect"),
            "--no-prompt",
            "deploy",
            "--prefect-file",
            str(path),
            "-n",
            "leak-demo",
        ],
        cwd=REPO,
        env=ops_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    try:
        assert leaks() == {"nightly/leak-demo": ["job_variables"]}
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(client.read_deployment_by_name("nightly/leak-demo").id)
    assert leaks() == {}
