"""The standard check every custom block passes: documented, round-trips through a real Prefect
server, and never shows a secret — not in ``repr`` and not in ``prefect block inspect``.

The block list is whatever ``blocks/__init__.py`` exports (a new block is checked automatically)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
import typing
import uuid
from typing import Any

import pytest
from prefect.blocks.core import Block
from pydantic import SecretStr
from pydantic.fields import FieldInfo

import blocks
from tests.support.fixtures.core import REPO

BLOCK_CLASSES: list[type[Block]] = [
    getattr(blocks, n) for n in blocks.__all__ if isinstance(getattr(blocks, n), type) and n[0].isupper()
]
SENTINEL = "s3cr3t-opsloop-"


def _is_secret(ann: Any) -> bool:
    return ann is SecretStr or SecretStr in typing.get_args(ann)


def _sample(name: str, field: FieldInfo) -> Any:
    """A valid value for a field, with a recognisable secret for every SecretStr field."""
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    base = args[0] if typing.get_origin(ann) in (typing.Union, types.UnionType) and args else ann
    if _is_secret(ann):
        return SecretStr(f"{SENTINEL}{name}")
    if isinstance(base, type) and issubclass(base, Block):
        from prefect_gcp import GcpCredentials

        if base is GcpCredentials:
            return GcpCredentials(
                service_account_info={
                    "type": "service_account",
                    "project_id": "acme",
                    "private_key_id": "k1",
                    "private_key": _pem(),
                    "client_email": "opsloop@acme.iam.gserviceaccount.com",
                    "token_uri": "http://127.0.0.1:9/token",
                }
            )
        return base(**{n: _sample(n, f) for n, f in base.model_fields.items() if f.is_required()})
    if base is bool:
        return True
    if base is int:
        return 7
    if base is float:
        return 1.5
    if base is str:
        return f"/tmp/opsloop-block-check/{name}" if name in ("path", "ca_bundle") else f"sample-{name}"
    if typing.get_origin(base) is dict:
        return {"k": "v"}
    if typing.get_origin(base) is list:
        return []
    raise AssertionError(f"no sample for field {name}: {ann}")


@functools.cache
def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _instance(cls: type[Block]) -> Block:
    values = {n: _sample(n, f) for n, f in cls.model_fields.items() if f.is_required() or _is_secret(f.annotation)}
    return cls(**values)


def _secrets(block: Block) -> list[str]:
    out = []
    for name, field in type(block).model_fields.items():
        value = getattr(block, name)
        if isinstance(value, SecretStr):
            out.append(value.get_secret_value())
        elif isinstance(value, Block):
            out += _secrets(value)
            info = getattr(value, "service_account_info", None)
            if info is not None:
                out.append(info.get_secret_value()["private_key"].splitlines()[1])  # a line of the key
        del field
    return out


def test_every_block_class_is_checked() -> None:
    slugs = {c.get_block_type_slug() for c in BLOCK_CLASSES}
    assert {"opsloop-duckdb", "opsloop-bigquery", "opsloop-postgres", "opsloop-mlflow"} <= slugs
    with_secrets = {c.__name__ for c in BLOCK_CLASSES if _secrets(_instance(c))}
    assert {"PostgresConnector", "BigQueryConnector", "MLflowConnector"} <= with_secrets


@pytest.mark.parametrize("cls", BLOCK_CLASSES, ids=lambda c: c.__name__)
def test_block_is_documented(cls: type[Block]) -> None:
    assert (cls.get_description() or "").strip(), f"{cls.__name__}: no _description"
    assert (cls.__doc__ or "").strip(), f"{cls.__name__}: no docstring"
    undocumented = [n for n, f in cls.model_fields.items() if not (f.description or "").strip()]
    assert not undocumented, f"{cls.__name__}: fields without description: {undocumented}"
    assert cls.get_block_type_slug().startswith("opsloop-")


@pytest.mark.slow
def test_blocks_round_trip_and_mask_secrets(prefect_api: str) -> None:
    from deployments.bootstrap import register_types

    register_types()
    name = f"std-{uuid.uuid4().hex[:8]}"
    saved: dict[str, tuple[Block, list[str]]] = {}
    for cls in BLOCK_CLASSES:
        block = _instance(cls)
        secrets = _secrets(block)
        for s in secrets:
            assert s not in repr(block), f"{cls.__name__}: secret visible in repr"
            assert s not in str(block), f"{cls.__name__}: secret visible in str"
        block.save(name, overwrite=True)
        loaded = cls.load(name)
        assert loaded.model_dump() == block.model_dump(), f"{cls.__name__}: save/load changed the document"
        assert _secrets(loaded) == secrets, f"{cls.__name__}: secret values did not survive save/load"
        saved[cls.get_block_type_slug()] = (loaded, secrets)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {
        slug: subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "prefect"), "block", "inspect", f"{slug}/{name}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for slug in saved
    }
    for slug, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"prefect block inspect {slug}/{name} failed:\n{out}"
        assert name in out
        for s in saved[slug][1]:
            assert s not in out, f"prefect block inspect {slug}/{name} shows a secret"
        if saved[slug][1]:
            assert "********" in out, f"{slug}: no masked field in:\n{out}"


@pytest.mark.slow
def test_bootstrap_is_idempotent_and_keeps_the_salt(prefect_api: str, tmp_path: Any) -> None:
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from deployments.bootstrap import PII_SALT, bootstrap, required_blocks
    from opsloop.devstack.stack import WORK_POOL, LocalStack

    stack = LocalStack(home=tmp_path, repo=REPO, pg_port=1, mlflow_port=2, sandbox_port=3)
    first = bootstrap(stack)
    salt = Secret.load(PII_SALT).get()
    second = bootstrap(stack)
    assert Secret.load(PII_SALT).get() == salt, "the PII salt must never be replaced"
    assert f"secret/{PII_SALT}" not in second["documents"]
    assert set(first["block_types"]) == {c.get_block_type_slug() for c in BLOCK_CLASSES}
    need = required_blocks("pipelines/customer_ops_ai.yaml", "opsloop-duckdb/local", "opsloop-mlflow/local")
    assert set(need) <= {*first["documents"], f"secret/{PII_SALT}"}, "bootstrap must create every local block"
    assert Block.load("opsloop-duckdb/local").path == str(tmp_path / "warehouse.duckdb")  # type: ignore[attr-defined]
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(WORK_POOL).type == "process"
