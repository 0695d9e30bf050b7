"""The ``_quarantine`` table: every row a quality rule rejected, with the rule and the reason.

Rows arrive here already PII-masked/hashed (the loader applies the spec's ``pii`` section before
handing failures over), so the quarantine never stores a raw configured value. Failures are
buffered during the extract (the warehouse is busy staging) and written before the gate decides;
beyond ``spill_rows`` they go to a temporary Parquet file, so memory stays bounded.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from opsloop.transform import pyvalues
from opsloop.transform.quality import COLUMN_COL, REASON_COL, RULE_COL
from opsloop.warehouse.base import TableRef, Warehouse

if TYPE_CHECKING:
    import pyarrow.parquet as pq

QUARANTINE_TABLE = "_quarantine"
QUARANTINE_SCHEMA = pa.schema(
    [
        ("pipeline", pa.string()),
        ("source", pa.string()),
        ("stream", pa.string()),
        ("target_table", pa.string()),
        ("run_id", pa.string()),
        ("rule", pa.string()),
        ("column_name", pa.string()),
        ("reason", pa.string()),
        ("row_json", pa.string()),
        ("quarantined_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def _rows_json(failures: pa.Table) -> list[str]:
    data = failures.drop_columns([c for c in (RULE_COL, COLUMN_COL, REASON_COL) if c in failures.column_names])
    return [json.dumps(r, default=_json_default, sort_keys=True) for r in pyvalues.rows(data)]


class QuarantineWriter:
    """Collects one load's failures and appends them to ``<meta>._quarantine``."""

    def __init__(
        self,
        meta_dataset: str,
        pipeline: str,
        source: str,
        stream: str,
        target: str,
        run_id: str,
        spill_rows: int = 50_000,
    ) -> None:
        self.ref = TableRef(meta_dataset, QUARANTINE_TABLE)
        self.context = (pipeline, source, stream, target, run_id)
        self.spill_rows = spill_rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.written = 0
        self._spill: pq.ParquetWriter | None = None
        self._spill_path: Path | None = None

    def add(self, failures: pa.Table) -> None:
        """``failures``: masked failing rows plus the ``_q_rule`` / ``_q_column`` / ``_q_reason`` columns."""
        if failures.num_rows == 0:
            return
        n = failures.num_rows
        pipeline, source, stream, target, run_id = self.context
        now = datetime.now(UTC)
        rows = pa.table(
            {
                "pipeline": [pipeline] * n,
                "source": [source] * n,
                "stream": [stream] * n,
                "target_table": [target] * n,
                "run_id": [run_id] * n,
                "rule": failures.column(RULE_COL),
                "column_name": failures.column(COLUMN_COL),
                "reason": failures.column(REASON_COL),
                "row_json": _rows_json(failures),
                "quarantined_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=QUARANTINE_SCHEMA,
        )
        self.buffer.append(rows)
        self.buffered += n
        if self.buffered >= self.spill_rows:
            self._spill_buffer()

    def _spill_buffer(self) -> None:
        if self._spill is None:
            fd, name = tempfile.mkstemp(prefix="opsloop-quarantine-", suffix=".parquet")
            os.close(fd)
            import pyarrow.parquet as pq  # only when a spill is needed (~30 ms of import otherwise)

            self._spill_path = Path(name)
            self._spill = pq.ParquetWriter(str(self._spill_path), QUARANTINE_SCHEMA)
        for t in self.buffer:
            self._spill.write_table(t)
        self.buffer, self.buffered = [], 0

    def flush(self, wh: Warehouse) -> int:
        """Append everything collected so far; returns the number of rows written."""
        written = 0
        if self._spill is not None and self._spill_path is not None:
            self._spill.close()
            self._spill = None
            import pyarrow.parquet as pq

            reader = pq.ParquetFile(str(self._spill_path))
            for i in range(reader.num_row_groups):
                part = reader.read_row_group(i)
                wh.append(self.ref, part, job_key=None)
                written += part.num_rows
            self._spill_path.unlink(missing_ok=True)
            self._spill_path = None
        if self.buffer:
            table = pa.concat_tables(self.buffer)
            wh.append(self.ref, table, job_key=None)
            written += table.num_rows
            self.buffer, self.buffered = [], 0
        self.written += written
        return written

    def discard(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._spill_path is not None:
            self._spill_path.unlink(missing_ok=True)
            self._spill_path = None
        self.buffer, self.buffered = [], 0
