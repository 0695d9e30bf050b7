"""File source (Parquet / CSV) for backfills: chunked scans through ``pyarrow.dataset``.

``path`` is a file, a directory or a glob; with several tables it must contain ``{table}``. With a
watermark column only rows at or above the committed watermark − lag are read (pushed down to the
scan); without one every run re-reads the files and the MERGE keeps the result idempotent.
Columns are normalised to opsloop's types (int64, float64, decimal128(38, 9), timestamp[us, UTC],
string); CSV column types are inferred by Arrow (a later file that infers differently meets the
schema policy like any other source).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from opsloop.errors import ConfigError, TerminalError
from opsloop.sources.base import LoadRequest, Position, Sink
from opsloop.spec import PipelineSpec, SourceSpec, TableSpec
from opsloop.transform.pyvalues import max_time

TS = pa.timestamp("us", tz="UTC")


def normalise_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_decimal(t):
        return pa.decimal128(38, 9)
    if pa.types.is_timestamp(t):
        return TS
    if pa.types.is_date(t):
        return pa.date32()
    if pa.types.is_boolean(t):
        return pa.bool_()
    if pa.types.is_dictionary(t):
        return normalise_type(t.value_type)
    return pa.string()


def normalise_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, normalise_type(f.type)) for f in schema])


def _floor(value: datetime, field_type: pa.DataType) -> datetime:
    """A watermark floored to the files' timestamp unit (the filter reads a superset, never less)."""
    unit = getattr(field_type, "unit", "us")
    if unit == "s":
        return value.replace(microsecond=0)
    return value.replace(microsecond=value.microsecond // 1000 * 1000) if unit == "ms" else value


def _column_names(message: str, names: list[str]) -> str:
    """Arrow's ``CSV column #i`` → the column's name."""
    return re.sub(
        r"column #(\d+)",
        lambda m: f"column #{m.group(1)} ({names[int(m.group(1))]!r})" if int(m.group(1)) < len(names) else m.group(0),
        message,
    )


def _bad_value(col: pa.Array) -> int:
    """Index of the first value that is not UTF-8 text (error path only)."""
    for i, v in enumerate(col.to_pylist()):
        if isinstance(v, bytes):
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return 0


def _cast(batch: pa.RecordBatch, schema: pa.Schema, where: str, keys: list[str]) -> pa.RecordBatch:
    cols = []
    for f, col in zip(schema, batch.columns, strict=True):
        if pa.types.is_timestamp(col.type) and col.type.tz is None:
            col = col.cast(pa.timestamp("us")).cast(TS)  # a zone-less timestamp is read as UTC
        try:
            cols.append(col.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            i = _bad_value(col) if pa.types.is_binary(col.type) else 0
            record = {k: batch.column(k)[i].as_py() for k in keys if k in batch.schema.names}
            what = "is not valid UTF-8 text" if pa.types.is_binary(col.type) else f"does not convert to {f.type}"
            raise TerminalError(
                f"{where}: column {f.name!r} {what} at the record {record or f'#{i}'} "
                f"(value {col[i].as_py()!r:.80}): {exc}"
            ) from exc
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class FileSource:
    """Reads each table of a ``type: file`` source into a :class:`Sink`."""

    def __init__(self, spec: PipelineSpec, source: SourceSpec, base_dir: Path | None = None) -> None:
        if not source.path:
            raise ConfigError(f"sources[{source.id}].path: required for a file source")
        self.spec = spec
        self.source = source
        self.base = base_dir or Path.cwd()

    def files(self, table: TableSpec) -> list[str]:
        pattern = self.source.path or ""
        if len(self.source.tables) > 1 and "{table}" not in pattern:
            raise ConfigError(f"sources[{self.source.id}].path: several tables need a '{{table}}' placeholder")
        pattern = pattern.replace("{table}", table.name)
        p = Path(pattern) if Path(pattern).is_absolute() else self.base / pattern
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_")))
        else:
            found = sorted(glob.glob(str(p)))
        if not found:
            raise TerminalError(f"source {self.source.id}: no files match {p} for table {table.name}")
        return found

    def _format(self, files: list[str]) -> str:
        if self.source.format:
            return self.source.format
        suffix = Path(files[0]).suffix.lower()
        if suffix in (".parquet", ".pq"):
            return "parquet"
        if suffix in (".csv", ".txt"):
            return "csv"
        raise ConfigError(f"sources[{self.source.id}].format: cannot tell the format of {files[0]} (parquet or csv)")

    def run(self, sink: Sink, full_refresh: bool = False, since: datetime | None = None) -> dict[str, object]:
        read = 0
        for table in self.source.tables:
            read += self._table(table, sink, full_refresh, since)
        return {"mode": "file", "files_read": read}

    def _table(self, table: TableSpec, sink: Sink, full_refresh: bool, since: datetime | None) -> int:
        files = self.files(table)
        dataset = ds.dataset(files, format=self._format(files))
        names = table.columns or dataset.schema.names
        unknown = [c for c in names if c not in dataset.schema.names]
        if unknown:
            raise TerminalError(f"source {self.source.id}.{table.name}: column(s) {unknown} not in the files")
        schema = normalise_schema(pa.schema([dataset.schema.field(c) for c in names]))
        wm = self.source.watermark_field(table)
        state = None if full_refresh else sink.state(table.name)
        before: datetime | None = state.get("watermark") if state else None
        start = since or (before - self.source.sync.lag if before is not None else None)
        flt = None
        if wm is not None and start is not None:
            if wm not in dataset.schema.names:
                raise ConfigError(f"source {self.source.id}: watermark column {wm!r} is not in {table.name}'s files")
            field_type = dataset.schema.field(wm).type
            flt = ds.field(wm) >= pa.scalar(_floor(start, field_type), type=TS).cast(field_type)
        top: dict[str, datetime | None] = {"value": before}

        def batches() -> Iterator[pa.RecordBatch]:
            scanner = dataset.scanner(columns=names, filter=flt, batch_size=self.source.chunk_rows)
            where = f"source {self.source.id}.{table.name}"
            tagged = scanner.scan_batches()
            while True:
                try:
                    item = next(tagged, None)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # the message names the file
                    raise TerminalError(f"{where}: {_column_names(str(exc), names)}") from exc
                if item is None:
                    break
                raw = item.record_batch
                if raw.num_rows == 0:
                    continue
                batch = _cast(raw, schema, f"{where}: {item.fragment.path}", table.primary_key)
                if wm is not None and wm in names:
                    m = max_time(batch.column(wm))
                    if m is not None and (top["value"] is None or m > top["value"]):
                        top["value"] = m
                yield batch

        sink.load(
            LoadRequest(
                table,
                schema,
                batches(),
                position=lambda: Position(watermark=top["value"], extra={"files": len(files)}),
                replace=full_refresh,
                kind="incremental" if start is not None else "full",
                position_before=Position(watermark=before),
            )
        )
        return len(files)
