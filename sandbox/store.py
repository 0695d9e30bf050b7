"""On-disk state of the CRM sandbox: one SQLite file (WAL) in the state dir.

Tables: ``records`` (one row per CRM record, vendor-neutral: id, created/modified epoch ms, deleted
flag, the writable fields as JSON), ``keys`` (external-id / unique-property index, values
lower-cased), ``fields`` (Salesforce field and HubSpot property definitions), ``kv`` (settings,
counters, id sequences), ``jobs`` (Bulk API 2.0 ingest jobs) and ``job_blobs`` (their uploaded CSV
and CSV results, one row per blob: a job's state changes — every status poll — rewrite only its
small ``info`` row, not megabytes of CSV; the blob columns of ``jobs`` are read for older state files).
Everything the sandbox knows survives a restart; 100k records upsert in a few seconds.

No index on ``modstamp``: every write moves a record's modstamp, and keeping an index on it in step
cost 1.7 µs per record written (a fifth of a Collections upsert's sandbox CPU). Queries filtered or
sorted on SystemModstamp / ``hs_lastmodifieddate`` scan the object's rows instead: 100k records,
one SOQL query 50 ms, one HubSpot search page 40 ms (23 ms with the index) — still far below the
real APIs' latency. State files of older sandboxes lose the index (``records_mod``) when opened.
Records, their JSON codec and the write transaction are in :mod:`sandbox.records`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from sandbox.records import COLS, Rec, StoreTx, key_values, loads, row_rec

__all__ = ["Rec", "Store", "StoreTx", "key_values"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    rid INTEGER PRIMARY KEY,
    vendor TEXT NOT NULL, object TEXT NOT NULL, id TEXT NOT NULL,
    created INTEGER NOT NULL, modstamp INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_id ON records(vendor, object, id);
DROP INDEX IF EXISTS records_mod;
CREATE TABLE IF NOT EXISTS keys (
    vendor TEXT NOT NULL, object TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (vendor, object, field, value, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_id ON keys(vendor, object, id);
CREATE TABLE IF NOT EXISTS fields (
    vendor TEXT NOT NULL, object TEXT NOT NULL, name TEXT NOT NULL, pos INTEGER NOT NULL, definition TEXT NOT NULL,
    PRIMARY KEY (vendor, object, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, info TEXT NOT NULL, upload BLOB, success BLOB, failed BLOB, unprocessed BLOB
);
CREATE TABLE IF NOT EXISTS job_blobs (
    id TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (id, name)
) WITHOUT ROWID;
"""
_BLOBS = ("upload", "success", "failed", "unprocessed")


class Store:
    """Thread-safe (one lock) access to the sandbox's SQLite file."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "sandbox.sqlite3"
        self.lock = threading.RLock()
        self.con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        # No fsync (WAL checkpoints included): every commit is in the OS's page cache when it
        # returns, so a restart — or a crash of the sandbox process — keeps all of it; only an OS
        # crash or power loss could drop the last writes, acceptable for a local stand-in. With
        # NORMAL, the checkpoint every ~1,000 WAL pages blocked the event loop on two fsyncs:
        # ~6 µs per record of a 200-record write, ~50 µs per single-record request.
        self.con.execute("PRAGMA synchronous=OFF")
        self.con.execute("PRAGMA temp_store=MEMORY")
        self.con.execute("PRAGMA cache_size=-65536")
        self.con.executescript(SCHEMA)
        self._fields: dict[tuple[str, str], dict[str, dict[str, Any]]] | None = None
        self._objects: dict[str, list[str]] = {}

    def close(self) -> None:
        with self.lock:
            self.con.close()

    # -- transactions --------------------------------------------------------------------------
    def tx(self) -> StoreTx:
        return StoreTx(self)

    # -- kv ------------------------------------------------------------------------------------
    def kv_get(self, key: str, default: Any = None) -> Any:
        with self.lock:
            row = self.con.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def kv_set(self, key: str, value: Any) -> None:
        with self.lock:
            self.con.execute(
                "INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def next_seq(self, name: str, n: int = 1, start: int = 1) -> int:
        """Reserve ``n`` numbers of sequence ``name``; returns the first one."""
        with self.lock:
            cur = int(self.kv_get(f"seq:{name}", start - 1))
            self.kv_set(f"seq:{name}", cur + n)
        return cur + 1

    # -- schema (fields / properties) ----------------------------------------------------------
    def fields(self, vendor: str, obj: str) -> dict[str, dict[str, Any]]:
        """Field definitions of an object keyed by lower-cased name (in definition order)."""
        with self.lock:
            if self._fields is None:
                cache: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
                rows = self.con.execute("SELECT vendor, object, name, definition FROM fields ORDER BY pos").fetchall()
                for v, o, name, definition in rows:
                    cache.setdefault((v, o.lower()), {})[name.lower()] = json.loads(definition)
                self._fields = cache
            return self._fields.get((vendor, obj.lower()), {})

    def objects(self, vendor: str) -> list[str]:
        with self.lock:
            cached = self._objects.get(vendor)
            if cached is None:
                rows = self.con.execute("SELECT DISTINCT object FROM fields WHERE vendor = ? ORDER BY 1", (vendor,))
                cached = self._objects[vendor] = [r[0] for r in rows.fetchall()]
            return list(cached)

    def put_field(self, vendor: str, obj: str, definition: dict[str, Any]) -> None:
        name = definition["name"]
        with self.lock:
            existing = self.fields(vendor, obj).get(name.lower())
            pos = self.con.execute(
                "SELECT COALESCE(MAX(pos), 0) + 1 FROM fields WHERE vendor = ? AND object = ?", (vendor, obj)
            ).fetchone()[0]
            if existing is not None:
                self.con.execute(
                    "UPDATE fields SET definition = ? WHERE vendor = ? AND object = ? AND lower(name) = lower(?)",
                    (json.dumps(definition), vendor, obj, name),
                )
            else:
                self.con.execute(
                    "INSERT INTO fields(vendor, object, name, pos, definition) VALUES (?, ?, ?, ?, ?)",
                    (vendor, obj, name, pos, json.dumps(definition)),
                )
            self._fields = None
            self._objects = {}

    def drop_field(self, vendor: str, obj: str, name: str) -> bool:
        with self.lock:
            cur = self.con.execute(
                "DELETE FROM fields WHERE vendor = ? AND object = ? AND lower(name) = lower(?)", (vendor, obj, name)
            )
            self._fields = None
            self._objects = {}
            return cur.rowcount > 0

    def reindex(self, vendor: str, obj: str, key_fields: list[str]) -> None:
        """Rebuild the key index of an object (after its set of key fields changed)."""
        with self.tx() as tx:
            tx.execute("DELETE FROM keys WHERE vendor = ? AND object = ?", (vendor, obj))
            for batch in self.scan(vendor, obj, include_deleted=True):
                tx.index(vendor, obj, batch, key_fields)

    # -- records -------------------------------------------------------------------------------
    def get(self, vendor: str, obj: str, id_: str) -> Rec | None:
        with self.lock:
            row = self.con.execute(
                f"SELECT {COLS} FROM records WHERE vendor = ? AND object = ? AND id = ?", (vendor, obj, id_)
            ).fetchone()
        return row_rec(row) if row else None

    def get_many(self, vendor: str, obj: str, ids: list[str]) -> dict[str, Rec]:
        out: dict[str, Rec] = {}
        with self.lock:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = self.con.execute(
                    f"SELECT {COLS} FROM records WHERE vendor = ? AND object = ? AND id IN ({marks})",
                    (vendor, obj, *part),
                ).fetchall()
                for row in rows:
                    rec = row_rec(row)
                    out[rec.id] = rec
        return out

    def by_rids(self, rids: list[int]) -> list[Rec]:
        """Records by rowid, in the order given (for query cursors)."""
        found: dict[int, Rec] = {}
        with self.lock:
            for i in range(0, len(rids), 500):
                part = rids[i : i + 500]
                marks = ",".join("?" * len(part))
                for row in self.con.execute(f"SELECT {COLS} FROM records WHERE rid IN ({marks})", part):
                    found[row[0]] = row_rec(row)
        return [found[r] for r in rids if r in found]

    def lookup(self, vendor: str, obj: str, field_name: str, values: Iterable[str]) -> dict[str, list[str]]:
        """Key value (lower-cased) → ids holding it."""
        vals = sorted({str(v).lower() for v in values})
        out: dict[str, list[str]] = {}
        with self.lock:
            for i in range(0, len(vals), 500):
                part = vals[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = self.con.execute(
                    f"SELECT value, id FROM keys WHERE vendor = ? AND object = ? AND field = ? AND value IN ({marks})",
                    (vendor, obj, field_name.lower(), *part),
                ).fetchall()
                for value, id_ in rows:
                    out.setdefault(value, []).append(id_)
        return out

    def lookup_records(self, vendor: str, obj: str, field_name: str, values: Iterable[str]) -> dict[str, list[Rec]]:
        """Key value (lower-cased) → the records holding it (by id): one indexed join per 900 values,
        or, for more, one join driven by the sorted values passed as a JSON array."""
        vals = sorted({str(v).lower() for v in values})
        out: dict[str, list[Rec]] = {}
        cols = ", ".join(f"r.{c.strip()}" for c in COLS.split(","))
        field_low = field_name.lower()
        queries: list[tuple[str, tuple[Any, ...]]]
        if len(vals) > 900:  # one statement, in key order (no IN list of 900 bound values per statement)
            queries = [
                (
                    f"SELECT k.value, {cols} FROM json_each(?) v CROSS JOIN keys k CROSS JOIN records r "
                    "WHERE k.vendor = ? AND k.object = ? AND k.field = ? AND k.value = v.value "
                    "AND r.vendor = k.vendor AND r.object = k.object AND r.id = k.id",
                    (json.dumps(vals, ensure_ascii=False), vendor, obj, field_low),
                )
            ]
        elif not vals:
            return out
        else:
            marks = ",".join("?" * len(vals))
            queries = [
                (
                    f"SELECT k.value, {cols} FROM keys k JOIN records r "
                    "ON r.vendor = k.vendor AND r.object = k.object AND r.id = k.id "
                    f"WHERE k.vendor = ? AND k.object = ? AND k.field = ? AND k.value IN ({marks})",
                    (vendor, obj, field_low, *vals),
                )
            ]
        with self.lock:
            for sql, params in queries:
                rows = self.con.execute(sql, params).fetchall()
                parse, get = orjson.loads, out.get
                for value, rid, id_, created, modstamp, deleted, data in rows:
                    try:
                        fields = parse(data)
                    except orjson.JSONDecodeError:
                        fields = loads(data)
                    held = get(value)
                    if held is None:
                        out[value] = [Rec(id_, created, modstamp, bool(deleted), fields, rid)]
                    else:
                        held.append(Rec(id_, created, modstamp, bool(deleted), fields, rid))
        for held in out.values():
            if len(held) > 1:  # a key value shared by several records (duplicates): in id order
                held.sort(key=lambda r: r.id)
        return out

    def select_rids(
        self, vendor: str, obj: str, where: str = "", params: tuple[Any, ...] = (), order: str = "rid", limit: int = -1
    ) -> list[int]:
        sql = f"SELECT rid FROM records WHERE vendor = ? AND object = ? {where} ORDER BY {order} LIMIT ?"
        with self.lock:
            return [r[0] for r in self.con.execute(sql, (vendor, obj, *params, limit)).fetchall()]

    def select(
        self,
        vendor: str,
        obj: str,
        where: str = "",
        params: tuple[Any, ...] = (),
        order: str = "rid",
        limit: int = -1,
        offset: int = 0,
    ) -> list[Rec]:
        sql = f"SELECT {COLS} FROM records WHERE vendor = ? AND object = ? {where} ORDER BY {order} LIMIT ? OFFSET ?"
        with self.lock:
            rows = self.con.execute(sql, (vendor, obj, *params, limit, offset)).fetchall()
        return [row_rec(r) for r in rows]

    def count(self, vendor: str, obj: str, where: str = "", params: tuple[Any, ...] = ()) -> int:
        sql = f"SELECT count(*) FROM records WHERE vendor = ? AND object = ? {where}"
        with self.lock:
            return int(self.con.execute(sql, (vendor, obj, *params)).fetchone()[0])

    def scan(self, vendor: str, obj: str, include_deleted: bool = False, chunk: int = 5000) -> Iterator[list[Rec]]:
        last = 0
        extra = "" if include_deleted else "AND deleted = 0"
        while True:
            recs = self.select(vendor, obj, f"AND rid > ? {extra}", (last,), "rid", chunk)
            if not recs:
                return
            yield recs
            last = recs[-1].rid or 0

    # -- jobs ----------------------------------------------------------------------------------
    def job_get(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.con.execute("SELECT info FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def job_put(self, info: dict[str, Any], **blobs: bytes | None) -> None:
        with self.lock:
            self.con.execute(
                "INSERT INTO jobs(id, info) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET info = excluded.info",
                (info["id"], json.dumps(info)),
            )
            for name, blob in blobs.items():
                if name not in _BLOBS:
                    raise ValueError(name)
                if blob is None:
                    self.con.execute("DELETE FROM job_blobs WHERE id = ? AND name = ?", (info["id"], name))
                else:
                    self.con.execute(
                        "INSERT INTO job_blobs(id, name, data) VALUES (?, ?, ?) "
                        "ON CONFLICT(id, name) DO UPDATE SET data = excluded.data",
                        (info["id"], name, blob),
                    )
                self.con.execute(f"UPDATE jobs SET {name} = NULL WHERE id = ? AND {name} IS NOT NULL", (info["id"],))

    def job_blob(self, job_id: str, name: str) -> bytes | None:
        if name not in _BLOBS:
            raise ValueError(name)
        with self.lock:
            row = self.con.execute("SELECT data FROM job_blobs WHERE id = ? AND name = ?", (job_id, name)).fetchone()
            if row is None:  # a job written by an older sandbox: the blob columns of ``jobs``
                row = self.con.execute(f"SELECT {name} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def job_list(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r[0]) for r in self.con.execute("SELECT info FROM jobs ORDER BY rowid")]

    def job_delete(self, job_id: str) -> None:
        with self.lock:
            self.con.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self.con.execute("DELETE FROM job_blobs WHERE id = ?", (job_id,))

    # -- reset ---------------------------------------------------------------------------------
    def wipe(self) -> None:
        with self.lock:
            for table in ("records", "keys", "fields", "kv", "jobs", "job_blobs"):
                self.con.execute(f"DELETE FROM {table}")
            self._fields = None
            self._objects = {}
            self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
