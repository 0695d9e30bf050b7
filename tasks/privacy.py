"""Thin tasks of the erasure flow (``flows/forget_subject.py``); the work is in :mod:`opsloop.privacy`
and :mod:`opsloop.crm.erase`. Raw identifiers pass between these tasks in memory only: no result is
persisted, nothing is cached, and error messages name the subject by its pseudonym."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.blocks.core import Block
from prefect.cache_policies import NO_CACHE

from blocks import load_warehouse
from opsloop import privacy
from opsloop.crm.erase import clear_destination
from opsloop.errors import ConfigError
from opsloop.spec import PipelineSpec, load_spec
from opsloop.transform.pii import KeyedHasher
from tasks.common import TRANSIENT_RETRIES, run_labels

PRIVATE: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def erasure_hasher(spec: PipelineSpec) -> KeyedHasher:
    """The pipeline's keyed hash (``transform.pii.saltSecretRef``), the one ingest hashes e-mails with."""
    ref = spec.transform.pii.salt_secret_ref
    if not ref:
        raise ConfigError(
            "forget-subject: transform.pii.saltSecretRef is required — erased subjects are matched and "
            "suppressed by keyed hash, never stored raw"
        )
    ref = ref if "/" in ref else f"secret/{ref}"
    try:
        block = Block.load(ref)
    except ValueError as exc:
        raise ConfigError(f"transform.pii.saltSecretRef: Prefect block {ref!r} not found: {exc}") from None
    value = block.get() if hasattr(block, "get") else None
    if not value:
        raise ConfigError(f"transform.pii.saltSecretRef: Secret block {ref!r} is empty")
    return KeyedHasher(str(value).encode("utf-8"))


@task(name="find_subject", **PRIVATE)
def find_subject(
    spec_path: str,
    warehouse: str,
    entity_key: str | None,
    email: str | None,
    email_hash: str | None,
    subject_hash: str | None,
) -> privacy.Subject:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "find_subject"))
    return privacy.find_subject(
        wh,
        spec,
        erasure_hasher(spec),
        entity=entity_key,
        email=email,
        email_hash=email_hash,
        subject_hash=subject_hash,
    )


@task(name="suppress_subject", **PRIVATE)
def suppress_subject(spec_path: str, warehouse: str, subject: privacy.Subject, erasure_id: str) -> int:
    """Add the subject's hashes to the suppression list ingest consults (before anything is erased)."""
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "suppress_subject"))
    return privacy.suppress(wh, spec, subject, erasure_id)


@task(name="clear_crm_fields", **PRIVATE, **TRANSIENT_RETRIES)
def clear_crm_fields(spec_path: str, destination: str, subject: privacy.Subject) -> dict[str, Any]:
    """Clear the AI fields of the subject's records in one CRM destination (found by external id)."""
    spec = load_spec(spec_path)
    dest = next((d for d in spec.reverse_etl() if d.name == destination), None)
    if dest is None:
        raise ConfigError(f"{spec_path}: no reverse_etl destination {destination!r}")
    ref = str(dest.connection)
    try:
        block = Block.load(ref)
    except ValueError as exc:
        raise ConfigError(f"CRM block {ref!r} not found: {exc}") from None
    if not hasattr(block, "get_client"):
        raise ConfigError(f"block {ref!r} is a {type(block).__name__}, not a CRM credentials block")
    return clear_destination(dest, block.get_client(), ref, subject.keys, subject.pseudonym).as_dict()


@task(name="erase_warehouse_rows", **PRIVATE, **TRANSIENT_RETRIES)
def erase_warehouse_rows(spec_path: str, warehouse: str, subject: privacy.Subject, dry_run: bool) -> dict[str, int]:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "erase_warehouse_rows"))
    return privacy.erase_rows(wh, spec, subject, dry_run=dry_run)


@task(name="record_erasure", **PRIVATE)
def record_erasure(spec_path: str, warehouse: str, row: dict[str, Any]) -> None:
    spec = load_spec(spec_path)
    wh = load_warehouse(warehouse, **run_labels(spec.name, "record_erasure"))
    privacy.record_erasure(wh, {**row, "pipeline": spec.name})
