"""The suppression list of erased data subjects: keyed hashes (never raw values) of the erased
entity keys and e-mails per source column, in ``<meta>._erasure_suppress``. Every ingest load drops
the source rows that match, so a later load does not bring an erased subject back
(:mod:`opsloop.privacy` adds to the list)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from opsloop.errors import ConfigError
from opsloop.transform.pii import KeyedHasher
from opsloop.warehouse.base import TableRef, Warehouse

SUPPRESSION = "_erasure_suppress"
SUPPRESSION_SCHEMA = pa.schema(
    [
        ("pipeline", pa.string()),
        ("column_name", pa.string()),
        ("value_hash", pa.string()),
        ("erasure_id", pa.string()),
        ("added_at", pa.timestamp("us", tz="UTC")),
    ]
)


class Suppression:
    """Keyed hashes of erased values per source column, consulted by every ingest load."""

    def __init__(self, entries: dict[str, set[str]] | None = None) -> None:
        self.entries = entries or {}

    def __bool__(self) -> bool:
        return any(self.entries.values())

    @classmethod
    def load(cls, wh: Warehouse, pipeline: str) -> Suppression:
        ref = TableRef(wh.meta_dataset, SUPPRESSION)
        if wh.table_schema(ref) is None:
            return cls()
        rows = wh.query(
            f"SELECT column_name, value_hash FROM {wh.quote(ref)} WHERE pipeline = {wh.param('p')}", {"p": pipeline}
        ).to_pylist()
        entries: dict[str, set[str]] = {}
        for r in rows:
            entries.setdefault(str(r["column_name"]), set()).add(str(r["value_hash"]))
        return cls(entries)

    def split(self, data: pa.Table, hasher: KeyedHasher | None, where: str) -> tuple[pa.Table, int]:
        """``data`` without rows whose suppressed columns hash to an erased value; and how many went."""
        cols = [c for c in self.entries if c in data.column_names and self.entries[c]]
        if not cols or data.num_rows == 0:
            return data, 0
        if hasher is None:
            raise ConfigError(
                f"{where}: erased subjects are suppressed by keyed hash, but no PII salt is configured "
                "(transform.pii.hash + saltSecretRef)"
            )
        drop: Any = None
        for c in cols:
            hashed = hasher.hash_values(data.column(c))
            hit = pc.fill_null(pc.is_in(hashed, value_set=pa.array(sorted(self.entries[c]), pa.string())), False)
            drop = hit if drop is None else pc.or_(drop, hit)
        n = int(pc.sum(drop).as_py() or 0)
        return (data.filter(pc.invert(drop)), n) if n else (data, 0)
