"""The erasure flow (GDPR Art. 17): forget one data subject everywhere opsloop wrote it.

    prefect deployment run 'forget-subject/forget-subject' --param entity_key=C0000042 \\
        --param reason="ticket DPO-123" --param requested_by="dpo@example.com"

Order: find the subject → add its keyed hashes to the suppression list (ingest skips it from now
on) → clear the AI fields in every CRM destination → delete its warehouse rows (``_sync_log``
keeps pseudonymised rows) → audit row in ``_erasure_log`` → ``forget-subject`` artifact. A failure
stops before the warehouse rows go, so a rerun can still find the subject's CRM records; a rerun
after success finds nothing more to erase. The raw identifiers given as parameters are replaced in
this flow run's stored parameters by their keyed hashes (``subject_hash`` / ``email_hash``) as soon
as the salt is known, so Prefect keeps no raw identifier either; "Retry" in the UI still works.
See docs/runbooks.md#erasure-request.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from opsloop.errors import ConfigError
from opsloop.privacy import Subject, normalise, redact
from opsloop.spec import load_spec
from opsloop.transform.pii import KeyedHasher
from tasks import privacy as t

RAW = ("entity_key", "email")


def _scrub_parameters(hasher: KeyedHasher | None, entity_key: str | None, email: str | None) -> None:
    """Replace raw identifiers in this run's stored parameters by their keyed hashes (or drop them)."""
    run_id = runtime.flow_run.id
    if not run_id:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        params = dict(client.read_flow_run(run_id).parameters or {})
        if not any(params.get(k) for k in RAW):
            return
        if hasher is not None and entity_key:
            params["subject_hash"] = hasher.one(normalise(entity_key))
        if hasher is not None and email:
            params["email_hash"] = hasher.one(normalise(email))
        params.update(dict.fromkeys(RAW))
        client.update_flow_run(run_id, parameters=params)


def _who(requested_by: str) -> str:
    by = ""
    run_id = runtime.flow_run.id
    if run_id:
        from prefect.client.orchestration import get_client

        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            created = client.read_flow_run(run_id).created_by
            by = str(getattr(created, "display_value", "") or "")
    parts = [requested_by.strip() or "(not given)", f"started by {by or 'API/CLI'}"]
    parts.append(f"deployment {runtime.deployment.name or 'none'}, flow run {run_id or 'local'}")
    return "; ".join(parts)


def _markdown(subject: Subject, out: dict[str, Any]) -> str:
    lines = [
        f"# forget-subject · {out['status']}",
        "",
        f"Subject **{subject.pseudonym}** (keyed hash; raw identifiers are not kept). Reason: {out['reason']}",
        "",
        "| table | rows |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in out["tables"].items()] or ["| (none) | 0 |"]
    lines += ["", "| CRM destination | result |", "|---|---|"]
    lines += [f"| {k} | {v.get('status') if isinstance(v, dict) else v} |" for k, v in out["crm"].items()]
    lines += ["", f"Suppression list: {out['suppressed']} new hash(es); ingest skips this subject from now on."]
    return "\n".join(lines)


@flow(name="forget-subject", description="Erase one data subject from the warehouse and the CRM AI fields (audit).")
def forget_subject(
    entity_key: str | None = None,
    email: str | None = None,
    email_hash: str | None = None,
    subject_hash: str | None = None,
    spec_path: str = "pipelines/customer_ops_ai.yaml",
    warehouse: str = "opsloop-duckdb/local",
    reason: str = "data subject erasure request (GDPR Art. 17)",
    requested_by: str = "",
    clear_crm: bool = True,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Forget the subject named by ``entity_key`` (e.g. C0000042), ``email`` (hashed with the PII salt
    to find it), ``email_hash`` (as in the warehouse's ``email_hash`` column) or ``subject_hash``
    (keyed hash of the entity key, what a finished run keeps in its parameters).

    Args:
        entity_key: The subject's entity key (the spec's model entity key, e.g. customer_id).
        email: The subject's e-mail address; never stored — replaced by its keyed hash.
        email_hash: The keyed hash of the e-mail, as stored in the warehouse.
        subject_hash: The keyed hash of the entity key.
        spec_path: Pipeline spec (YAML) relative to the repository root.
        warehouse: Warehouse block document, e.g. opsloop-duckdb/local or opsloop-bigquery/prod.
        reason: Why (ticket number, legal basis) — stored in the audit row.
        requested_by: Who asked (e.g. the DPO's address) — stored in the audit row.
        clear_crm: Clear the AI fields in the CRM destinations (off only if the CRM is handled elsewhere).
        dry_run: Count what would be erased; change nothing (no suppression, no CRM calls, no deletes).
    """
    if not any((entity_key, email, email_hash, subject_hash)):
        raise ConfigError("forget-subject: give entity_key, email, email_hash or subject_hash")
    log = get_run_logger()
    started = datetime.now(UTC)
    erasure_id = str(runtime.flow_run.id or f"local-{started:%Y%m%dT%H%M%S}")
    try:
        spec = load_spec(spec_path)
        hasher = t.erasure_hasher(spec)
    except Exception:  # the run fails, but its stored parameters keep no raw identifier either
        _scrub_parameters(None, entity_key, email)
        raise
    _scrub_parameters(hasher, entity_key, email)

    subject = t.find_subject(spec_path, warehouse, entity_key, email, email_hash, subject_hash)
    out: dict[str, Any] = {"reason": reason, "tables": {}, "crm": {}, "suppressed": 0, "status": "failed"}
    row: dict[str, Any] = {
        "erasure_id": erasure_id,
        "subject": subject.pseudonym,
        "key_hashes": sorted(subject.key_hashes),
        "email_hashes": sorted(subject.email_hashes),
        "requested_by": _who(requested_by),
        "reason": reason,
        "dry_run": dry_run,
        "started_at": started,
    }
    log.info("forget-subject %s: %d key(s), %d e-mail hash(es)", subject.pseudonym, len(subject.keys),
             len(subject.email_hashes))  # fmt: skip
    try:
        if not dry_run:
            out["suppressed"] = t.suppress_subject(spec_path, warehouse, subject, erasure_id)
        for dest in spec.reverse_etl():
            if dry_run or not clear_crm:
                out["crm"][dest.name] = "skipped (dry run)" if dry_run else "skipped (clear_crm=false)"
            elif not subject.keys:
                out["crm"][dest.name] = "skipped (no entity key known: nothing left in the warehouse)"
            else:
                out["crm"][dest.name] = t.clear_crm_fields(spec_path, dest.name, subject)
        out["tables"] = t.erase_warehouse_rows(spec_path, warehouse, subject, dry_run)
        crm_done = any(isinstance(v, dict) and v.get("status") == "cleared" for v in out["crm"].values())
        if dry_run:
            out["status"] = "dry_run"
        elif out["tables"] or out["suppressed"] or crm_done:
            out["status"] = "completed"
        else:
            out["status"] = "nothing_to_erase"
    except BaseException as exc:
        row["note"] = redact(f"{type(exc).__name__}: {exc}", subject, [email or ""])[:1000]
        raise
    finally:
        row.update(
            status=out["status"],
            tables=out["tables"],
            rows_erased=sum(out["tables"].values()),
            crm=out["crm"],
            suppressed=out["suppressed"],
            finished_at=datetime.now(UTC),
        )
        t.record_erasure(spec_path, warehouse, row)
    log.info("forget-subject %s: %s, %d row(s) in %d table(s)", subject.pseudonym, out["status"],
             row["rows_erased"], len(out["tables"]))  # fmt: skip
    create_markdown_artifact(_markdown(subject, out), key="forget-subject", description=f"erasure {subject.pseudonym}")
    return {"subject": subject.pseudonym, **{k: out[k] for k in ("status", "tables", "crm", "suppressed")}}


if __name__ == "__main__":
    forget_subject()
