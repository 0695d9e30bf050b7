"""PII: mask (``j***@example.com``, phone keeps its last 2 digits) and keyed HMAC-SHA256.

The salt comes from a Prefect ``Secret`` block, resolved by the task and passed here as bytes, so
the same e-mail gives the same hash within a deployment and the hash is useless without the salt.
Applied to every row before staging *and* before a quarantine row is written: the raw value of a
configured column reaches no warehouse table.
"""

from __future__ import annotations

import hashlib
import hmac

import pyarrow as pa
import pyarrow.compute as pc

from opsloop.errors import ConfigError
from opsloop.spec import PiiSpec

MASK = "***"


def mask_email(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``john.doe@example.com`` → ``j***@example.com``; anything without an ``@`` → ``***``."""
    s = pc.utf8_trim_whitespace(pc.cast(values, pa.string()))
    masked = pc.replace_substring_regex(s, pattern=r"^([^@\s])[^@]*(@.*)$", replacement=r"\1" + MASK + r"\2")
    ok = pc.match_substring_regex(s, pattern=r"^[^@\s][^@]*@.*$")
    return pc.if_else(ok, masked, pa.scalar(MASK))


def mask_phone(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``+49 170 1234567`` → ``***67`` (only the last two digits survive)."""
    digits = pc.replace_substring_regex(pc.cast(values, pa.string()), pattern=r"\D", replacement="")
    last = pc.utf8_slice_codeunits(digits, start=-2)
    return pc.binary_join_element_wise(pa.scalar(MASK), last, "")


def mask_generic(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """First character and ``***`` (names, addresses)."""
    s = pc.cast(values, pa.string())
    first = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(s), start=0, stop=1)
    return pc.binary_join_element_wise(first, pa.scalar(MASK), "")


def mask_values(column: str, values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    low = column.lower()
    if "email" in low or "mail" in low:
        return mask_email(values)
    if "phone" in low or "mobile" in low or "tel" in low:
        return mask_phone(values)
    return mask_generic(values)


class KeyedHasher:
    """HMAC-SHA256 with a secret salt; inputs are normalised (trimmed, lower-cased) first."""

    def __init__(self, salt: bytes) -> None:
        if not salt:
            raise ConfigError("PII hashing needs a non-empty salt (Prefect Secret named in pii.saltSecretRef)")
        self._proto = hmac.new(salt, digestmod=hashlib.sha256)

    def one(self, value: str) -> str:
        h = self._proto.copy()
        h.update(value.encode("utf-8"))
        return h.hexdigest()

    def hash_values(self, values: pa.Array | pa.ChunkedArray) -> pa.Array:
        s = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(values, pa.string())))
        if isinstance(s, pa.ChunkedArray):
            s = s.combine_chunks()
        uniq = pc.unique(s)
        digests = pa.array([None if v is None else self.one(v) for v in uniq.to_pylist()], pa.string())
        return pc.take(digests, pc.index_in(s, value_set=uniq))


class PiiTransformer:
    """Applies a spec's ``pii`` section to Arrow batches (mask and/or keyed hash per column)."""

    def __init__(self, spec: PiiSpec, salt: bytes | None) -> None:
        self.spec = spec
        self.mask = list(spec.mask)
        self.hash = list(spec.hash)
        if self.hash and not salt:
            raise ConfigError(
                f"pii.hash lists {self.hash} but no salt was resolved from {spec.salt_secret_ref!r} "
                "(create the Prefect Secret block)"
            )
        self.hasher = KeyedHasher(salt) if self.hash and salt else None

    @property
    def columns(self) -> set[str]:
        """Columns whose raw value must never be stored."""
        return set(self.mask) | set(self.hash)

    def hash_column(self, column: str) -> str | None:
        """Where the keyed hash of ``column`` lands: ``<col>_hash`` if also masked, else the column itself."""
        if column not in self.hash:
            return None
        return f"{column}_hash" if column in self.mask else column

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        out = schema
        for col in self.columns:
            i = out.get_field_index(col)
            if i < 0:
                continue
            out = out.set(i, pa.field(col, pa.string()))
            extra = self.hash_column(col)
            if extra and extra != col and out.get_field_index(extra) < 0:
                out = out.append(pa.field(extra, pa.string()))
        return out

    def apply(self, data: pa.Table | pa.RecordBatch) -> pa.Table:
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        for col in self.columns:
            i = table.schema.get_field_index(col)
            if i < 0:
                continue
            raw = table.column(i)
            dest = self.hash_column(col)
            if dest and self.hasher is not None:
                hashed = self.hasher.hash_values(raw)
                if dest == col:
                    table = table.set_column(i, pa.field(col, pa.string()), hashed)
                    continue
                j = table.schema.get_field_index(dest)
                if j >= 0:
                    table = table.set_column(j, pa.field(dest, pa.string()), hashed)
                else:
                    table = table.append_column(pa.field(dest, pa.string()), hashed)
            table = table.set_column(i, pa.field(col, pa.string()), mask_values(col, raw))
        return table
