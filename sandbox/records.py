"""The sandbox's records as Python objects and their write path: :class:`Rec` (one CRM record),
the JSON codec of its fields, and :class:`StoreTx` — one SQLite transaction that inserts or
updates records and keeps the ``keys`` index (external ids / unique properties) in step.

Split from :mod:`sandbox.store` (the connection, schema, reads, settings and Bulk job blobs):
the write path is what every Salesforce and HubSpot write handler shares.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from sandbox.store import Store

_dumps = orjson.dumps


def dumps(data: dict[str, Any]) -> str:
    """A record's fields as stored (compact JSON text)."""
    try:
        return orjson.dumps(data).decode()
    except TypeError:
        return json.dumps(data, separators=(",", ":"), default=str)


def loads(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def key_values(rec: Rec, key_fields: list[str]) -> tuple[Any, ...]:
    """A record's key-field values, to hand to :meth:`StoreTx.write` as they were before a change."""
    data = rec.data
    return tuple(data.get(f) for f in key_fields)


@dataclass(slots=True)
class Rec:
    """One CRM record. ``data`` holds the writable fields (system fields are derived columns)."""

    id: str
    created: int
    modstamp: int
    deleted: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    rid: int | None = None


def row_rec(row: tuple[Any, ...]) -> Rec:
    rid, id_, created, modstamp, deleted, data = row
    return Rec(id_, created, modstamp, bool(deleted), loads(data), rid)


COLS = "rid, id, created, modstamp, deleted, data"


class StoreTx:
    """``with store.tx() as tx:`` — one SQLite transaction under the store lock."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.con = store.con

    def __enter__(self) -> StoreTx:
        self.store.lock.acquire()
        self.con.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store.lock.release()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self.con.execute(sql, params)

    def write(
        self,
        vendor: str,
        obj: str,
        recs: list[Rec],
        key_fields: list[str],
        old_keys: dict[str, tuple[Any, ...]] | None = None,
        reindex: list[Rec] | None = None,
    ) -> None:
        """Insert or replace records and refresh their key index rows.

        Records read from the store (``rid`` set) are updated by rowid; others are upserted by
        vendor/object/id. ``old_keys`` — :func:`key_values` of the records that existed, taken before
        the change — saves re-reading the index: only records whose key values changed (and new
        ones) get their index rows rewritten. ``reindex`` — the caller knows which records' key
        values can have changed (e.g. new ones only, when no key field was written): only those.
        Without either the index rows are read back."""
        if not recs:
            return
        known: list[tuple[Any, ...]] = []
        fresh: list[tuple[Any, ...]] = []
        for r in recs:
            try:
                text = _dumps(r.data).decode()
            except TypeError:
                text = dumps(r.data)
            if r.rid is not None:
                known.append((r.modstamp, int(r.deleted), text, r.rid))
            else:
                fresh.append((vendor, obj, r.id, r.created, r.modstamp, int(r.deleted), text))
        if known:
            self.con.executemany("UPDATE records SET modstamp = ?, deleted = ?, data = ? WHERE rid = ?", known)
        if fresh:
            self.con.executemany(
                "INSERT INTO records(vendor, object, id, created, modstamp, deleted, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(vendor, object, id) DO UPDATE SET "
                "modstamp = excluded.modstamp, deleted = excluded.deleted, data = excluded.data",
                fresh,
            )
        if key_fields and (old_keys is not None or reindex is not None):
            if reindex is not None:
                moved = reindex
            else:
                assert old_keys is not None
                moved = [r for r in recs if r.id not in old_keys or old_keys[r.id] != key_values(r, key_fields)]
            if moved:
                self.con.executemany(
                    "DELETE FROM keys WHERE vendor = ? AND object = ? AND id = ?", [(vendor, obj, r.id) for r in moved]
                )
                self.index(vendor, obj, moved, key_fields)
        elif key_fields:
            wanted = self._key_rows(vendor, obj, recs, key_fields)
            have: dict[str, set[tuple[str, str]]] = {}
            ids = [r.id for r in recs]
            for i in range(0, len(ids), 900):
                part = ids[i : i + 900]
                marks = ",".join("?" * len(part))
                sql = f"SELECT id, field, value FROM keys WHERE vendor = ? AND object = ? AND id IN ({marks})"
                for id_, f, v in self.con.execute(sql, (vendor, obj, *part)):
                    have.setdefault(id_, set()).add((f, v))
            empty: set[tuple[str, str]] = set()
            changed = [r.id for r in recs if have.get(r.id, empty) != wanted.get(r.id, empty)]
            if changed:
                self.con.executemany(
                    "DELETE FROM keys WHERE vendor = ? AND object = ? AND id = ?", [(vendor, obj, i) for i in changed]
                )
                rows = [(vendor, obj, f, v, i) for i in changed for f, v in wanted.get(i, set())]
                self.con.executemany(
                    "INSERT OR IGNORE INTO keys(vendor, object, field, value, id) VALUES (?, ?, ?, ?, ?)", rows
                )

    @staticmethod
    def _key_rows(vendor: str, obj: str, recs: list[Rec], key_fields: list[str]) -> dict[str, set[tuple[str, str]]]:
        names = [(f, f.lower()) for f in key_fields]  # record data is keyed by canonical field names
        out: dict[str, set[tuple[str, str]]] = {}
        for r in recs:
            keys = {(low, str(r.data[f]).lower()) for f, low in names if r.data.get(f) not in (None, "")}
            if keys:
                out[r.id] = keys
        return out

    def index(self, vendor: str, obj: str, recs: list[Rec], key_fields: list[str]) -> None:
        rows = []
        names = [(f, f.lower()) for f in key_fields]  # record data is keyed by canonical field names
        for r in recs:
            data = r.data
            for f, low in names:
                value = data.get(f)
                if value is not None and value != "":
                    rows.append((vendor, obj, low, str(value).lower(), r.id))
        self.con.executemany(
            "INSERT OR IGNORE INTO keys(vendor, object, field, value, id) VALUES (?, ?, ?, ?, ?)", rows
        )

    def delete_hard(self, vendor: str, obj: str, ids: list[str]) -> None:
        self.con.executemany(
            "DELETE FROM records WHERE vendor = ? AND object = ? AND id = ?", [(vendor, obj, i) for i in ids]
        )
        self.con.executemany(
            "DELETE FROM keys WHERE vendor = ? AND object = ? AND id = ?", [(vendor, obj, i) for i in ids]
        )
