"""Postgres tables as Arrow: catalog introspection, type mapping, ``COPY … TO STDOUT`` → Arrow.

The fast path streams ``COPY (SELECT …) TO STDOUT (FORMAT csv)`` through libpq's copy-out
(one ``get_copy_data`` call per row, no per-value Python), joins rows into blocks of whole rows
and parses each block with Arrow's multi-threaded CSV reader into typed columns. Memory is one
block plus one Arrow batch, whatever the table size.

Type mapping (Postgres → Arrow → warehouse logical type): int2/4/8 → int64, float4/8 → float64,
numeric → decimal128(38, 9), bool → bool, date → date32, timestamp[tz] → timestamp[us, UTC]
(a ``timestamp`` without zone is read as UTC), everything else (text, varchar, uuid, json, enum,
arrays …) → string.
"""

from __future__ import annotations

import contextlib
import queue
import select
import threading
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from psycopg import pq, sql

from opsloop.errors import TerminalError, TransientError

TS = pa.timestamp("us", tz="UTC")
NUMERIC = pa.decimal128(38, 9)
BOOL_OID, DATE_OID, TS_OID, TSTZ_OID, NUMERIC_OID = 16, 1082, 1114, 1184, 1700
PG_ARROW: dict[int, pa.DataType] = {
    BOOL_OID: pa.bool_(),
    20: pa.int64(),
    21: pa.int64(),
    23: pa.int64(),
    26: pa.int64(),
    700: pa.float64(),
    701: pa.float64(),
    NUMERIC_OID: NUMERIC,
    DATE_OID: pa.date32(),
    TS_OID: TS,
    TSTZ_OID: TS,
}
SESSION_SETTINGS = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 3"
)


def arrow_type(type_oid: int) -> pa.DataType:
    return PG_ARROW.get(type_oid, pa.string())


@dataclass(frozen=True)
class PgColumn:
    name: str
    type_oid: int
    typmod: int
    type_name: str

    @property
    def arrow(self) -> pa.DataType:
        return arrow_type(self.type_oid)

    def select_sql(self) -> sql.Composable:
        """The expression that makes COPY's text parse as :attr:`arrow` (UTC timestamps, scale ≤ 9)."""
        ident = sql.Identifier(self.name)
        if self.type_oid == TS_OID:
            return sql.SQL("{} AT TIME ZONE 'UTC' AS {}").format(ident, ident)
        if self.type_oid == NUMERIC_OID:
            scale = (self.typmod - 4) & 0xFFFF if self.typmod >= 4 else -1
            precision = ((self.typmod - 4) >> 16) & 0xFFFF if self.typmod >= 4 else -1
            if scale < 0 or scale > 9 or precision - scale > 29:
                return sql.SQL("{}::numeric(38, 9) AS {}").format(ident, ident)
        return ident


@dataclass(frozen=True)
class PgTable:
    schema_name: str
    name: str
    oid: int
    columns: tuple[PgColumn, ...]
    primary_key: tuple[str, ...]
    replica_identity: str

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema_name, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.schema_name}.{self.name}"

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow) for c in self.columns])

    def select_list(self) -> sql.Composable:
        return sql.SQL(", ").join(c.select_sql() for c in self.columns)


_COLUMNS_SQL = """
SELECT a.attname, COALESCE(NULLIF(t.typbasetype, 0), a.atttypid)::int, a.atttypmod,
       format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_PK_SQL = """
SELECT a.attname FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = %(oid)s AND i.indisprimary
ORDER BY array_position(i.indkey, a.attnum)
"""


def describe_table(conn: psycopg.Connection, name: str, columns: Sequence[str] | None = None) -> PgTable:
    """Columns, types and primary key of ``name`` (resolved through the search_path)."""
    row = conn.execute(
        "SELECT c.oid::int, n.nspname, c.relname, c.relreplident FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (sql.Identifier(name).as_string(conn),),
    ).fetchone()
    if row is None:
        db = conn.info.dbname
        raise TerminalError(f"Postgres table {name!r} not found in database {db!r} (search_path schemas)")
    oid, nsp, rel, ident = row
    cols = [PgColumn(*r) for r in conn.execute(_COLUMNS_SQL, {"oid": oid}).fetchall()]
    if columns:
        by_name = {c.name: c for c in cols}
        unknown = [c for c in columns if c not in by_name]
        if unknown:
            raise TerminalError(f"Postgres table {nsp}.{rel}: column(s) {unknown} in the spec do not exist")
        cols = [by_name[c] for c in columns]
    pk = tuple(r[0] for r in conn.execute(_PK_SQL, {"oid": oid}).fetchall())
    replident = {"d": "default", "n": "nothing", "f": "full", "i": "index"}.get(str(ident), str(ident))
    return PgTable(nsp, rel, oid, tuple(cols), pk, replident)


def _csv_options(schema: pa.Schema) -> tuple[pcsv.ReadOptions, pcsv.ParseOptions, pcsv.ConvertOptions]:
    read = pcsv.ReadOptions(column_names=schema.names, block_size=16 << 20, use_threads=True)
    parse = pcsv.ParseOptions(newlines_in_values=True)
    convert = pcsv.ConvertOptions(
        column_types=schema,
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        true_values=["t"],
        false_values=["f"],
    )
    return read, parse, convert


def _raise_copy_error(pgconn: pq.abc.PGconn, what: str, errors: str) -> None:
    """A COPY that ended with an error: the connection's loss (the server went away, the backend was
    terminated) is transient, anything else (SQL, data) is not."""
    if pgconn.status != pq.ConnStatus.OK:
        raise TransientError(f"Postgres connection lost during {what}: {errors}")
    raise TerminalError(f"Postgres {what} failed: {errors}")


def _raise_pg(pgconn: pq.abc.PGconn, what: str) -> None:
    msg = pgconn.get_error_message() or "unknown error"
    if pgconn.status != pq.ConnStatus.OK:
        raise TransientError(f"Postgres connection lost during {what}: {msg}")
    raise TerminalError(f"Postgres {what} failed: {msg}")


def copy_to_arrow(
    conn: psycopg.Connection,
    query: sql.Composable,
    schema: pa.Schema,
    chunk_rows: int = 100_000,
    chunk_bytes: int = 4 << 20,
    what: str = "COPY",
) -> Iterator[pa.RecordBatch]:
    """Stream ``COPY (query) TO STDOUT (FORMAT csv)`` as Arrow batches of ≤ ``chunk_rows`` rows.
    ``what`` names the read in errors (``COPY of public.customers``).

    A thread reads the rows from libpq into blocks (:class:`_RowReader`) while this generator parses
    the previous block with Arrow's multi-threaded CSV reader and its consumer loads it: Postgres keeps
    producing instead of waiting for the consumer. (``FORMAT binary`` costs Postgres a third less CPU
    but its numpy decoding costs the client as much more as it saves: Arrow's CSV parser is faster.)"""
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(query).as_bytes(conn)
    pgconn = conn.pgconn
    res = pgconn.exec_(stmt)
    if res.status != pq.ExecStatus.COPY_OUT:
        _raise_pg(pgconn, what)
    read, parse, convert = _csv_options(schema)
    reader = _RowReader(pgconn, chunk_bytes, what)
    try:
        for block in reader.blocks():
            yield from _parse(block, read, parse, convert, schema, chunk_rows)
    finally:
        reader.close()
        errors = _finish(pgconn, early=not reader.finished)
    if errors:
        _raise_copy_error(pgconn, what, errors)


FIRST_BLOCK_BYTES = 256 << 10


class _RowReader:
    """Reads the rows of a COPY on a thread into blocks of whole rows (about ``nbytes`` bytes); at
    most one block waits for the consumer (bounded memory). A row is copied into
    its block at once: a held libpq buffer per row would cost ~500 bytes.

    libpq is polled without blocking (``get_copy_data(1)``) and the socket waited on with ``poll``,
    which releases the GIL — a blocking ``get_copy_data(0)`` holds it while it waits for Postgres."""

    def __init__(self, pgconn: pq.abc.PGconn, nbytes: int, what: str) -> None:
        self.pgconn, self.nbytes, self.what = pgconn, nbytes, what
        self.finished = False  # the end of the COPY was read
        self._queue: queue.Queue[bytearray | BaseException | None] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opsloop-copy-reader", daemon=True)
        self._thread.start()

    def blocks(self) -> Iterator[bytearray]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (it leaves the rest of the COPY unread) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)  # unblocks a waiting put

    def _put(self, item: bytearray | BaseException | None) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return True
        return False

    def _run(self) -> None:
        try:
            self._read()
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
        else:
            self._put(None)

    def _read(self) -> None:
        """The per-row loop: each operation in it costs ~0.1 s per 1M rows, so it does the least."""
        pgconn, stop = self.pgconn, self._stop
        # the first block small, so the consumer starts while Postgres is still warming up; then
        # doubling up to ``nbytes`` (bigger blocks parse cheaper per row). Rows are not counted here
        # (``_parse`` cuts a block into batches of ``chunk_rows``): one operation less per row
        limit_bytes = min(FIRST_BLOCK_BYTES, self.nbytes)
        get, poll = pgconn.get_copy_data, select.poll()
        poll.register(pgconn.socket, select.POLLIN)
        block = bytearray()
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                block += data
                if len(block) >= limit_bytes:
                    if not self._put(block):
                        return
                    block = bytearray()
                    limit_bytes = min(limit_bytes * 2, self.nbytes)
            elif nbytes == 0:  # no whole row buffered: wait for the socket (GIL released), read it
                if stop.is_set():
                    return
                poll.poll(1000)
                try:
                    pgconn.consume_input()
                except psycopg.Error:
                    _raise_pg(pgconn, self.what)
            else:
                if nbytes == -2:
                    _raise_pg(pgconn, self.what)
                self.finished = True
                break
        if block:
            self._put(block)


def copy_values(conn: psycopg.Connection, query: sql.Composable, what: str) -> tuple[bytearray, np.ndarray, np.ndarray]:
    """The values of a one-column ``bytea`` query through ``COPY … (FORMAT binary)``: one buffer plus
    each value's offset and length (libpq hands over a message per row; no Python object per value
    outlives it). NULL values are left out."""
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query).as_bytes(conn)
    pgconn = conn.pgconn
    if pgconn.exec_(stmt).status != pq.ExecStatus.COPY_OUT:
        _raise_pg(pgconn, what)
    buf, ends, nbytes = bytearray(), array("q"), 0
    get = pgconn.get_copy_data
    try:
        while True:
            nbytes, data = get(0)
            if nbytes < 0:
                break
            buf += data
            ends.append(len(buf))
        if nbytes == -2:
            _raise_pg(pgconn, what)
    finally:
        errors = _finish(pgconn, early=nbytes >= 0)
    if errors:
        _raise_copy_error(pgconn, what, errors)
    return (buf, *_binary_rows(buf, np.frombuffer(ends, dtype=np.int64)))


def _binary_rows(buf: bytearray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths of the one-column rows of a binary COPY stream. Each row is one message
    (int16 1, int32 length, bytes), the header rides on the first, the trailer (int16 -1) is last;
    anything else is walked row by row."""
    if len(buf) < 21 or buf[:11] != b"PGCOPY\n\xff\r\n\x00":
        raise TerminalError("Postgres COPY (FORMAT binary): unexpected stream header")
    head = 19 + int.from_bytes(buf[15:19], "big")
    starts = np.concatenate([[head], ends[:-2]]) if len(ends) > 1 else np.zeros(0, dtype=np.int64)
    data = np.frombuffer(buf, dtype=np.uint8)
    if len(starts) and (starts + 6 <= ends[:-1]).all():
        count = (data[starts].astype(np.int64) << 8) | data[starts + 1]
        lens = np.ascontiguousarray(data[starts[:, None] + 2 + np.arange(4)]).view(">i4").ravel().astype(np.int64)
        if (count == 1).all() and (starts + 6 + np.maximum(lens, 0) == ends[:-1]).all():
            keep = lens >= 0
            return starts[keep] + 6, lens[keep]
    out_starts, out_lens, pos = array("q"), array("q"), head  # not one message per row: walk the stream
    while int.from_bytes(buf[pos : pos + 2], "big", signed=True) == 1:
        n = int.from_bytes(buf[pos + 2 : pos + 6], "big", signed=True)
        if n >= 0:
            out_starts.append(pos + 6)
            out_lens.append(n)
        pos += 6 + max(n, 0)
    return np.frombuffer(out_starts, dtype=np.int64), np.frombuffer(out_lens, dtype=np.int64)


def _finish(pgconn: pq.abc.PGconn, early: bool) -> str:
    """Consume the rest of the COPY and its results, so the connection stays usable (also when the
    consumer stopped early and closed the generator). Returns the error text, if any."""
    if early:
        while pgconn.get_copy_data(0)[0] >= 0:
            pass
    errors = []
    final = pgconn.get_result()
    while final is not None:
        if final.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            errors.append((final.error_message or b"").decode(errors="replace").strip())
        final = pgconn.get_result()
    return "; ".join(errors)


def _parse(
    block: bytes | bytearray,
    read: pcsv.ReadOptions,
    parse: pcsv.ParseOptions,
    convert: pcsv.ConvertOptions,
    schema: pa.Schema,
    chunk_rows: int,
) -> Iterator[pa.RecordBatch]:
    try:
        table = pcsv.read_csv(pa.py_buffer(block), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise TerminalError(f"Postgres COPY data did not convert to {schema}: {str(exc)[:300]}") from exc
    yield from table.combine_chunks().to_batches(max_chunksize=chunk_rows)


def text_to_arrow(values: Sequence[str | None] | pa.Array, column: PgColumn | tuple[str, int]) -> pa.Array:
    """Postgres text values of one column (pgoutput) → an Arrow array of the column's mapped type."""
    name, oid = (column.name, column.type_oid) if isinstance(column, PgColumn) else column
    target = arrow_type(oid)
    arr = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
    if target == pa.string():
        return arr
    try:
        if oid == BOOL_OID:
            return pc.starts_with(arr, pattern="t")  # Postgres prints t / f (no scalar: see pyvalues.table)
        if oid == TS_OID:
            return arr.cast(pa.timestamp("us")).cast(TS)
        if oid == NUMERIC_OID:
            return arr.cast(pa.decimal128(38, 9), safe=False)
        return arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TerminalError(f"column {name!r}: Postgres values do not convert to {target}: {exc}") from None
