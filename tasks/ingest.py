"""Ingest tasks: one coarse task per source (a CDC source's tables share one slot, so they go together)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task
from prefect.blocks.core import Block
from prefect.logging import get_run_logger

from blocks import load_warehouse
from opsloop.errors import ConfigError
from opsloop.ingest import SourceReader, ingest_source
from opsloop.spec import PipelineSpec, SourceSpec, load_spec
from tasks.common import TRANSIENT_RETRIES, flow_run_id, run_labels


def _load_block(ref: str, what: str) -> Block:
    try:
        return Block.load(ref)
    except ValueError as exc:
        raise ConfigError(f"{what}: Prefect block {ref!r} not found — create it (make bootstrap): {exc}") from exc


def resolve_salt(spec: PipelineSpec) -> bytes | None:
    """The PII salt from the Prefect ``Secret`` named in ``pii.saltSecretRef`` (None when nothing is hashed)."""
    pii = spec.transform.pii
    if not pii.hash:
        return None
    if not pii.salt_secret_ref:
        raise ConfigError("transform.pii.saltSecretRef: required when pii.hash lists columns")
    ref = pii.salt_secret_ref if "/" in pii.salt_secret_ref else f"secret/{pii.salt_secret_ref}"
    block = _load_block(ref, "transform.pii.saltSecretRef")
    value = block.get() if hasattr(block, "get") else None
    if not value:
        raise ConfigError(f"transform.pii.saltSecretRef: Secret block {ref!r} is empty")
    return str(value).encode("utf-8")


def build_reader(spec: PipelineSpec, source: SourceSpec) -> SourceReader:
    """The core reader of ``source``, built from its connection block."""
    if source.type == "file":
        from opsloop.sources.files import FileSource

        return FileSource(spec, source)
    assert source.connection is not None
    block = _load_block(source.connection, f"sources[{source.id}].connection")
    if source.kind == "postgres":
        if not hasattr(block, "get_source"):
            raise ConfigError(f"sources[{source.id}].connection: {source.connection!r} is not a Postgres connector")
        return block.get_source(spec, source)  # type: ignore[no-any-return]
    if source.kind in ("salesforce", "hubspot"):
        from opsloop.sources.crm import crm_reader

        return crm_reader(spec, source, block)
    raise ConfigError(f"sources[{source.id}]: no reader for {source.type}/{source.kind}")


@task(name="ingest_source", **TRANSIENT_RETRIES)
def ingest_source_task(
    spec_path: str,
    warehouse: str,
    source_id: str,
    full_refresh: bool = False,
    since: datetime | None = None,
) -> dict[str, Any]:
    """Extract → gate → PII → stage → MERGE + state for one source; returns its summary (small)."""
    spec = load_spec(spec_path)
    source = spec.source(source_id)
    wh = load_warehouse(warehouse, **run_labels(spec.name, f"ingest_{source_id}"))
    result = ingest_source(
        wh,
        spec,
        source,
        build_reader(spec, source),
        run_id=flow_run_id(),
        salt=resolve_salt(spec),
        full_refresh=full_refresh,
        since=since,
    )
    log = get_run_logger()
    for warning in result.get("warnings", []):
        log.warning("%s: %s", source_id, warning)
    log.info(
        "%s: read %s, quarantined %s, inserted %s, updated %s, deleted %s",
        source_id,
        result["rows_read"],
        result["rows_quarantined"],
        result["inserted"],
        result["updated"],
        result["deleted"],
    )
    return result
