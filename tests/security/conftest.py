"""The sentinel stack: the whole loop on the embedded stack with a known, unique *sentinel* value in
every secret and known sentinel PII in the source, run once per session through the local
``nightly`` deployment (process worker), so the security tests can scan everything it wrote.

* Postgres: its own role ``opsloop_sentinel`` that must authenticate with a sentinel password
  (``scram-sha-256`` lines for that role only, prepended to the session cluster's pg_hba.conf;
  every other role keeps ``trust``), owning its own source database (CDC publication + slot).
* CRM sandbox: its own process that accepts only the sentinel Salesforce session / refresh token
  and HubSpot token; the Salesforce block authenticates by the OAuth refresh flow (client id,
  secret and refresh token are sentinels too; the sandbox answers with the sentinel session id).
* MLflow block with a sentinel bearer token; PII salt Secret with a sentinel value; a BigQuery
  block whose GcpCredentials hold a sentinel service-account key (used by one failing run and by
  the production work pool as its credentials ``$ref``).
* Source PII: customer C0000007 (quarantined: negative MRR), the erasure subject C0000042 (with a
  quarantined transaction) and one HubSpot contact carry unique e-mails, phones and names.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from opsloop.devstack.postgres import PgCluster
from tests.support.fixtures.core import REPO, TEST_HOME

TAG = "sentinel"
ROLE = "opsloop_sentinel"
SLOT = "opsloop_sentinel"
N_CUSTOMERS = 400


def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


PEM = _pem()
SECRETS: dict[str, str] = {
    "postgres password": "pgpw-Sntl-4c1d9e7a2b",
    "salesforce session id": "00DSNTL!sess-8b2f61c0d4e5",
    "salesforce client id": "3MVG9Sntl-client-5e0a7b11",
    "salesforce client secret": "sfsecret-Sntl-91d2c3f8",
    "salesforce refresh token": "5Aep861Sntl-refresh-77f0aa",
    "hubspot token": "pat-eu1-Sntl-2a6e9f13c7",
    "mlflow token": "mlflow-Sntl-token-0c9b44e1",
    "pii salt": "salt-Sntl-6f8e2d1b9a",
    "gcp private key id": "pkid-Sntl-3e7a90c2d1",
}
# every base64 line of the sentinel private key is a secret on its own
SECRETS.update({f"gcp private key line {i}": line for i, line in enumerate(PEM.splitlines()) if "-----" not in line})


@dataclass(frozen=True)
class Person:
    customer_id: str
    email: str
    phone: str
    first: str
    last: str

    @property
    def full_name(self) -> str:
        return f"{self.first} {self.last}"

    def raw_pii(self) -> dict[str, str]:
        """Raw forms the spec masks or hashes (e-mail, phone): these may appear nowhere."""
        digits = "".join(ch for ch in self.phone if ch.isdigit())
        local = self.email.split("@", 1)[0]
        return {"email": self.email, "email local part": local, "phone": self.phone, "phone digits": digits}


PII_CUSTOMER = Person("C0000007", "Zelda.Quokka-7f3a@pii-probe.example", "+49 151 2345 6789", "Zelda", "Quokkaberg")
SUBJECT = Person("C0000042", "Erik.Erasure-42b@subject-probe.example", "+49 170 4200 4299", "Erik", "Erasmussen")
HUBSPOT_CONTACT = Person("", "Yara.Pangolin-91c@pii-probe.example", "+33 6 1234 5678", "Yara", "Pangolinska")
PEOPLE = (PII_CUSTOMER, SUBJECT, HUBSPOT_CONTACT)


@dataclass
class SentinelStack:
    spec_path: str
    warehouse: str
    mlflow: str
    bigquery: str
    source_dsn: str
    sandbox_url: str
    warehouse_file: Path
    mlflow_url: str
    experiment: str
    model_name: str
    worker_log: Path
    started: datetime
    runs: list[UUID] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # output of commands the tests ran (prefect deploy)

    def parameters(self, **extra: Any) -> dict[str, Any]:
        return {"spec_path": self.spec_path, "warehouse": self.warehouse, "mlflow": self.mlflow, **extra}

    def sandbox(self) -> Any:
        from sandbox.client import SandboxClient

        return SandboxClient(self.sandbox_url)


def password_role(cluster: PgCluster, role: str, password: str, dbname: str) -> str:
    """A login + replication role that must present ``password`` (scram) and owns ``dbname``."""
    import psycopg
    from psycopg import sql

    hba = cluster.data / "pg_hba.conf"
    lines = [
        f"host all {role} 127.0.0.1/32 scram-sha-256\n",
        f"host replication {role} 127.0.0.1/32 scram-sha-256\n",
    ]
    text = hba.read_text()
    if lines[0] not in text:
        hba.write_text("".join(lines) + text)  # first match wins: only this role needs a password
    with psycopg.connect(cluster.dsn(), autocommit=True) as con:
        con.execute("SET password_encryption = 'scram-sha-256'")
        if con.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            con.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
        con.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        if con.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is None:
            con.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(role)))
        con.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    return f"postgresql://{role}:{password}@127.0.0.1:{cluster.port}/{dbname}"


def seed_source(dsn: str) -> None:
    import psycopg

    from opsloop import demodata

    demodata.seed(dsn, N_CUSTOMERS)
    with psycopg.connect(dsn, autocommit=True) as con:
        for p in (PII_CUSTOMER, SUBJECT):
            con.execute(
                "UPDATE customers SET email = %s, phone = %s, full_name = %s, updated_at = now() "
                "WHERE customer_id = %s",
                (p.email, p.phone, p.full_name, p.customer_id),
            )
        # a quality gate (customers.mrr ≥ 0, added to the spec copy) quarantines the PII customer's row
        con.execute("UPDATE customers SET mrr = -1 WHERE customer_id = %s", (PII_CUSTOMER.customer_id,))
        # and the subject gets a quarantined transaction (negative amount)
        con.execute(
            "INSERT INTO transactions (event_id, customer_id, amount, currency, event_time, updated_at) "
            "VALUES ('E-SNTL-1', %s, -5.00, 'EUR', now() - interval '1 hour', now())",
            (SUBJECT.customer_id,),
        )


def sentinel_spec(dest: Path, renames: dict[str, str], model_name: str) -> Path:
    data = yaml.safe_load((REPO / "pipelines" / "customer_ops_ai.yaml").read_text())
    text = yaml.safe_dump(data, sort_keys=False)
    for old, new in renames.items():
        text = text.replace(old, new)
    data = yaml.safe_load(text)
    data["cdc"].update({"slotName": SLOT, "publication": SLOT})
    data["model"]["name"] = model_name  # its own registered model on the shared MLflow server
    data["model"]["params"]["n_estimators"] = 60
    data["transform"]["qualityChecks"].append({"column": "mrr", "rule": "min", "value": 0, "tables": ["customers"]})
    data.pop("slos", None)  # SLOs judge run history, not what this stack is for
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def run_deployment(name: str, parameters: dict[str, Any], timeout: float = 900) -> Any:
    """Create a run of deployment ``flow/deployment`` (what the UI's Custom run sends) and wait for it."""
    from prefect.client.orchestration import get_client

    from tests.support.fixtures.operations import wait_for_run

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(name)
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters, name=f"{TAG}-{name.split('/')[0]}")
    return wait_for_run(run.id, timeout=timeout)


@pytest.fixture(scope="session")
def sentinel_stack(
    prefect_api: str,
    pg_cluster: PgCluster,
    mlflow_server: str,
    local_deployments: dict[str, UUID],
    local_worker: Any,
) -> Iterator[SentinelStack]:
    from prefect.blocks.system import Secret
    from prefect_gcp import GcpCredentials
    from pydantic import SecretStr

    from blocks.crm import HubSpotCredentials, SalesforceCredentials
    from blocks.mlflow import MLflowConnector
    from blocks.postgres import PostgresConnector
    from blocks.warehouse import BigQueryConnector, DuckDBConnector
    from deployments.bootstrap import register_types
    from sandbox.client import SandboxServer

    started = datetime.now(UTC)
    base = Path(tempfile.mkdtemp(prefix="opsloop-sentinel-", dir=TEST_HOME))
    dsn = password_role(pg_cluster, ROLE, SECRETS["postgres password"], "sentinel_source")
    seed_source(dsn)

    server = SandboxServer.start(base / "sandbox", extra_args=["--hubspot-ten-second-limit", "0"])
    sbx = server.client()
    sbx.settings(
        salesforce_tokens=[SECRETS["salesforce session id"]],
        hubspot_tokens=[SECRETS["hubspot token"]],
        oauth_refresh_tokens=[SECRETS["salesforce refresh token"]],
    )
    sbx.seed("salesforce", "Contact", N_CUSTOMERS)
    h = HUBSPOT_CONTACT
    sbx.load("hubspot", "contacts", [{"email": h.email, "phone": h.phone, "firstname": h.first, "lastname": h.last}])

    register_types()
    wh_file = base / "warehouse.duckdb"
    DuckDBConnector(path=str(wh_file)).save(TAG, overwrite=True)
    MLflowConnector(tracking_uri=mlflow_server, experiment=TAG, token=SecretStr(SECRETS["mlflow token"])).save(
        TAG, overwrite=True
    )
    PostgresConnector(dsn=SecretStr(dsn)).save(TAG, overwrite=True)
    Secret(value=SECRETS["pii salt"]).save(f"{TAG}-salt", overwrite=True)
    SalesforceCredentials(
        client_id=SecretStr(SECRETS["salesforce client id"]),
        client_secret=SecretStr(SECRETS["salesforce client secret"]),
        refresh_token=SecretStr(SECRETS["salesforce refresh token"]),
        base_url=server.url,
        login_url=server.url,
    ).save(TAG, overwrite=True)
    HubSpotCredentials(access_token=SecretStr(SECRETS["hubspot token"]), base_url=server.url).save(TAG, overwrite=True)
    creds = GcpCredentials(
        service_account_info={
            "type": "service_account",
            "project_id": "sentinel-project",
            "private_key_id": SECRETS["gcp private key id"],
            "private_key": PEM,
            "client_email": "opsloop-sentinel@sentinel-project.iam.gserviceaccount.com",
            "token_uri": f"{server.url}/services/oauth2/token",  # answers 400 invalid_grant: fails fast
        }
    )
    creds.save(TAG, overwrite=True)
    BigQueryConnector(gcp_credentials=creds, project="sentinel-project", location="EU").save(TAG, overwrite=True)

    model = "customer_churn_sentinel"
    renames = {
        "secret/opsloop-pii-salt": f"secret/{TAG}-salt",
        "opsloop-postgres/source": f"opsloop-postgres/{TAG}",
        "opsloop-salesforce/sandbox": f"opsloop-salesforce/{TAG}",
        "opsloop-hubspot/sandbox": f"opsloop-hubspot/{TAG}",
    }
    spec = sentinel_spec(base / "customer_ops_ai.yaml", renames, model)
    stack = SentinelStack(
        str(spec),
        f"opsloop-duckdb/{TAG}",
        f"opsloop-mlflow/{TAG}",
        f"opsloop-bigquery/{TAG}",
        dsn,
        server.url,
        wh_file,
        mlflow_server,
        TAG,
        model,
        local_worker.logfile,
        started,
    )
    run = run_deployment("nightly/nightly", stack.parameters(retrain="always"))
    stack.runs.append(run.id)
    assert run.state.is_completed(), f"nightly ended {run.state.name}: {run.state.message}"
    yield stack
    server.stop()
    shutil.rmtree(base / "sandbox", ignore_errors=True)


# -- reading back what the loop wrote ------------------------------------------------------------


def warehouse_text(path: Path) -> dict[str, str]:
    """Every table of the DuckDB warehouse as text (all columns cast to VARCHAR), by schema.table."""
    import duckdb

    out: dict[str, str] = {}
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = current_database()"
        ).fetchall()
        for schema, table in tables:
            cols = [r[0] for r in con.execute(f'DESCRIBE "{schema}"."{table}"').fetchall()]
            exprs = ", ".join(f'CAST("{c}" AS VARCHAR)' for c in cols)
            rows = con.execute(f'SELECT {exprs} FROM "{schema}"."{table}"').fetchall()
            out[f"{schema}.{table}"] = "\n".join("\t".join("" if v is None else v for v in r) for r in rows)
    finally:
        con.close()
    return out


def mlflow_text(url: str, experiment: str, model: str, dest: Path) -> dict[str, str]:
    """Params, tags, metrics and every artifact (downloaded) of the experiment's runs, plus the
    registered model's version tags — as text by where it came from."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, str] = {}
    if exp is None:
        return out
    for run in client.search_runs([exp.experiment_id], max_results=500):
        rid = run.info.run_id
        out[f"run {rid} params"] = json.dumps(run.data.params)
        out[f"run {rid} tags"] = json.dumps(run.data.tags)
        out[f"run {rid} metrics"] = json.dumps(run.data.metrics)
        local = Path(mlflow.artifacts.download_artifacts(run_id=rid, dst_path=str(dest / rid), tracking_uri=url))
        for f in local.rglob("*"):
            if f.is_file():
                out[f"run {rid} artifact {f.relative_to(local)}"] = f.read_bytes().decode("latin-1")
    for mv in client.search_model_versions(f"name = '{model}'"):
        out[f"model {model} v{mv.version} tags"] = json.dumps(mv.tags)
        out[f"model {model} v{mv.version} description"] = str(mv.description or "")
    for lm in client.search_logged_models([exp.experiment_id]):
        out[f"logged model {lm.model_id}"] = json.dumps(
            {"params": lm.params, "tags": lm.tags, "metrics": [str(m) for m in lm.metrics or []]}, default=str
        )
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=lm.artifact_location, dst_path=str(dest / lm.model_id), tracking_uri=url
            )
        )
        for f in local.rglob("*"):
            if f.is_file():
                out[f"logged model {lm.model_id} artifact {f.relative_to(local)}"] = f.read_bytes().decode("latin-1")
    return out


def prefect_artifacts_text(since: datetime, flow_run_ids: list[UUID] | None = None) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)) if flow_run_ids else None
    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            page = client.read_artifacts(artifact_filter=flt, limit=200, offset=offset)
            for a in page:
                if a.created is not None and a.created < since:
                    continue
                out[f"artifact {a.key or a.type}:{a.id}"] = json.dumps(
                    {"key": a.key, "description": a.description, "data": a.data, "metadata": a.metadata_},
                    default=str,
                )
            if len(page) < 200:
                return out
            offset += 200


def descendants(root: UUID) -> list[UUID]:
    """``root`` and every flow run below it (subflows, and runs their tasks started)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    out, todo = [root], [root]
    with get_client(sync_client=True) as client:
        while todo:
            kids = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo))
            )
            todo = [k.id for k in kids if k.id not in out]
            out += todo
    return out
