"""Erasure of one data subject (GDPR Art. 17) from everything opsloop writes, and keeping it erased.

* :func:`find_subject` — the subject's entity keys and e-mail hashes, from an entity key, an e-mail
  (keyed HMAC with the pipeline's PII salt, exactly as ingest hashes it), an e-mail hash or the
  keyed hash of an entity key (what a scrubbed flow-run parameter holds).
* :func:`erase_rows` — every warehouse table of the pipeline's datasets (found through the
  information schema, so staging leftovers are included) is checked by column: rows whose entity
  key, e-mail hash or quarantined row JSON matches are deleted; the append-only ``_sync_log``
  keeps its rows with the entity and external id replaced by the subject's pseudonym
  (``erased:<hash prefix>``) and the vendor message cleared. Counts come first, so a rerun finds
  0 rows and changes nothing.
* :class:`opsloop.suppression.Suppression` — ``<meta>._erasure_suppress`` holds keyed hashes (never raw values) of the
  erased keys and e-mails; the ingest loader drops source rows that match, counted in the run's
  flags, so the next incremental or full load does not bring the subject back.
* :func:`record_erasure` — the audit row in ``<meta>._erasure_log``: who, when, why, tables and
  row counts, CRM results — hashes and pseudonyms only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from opsloop.errors import ConfigError
from opsloop.spec import PipelineSpec
from opsloop.suppression import SUPPRESSION, SUPPRESSION_SCHEMA, Suppression
from opsloop.transform.pii import KeyedHasher
from opsloop.warehouse.base import TableRef, Warehouse

ERASURE_LOG = "_erasure_log"
SYNC_LOG = "_sync_log"
PSEUDONYM = "erased:"
TS = pa.timestamp("us", tz="UTC")
LOG_SCHEMA = pa.schema(
    [
        ("erasure_id", pa.string()),
        ("pipeline", pa.string()),
        ("subject", pa.string()),
        ("key_hashes", pa.string()),
        ("email_hashes", pa.string()),
        ("requested_by", pa.string()),
        ("reason", pa.string()),
        ("dry_run", pa.bool_()),
        ("status", pa.string()),
        ("tables", pa.string()),
        ("rows_erased", pa.int64()),
        ("crm", pa.string()),
        ("suppressed", pa.int64()),
        ("started_at", TS),
        ("finished_at", TS),
        ("note", pa.string()),
    ]
)
_SKIP = {ERASURE_LOG, SUPPRESSION}


def normalise(value: str) -> str:
    """What the keyed hash is computed over: trimmed, lower-case (as :class:`KeyedHasher.hash_values`)."""
    return value.strip().lower()


@dataclass
class Subject:
    """One data subject: raw keys live only in memory; hashes and the pseudonym may be stored."""

    keys: set[str] = field(default_factory=set)
    key_hashes: set[str] = field(default_factory=set)
    email_hashes: set[str] = field(default_factory=set)

    @property
    def pseudonym(self) -> str:
        first = min(self.key_hashes or self.email_hashes or {"unknown"})
        return PSEUDONYM + first[:16]

    @property
    def empty(self) -> bool:
        return not (self.keys or self.key_hashes or self.email_hashes)


def entity_key(spec: PipelineSpec) -> str:
    """The column naming a subject in this pipeline (model entity key, else the push's entity key)."""
    if spec.model is not None:
        return str(spec.model.features.entity_key)
    keys = [d.entity_key for d in spec.reverse_etl() if d.entity_key]
    return str(keys[0]) if keys else "customer_id"


def email_hash_columns(spec: PipelineSpec) -> dict[str, str]:
    """E-mail columns the spec hashes → the column their keyed hash is stored in."""
    pii = spec.transform.pii
    return {c: (f"{c}_hash" if c in pii.mask else c) for c in pii.hash if "mail" in c.lower()}


def datasets(spec: PipelineSpec, meta: str) -> list[str]:
    """Every dataset opsloop writes for ``spec`` (destinations, raw landing, features, scoring, meta)."""
    out = [d.dataset for d in spec.destinations if d.type == "warehouse" and d.dataset]
    out += [f"raw_{s.id}" for s in spec.sources]
    if spec.model is not None:
        out.append(spec.model.features.dataset)
    out.append(spec.scoring.dataset)
    out.append(meta)
    return [str(d) for d in dict.fromkeys(out)]


def list_columns(wh: Warehouse, dataset: str) -> dict[TableRef, list[str]]:
    """Tables of one dataset and their columns, from the information schema (missing dataset → {})."""
    probe = wh.quote(TableRef(dataset, "t"))
    if wh.dialect == "bigquery":
        sql = f"SELECT table_name, column_name FROM {probe[: probe.rindex('.')]}`.INFORMATION_SCHEMA.COLUMNS"
        params: dict[str, Any] | None = None
    else:
        m = re.search(r'"([^"]+)"\."t"$', probe)
        sql = (
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
            f"{wh.param('ds')} ORDER BY table_name, ordinal_position"
        )
        params = {"ds": m.group(1) if m else dataset}
    try:
        rows = wh.query(sql, params).to_pylist()
    except Exception as exc:  # BigQuery: the dataset was never created
        if "not found" in str(exc).lower():
            return {}
        raise
    out: dict[TableRef, list[str]] = {}
    for r in rows:
        out.setdefault(TableRef(dataset, str(r["table_name"])), []).append(str(r["column_name"]))
    return out


def pipeline_tables(wh: Warehouse, spec: PipelineSpec) -> dict[TableRef, list[str]]:
    out: dict[TableRef, list[str]] = {}
    for ds in datasets(spec, wh.meta_dataset):
        out.update(list_columns(wh, ds))
    return out


def _in(wh: Warehouse, expr: str, values: Iterable[str], prefix: str, params: dict[str, Any]) -> str:
    names = []
    for v in sorted(values):
        name = f"{prefix}{len(params)}"
        params[name] = v
        names.append(wh.param(name))
    return f"{expr} IN ({', '.join(names)})" if names else "FALSE"


def _norm(wh: Warehouse, column: str) -> str:
    return f"LOWER(TRIM(CAST({wh.quote(column)} AS STRING)))"


def find_subject(
    wh: Warehouse,
    spec: PipelineSpec,
    hasher: KeyedHasher,
    *,
    entity: str | None = None,
    email: str | None = None,
    email_hash: str | None = None,
    subject_hash: str | None = None,
) -> Subject:
    """Resolve the subject's keys and e-mail hashes from whatever identifier the request names."""
    key = entity_key(spec)
    emails = email_hash_columns(spec)
    if email and not emails:
        raise ConfigError("forget-subject: an e-mail was given but transform.pii.hash names no e-mail column")
    subject = Subject()
    if entity:
        subject.keys.add(entity.strip())
    if email:
        subject.email_hashes.add(hasher.one(normalise(email)))
    if email_hash:
        subject.email_hashes.add(email_hash.strip().lower())
    tables = pipeline_tables(wh, spec)
    if subject_hash:
        subject.key_hashes.add(subject_hash.strip().lower())
        subject.keys |= _keys_by_hash(wh, tables, key, hasher, {subject_hash.strip().lower()})
    for ref, cols in tables.items():  # e-mail → keys
        if key not in cols:
            continue
        for hcol in (h for h in emails.values() if h in cols):
            params: dict[str, Any] = {}
            cond = _in(wh, wh.quote(hcol), subject.email_hashes, "h", params)
            rows = wh.query(f"SELECT DISTINCT {wh.quote(key)} AS k FROM {wh.quote(ref)} WHERE {cond}", params)
            subject.keys |= {str(v) for v in rows.column("k").to_pylist() if v is not None}
    subject.keys = _stored_spellings(wh, tables, key, subject.keys)
    for ref, cols in tables.items():  # keys → e-mail hashes (other sources may know the subject by e-mail)
        if key not in cols or not subject.keys:
            continue
        for hcol in (h for h in emails.values() if h in cols):
            params = {}
            cond = _in(wh, _norm(wh, key), {normalise(k) for k in subject.keys}, "k", params)
            rows = wh.query(f"SELECT DISTINCT {wh.quote(hcol)} AS h FROM {wh.quote(ref)} WHERE {cond}", params)
            subject.email_hashes |= {str(v) for v in rows.column("h").to_pylist() if v}
    subject.key_hashes |= {hasher.one(normalise(k)) for k in subject.keys}
    _add_known_hashes(wh, spec, subject)
    return subject


def _stored_spellings(wh: Warehouse, tables: dict[TableRef, list[str]], key: str, keys: set[str]) -> set[str]:
    """``keys`` as the warehouse stores them: a request may differ in case or spaces (``c0000042 ``),
    and the CRM lookups and the quarantine match need the stored spelling. Keys no table holds stay."""
    if not keys:
        return keys
    stored: set[str] = set()
    for ref, cols in tables.items():
        if key not in cols:
            continue
        params: dict[str, Any] = {}
        cond = _in(wh, _norm(wh, key), {normalise(k) for k in keys}, "k", params)
        sql = f"SELECT DISTINCT CAST({wh.quote(key)} AS STRING) AS k FROM {wh.quote(ref)} WHERE {cond}"
        stored |= {str(v) for v in wh.query(sql, params).column("k").to_pylist() if v is not None}
    matched = {normalise(s) for s in stored}
    return stored | {k for k in keys if normalise(k) not in matched}


def _add_known_hashes(wh: Warehouse, spec: PipelineSpec, subject: Subject) -> None:
    """A subject erased before: every hash its earlier erasure suppressed (so a rerun by e-mail or by
    key names the same subject and pseudonym, even though its rows are gone)."""
    ref = TableRef(wh.meta_dataset, SUPPRESSION)
    if wh.table_schema(ref) is None:
        return
    rows = wh.query(
        f"SELECT column_name, value_hash, erasure_id FROM {wh.quote(ref)} WHERE pipeline = {wh.param('p')}",
        {"p": spec.name},
    ).to_pylist()
    known = subject.key_hashes | subject.email_hashes
    ids = {r["erasure_id"] for r in rows if r["value_hash"] in known}
    key = entity_key(spec)
    for r in rows:
        if r["erasure_id"] in ids:
            (subject.key_hashes if r["column_name"] == key else subject.email_hashes).add(str(r["value_hash"]))


def _keys_by_hash(
    wh: Warehouse, tables: dict[TableRef, list[str]], key: str, hasher: KeyedHasher, wanted: set[str]
) -> set[str]:
    """Raw keys whose keyed hash is in ``wanted`` (streamed over the distinct keys of each table)."""
    found: set[str] = set()
    want = pa.array(sorted(wanted), pa.string())
    for ref, cols in tables.items():
        if key not in cols or ref.dataset == wh.meta_dataset:
            continue
        sql = f"SELECT DISTINCT CAST({wh.quote(key)} AS STRING) AS k FROM {wh.quote(ref)}"
        for batch in wh.read_batches(sql):
            col = batch.column(0)
            hit = pc.is_in(hasher.hash_values(col), value_set=want)
            found |= {str(v) for v in col.filter(pc.fill_null(hit, False)).to_pylist() if v is not None}
    return found


@dataclass(frozen=True)
class TableAction:
    ref: TableRef
    kind: str  # delete | anonymise
    where: str
    params: dict[str, Any]


def plan_actions(wh: Warehouse, spec: PipelineSpec, subject: Subject) -> list[TableAction]:
    """What to do in every table that can hold the subject (by column, so new tables are covered)."""
    key = entity_key(spec)
    hash_cols = set(email_hash_columns(spec).values())
    keys = {normalise(k) for k in subject.keys}
    out: list[TableAction] = []
    for ref, cols in sorted(pipeline_tables(wh, spec).items(), key=lambda kv: str(kv[0])):
        if ref.dataset == wh.meta_dataset and ref.table in _SKIP:
            continue
        params: dict[str, Any] = {}
        conds: list[str] = []
        if key in cols and keys:
            conds.append(_in(wh, _norm(wh, key), keys, "k", params))
        for h in sorted(hash_cols & set(cols)):
            if subject.email_hashes:
                conds.append(_in(wh, wh.quote(h), subject.email_hashes, "h", params))
        if ref.dataset == wh.meta_dataset and keys:
            for c in ("entity", "external_id"):
                if c in cols:
                    conds.append(_in(wh, _norm(wh, c), keys, "k", params))
        if "row_json" in cols:  # the quarantined row as JSON (json.dumps: `"col": value`), any case
            for n in _json_needles(key, keys, hash_cols, subject.email_hashes):
                name = f"n{len(params)}"
                params[name] = n
                conds.append(f"STRPOS(LOWER({wh.quote('row_json')}), {wh.param(name)}) > 0")
        if not conds:
            continue
        kind = "anonymise" if ref.dataset == wh.meta_dataset and ref.table == SYNC_LOG else "delete"
        out.append(TableAction(ref, kind, " OR ".join(f"({c})" for c in conds), params))
    return out


def _json_needles(key: str, keys: set[str], hash_cols: set[str], email_hashes: set[str]) -> list[str]:
    """Lower-case fragments of a quarantined row's JSON that name the subject: its key as a string, or
    as a number (followed by ``,`` or ``}`` so that 42 does not match 421), or one of its e-mail hashes."""
    out = []
    for k in sorted(keys):
        out.append(f"{json.dumps(key)}: {json.dumps(k)}")
        if k.isdigit():
            out += [f"{json.dumps(key)}: {int(k)}{end}" for end in (",", "}")]
    out += [f"{json.dumps(h)}: {json.dumps(v)}" for h in sorted(hash_cols) for v in sorted(email_hashes)]
    return [n.lower() for n in out]


def erase_rows(wh: Warehouse, spec: PipelineSpec, subject: Subject, dry_run: bool = False) -> dict[str, int]:
    """Delete (or, in ``_sync_log``, pseudonymise) the subject's rows; ``{table: rows}`` for tables with any."""
    done: dict[str, int] = {}
    if subject.empty:
        return done
    for act in plan_actions(wh, spec, subject):
        q = wh.quote(act.ref)
        n = int(wh.query(f"SELECT COUNT(*) AS n FROM {q} WHERE {act.where}", act.params).column(0)[0].as_py() or 0)
        if n == 0:
            continue
        done[str(act.ref)] = n
        if dry_run:
            continue
        if act.kind == "anonymise":
            params = {**act.params, "pseudo": subject.pseudonym}
            p = wh.param("pseudo")
            sets = f"{wh.quote('entity')} = {p}, {wh.quote('external_id')} = {p}, {wh.quote('error_message')} = NULL"
            wh.execute(f"UPDATE {q} SET {sets} WHERE {act.where}", params, kind="dml")
        else:
            wh.execute(f"DELETE FROM {q} WHERE {act.where}", act.params, kind="dml")
    return done


def suppress(wh: Warehouse, spec: PipelineSpec, subject: Subject, erasure_id: str) -> int:
    """Add the subject's key and e-mail hashes to the suppression list; returns how many were new."""
    ref = TableRef(wh.meta_dataset, SUPPRESSION)
    have = Suppression.load(wh, spec.name).entries
    wanted = [(entity_key(spec), h) for h in sorted(subject.key_hashes)]
    wanted += [(c, h) for c in sorted(email_hash_columns(spec)) for h in sorted(subject.email_hashes)]
    new = [(c, h) for c, h in wanted if h not in have.get(c, set())]
    if new:
        now = datetime.now(UTC)
        rows = [
            {"pipeline": spec.name, "column_name": c, "value_hash": h, "erasure_id": erasure_id, "added_at": now}
            for c, h in new
        ]
        wh.append(ref, pa.Table.from_pylist(rows, schema=SUPPRESSION_SCHEMA))
    return len(new)


def record_erasure(wh: Warehouse, row: dict[str, Any]) -> None:
    """Append the audit row (dict/list values are stored as JSON text)."""
    full = {n: row.get(n) for n in LOG_SCHEMA.names}
    for k in ("key_hashes", "email_hashes", "tables", "crm"):
        if not isinstance(full[k], str | None):
            full[k] = json.dumps(full[k], sort_keys=True, default=str)
    wh.append(TableRef(wh.meta_dataset, ERASURE_LOG), pa.Table.from_pylist([full], schema=LOG_SCHEMA))


def redact(text: str, subject: Subject, extra: Iterable[str] = ()) -> str:
    """``text`` with every raw identifier of the subject replaced by its pseudonym (for errors/logs)."""
    for value in sorted({*subject.keys, *extra}, key=len, reverse=True):
        if value:
            text = re.sub(re.escape(value), subject.pseudonym, text, flags=re.IGNORECASE)
    return text
