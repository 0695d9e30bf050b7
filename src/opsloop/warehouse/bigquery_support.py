"""BigQuery helpers for :mod:`opsloop.warehouse.bigquery`: the client factory for emulators, error
translation (once, here), query parameters, type mapping, job ids, job statistics and the
bounded-memory Parquet spool the load jobs upload from.

Imports google-cloud-bigquery at module level on purpose: only the BigQuery adapter imports this.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from opsloop.errors import OpsloopError, TerminalError, TransientError
from opsloop.warehouse.base import Column, JobStats, TableSchema, arrow_to_logical

TRANSIENT_STATUS = {429, 500, 502, 503, 504}
TRANSIENT_REASONS = {"rateLimitExceeded", "backendError", "internalError", "jobBackendError", "jobInternalError"}
_JOB_ID_RE = re.compile(r"[^A-Za-z0-9_-]")
MAX_JOB_ID = 1024
DEFAULT_HOST = "bigquery.googleapis.com"

BQ_TO_LOGICAL = {
    "STRING": "STRING",
    "INTEGER": "INT64",
    "INT64": "INT64",
    "FLOAT": "FLOAT64",
    "FLOAT64": "FLOAT64",
    "NUMERIC": "NUMERIC",
    "BIGNUMERIC": "NUMERIC",
    "BOOLEAN": "BOOL",
    "BOOL": "BOOL",
    "TIMESTAMP": "TIMESTAMP",
    "DATETIME": "TIMESTAMP",
    "DATE": "DATE",
    "BYTES": "BYTES",
    "JSON": "JSON",
}


def make_bigquery_client(project: str, location: str | None, api_endpoint: str | None = None) -> bigquery.Client:
    """A client with anonymous credentials on an explicit REST endpoint (emulators, loopback tests)."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    options = ClientOptions(api_endpoint=api_endpoint) if api_endpoint else None
    return bigquery.Client(
        project=project, location=location, credentials=AnonymousCredentials(), client_options=options
    )


# -- errors ------------------------------------------------------------------------------------
def _reasons(exc: BaseException) -> list[str]:
    errors = getattr(exc, "errors", None) or []
    return [str(e.get("reason", "")) for e in errors if isinstance(e, Mapping)]


def translate_error(exc: BaseException, where: str, max_bytes_billed: int | None = None) -> OpsloopError:
    """A google/transport exception → TerminalError | TransientError with ``where`` (table/job) in it."""
    if isinstance(exc, OpsloopError):
        return exc
    msg = str(exc)
    reasons = _reasons(exc)
    if "bytesBilledLimitExceeded" in reasons or "limit for bytes billed" in msg:
        cap = f"{max_bytes_billed:,}" if max_bytes_billed else "the configured"
        return TerminalError(
            f"BigQuery {where}: query would bill more than maximum_bytes_billed={cap} bytes and was refused; "
            f"narrow the query (partition filter) or raise the cap on the BigQuery block: {msg}"
        )
    code = getattr(exc, "code", None)
    transient = (
        (isinstance(code, int) and code in TRANSIENT_STATUS)
        or bool(TRANSIENT_REASONS.intersection(reasons))
        or "concurrent update" in msg.lower()
        or isinstance(
            exc,
            gexc.RetryError
            | gexc.ServerError
            | gexc.TooManyRequests
            | concurrent.futures.TimeoutError
            | TimeoutError
            | ConnectionError,
        )
        or _is_transport_error(exc)
    )
    if transient:
        return TransientError(f"BigQuery {where}: temporary failure, retry: {msg}")
    return TerminalError(f"BigQuery {where}: {msg}")


def _is_transport_error(exc: BaseException) -> bool:
    import requests
    from google.auth import exceptions as auth_exc

    return isinstance(exc, requests.ConnectionError | requests.Timeout | auth_exc.TransportError)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, gexc.Conflict) or getattr(exc, "code", None) == 409


# -- identifiers and job ids --------------------------------------------------------------------
def job_id_for(kind: str, table_id: str, job_key: str, attempt: int = 0) -> str:
    """Deterministic job id: the same (kind, table, key) always gives the same id, so a retry resumes.

    The destination table is part of the id (one key may load several tables) and a short hash keeps
    distinct keys distinct after sanitising to [A-Za-z0-9_-]; ``attempt`` > 0 is used only after the
    job of that id failed.
    """
    raw = f"{kind}|{table_id}|{job_key}"
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    readable = _JOB_ID_RE.sub("_", f"{table_id.split('.', 1)[-1]}_{job_key}")
    suffix = f"_{digest}" + (f"_a{attempt}" if attempt else "")
    head = f"opsloop_{kind}_"
    return head + readable[: MAX_JOB_ID - len(head) - len(suffix)] + suffix


# -- schema ----------------------------------------------------------------------------------------
def schema_from_table(table: bigquery.Table) -> TableSchema:
    cols = tuple(
        Column(f.name, BQ_TO_LOGICAL.get(str(f.field_type).upper(), "STRING"), f.mode != "REQUIRED")
        for f in table.schema
    )
    tp = table.time_partitioning
    return TableSchema(cols, tp.field if tp is not None else None, tuple(table.clustering_fields or ()))


def normalised_arrow_schema(schema: pa.Schema) -> pa.Schema:
    """The Parquet schema we upload: UTC microsecond timestamps, plain strings, decimals kept."""
    fields = []
    for f in schema:
        t = f.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_timestamp(t):
            t = pa.timestamp("us", tz="UTC")
        elif pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t):
            t = pa.string()
        elif pa.types.is_large_binary(t):
            t = pa.binary()
        elif pa.types.is_integer(t):
            t = pa.int64()
        elif pa.types.is_floating(t):
            t = pa.float64()
        elif pa.types.is_date(t):
            t = pa.date32()
        fields.append(pa.field(f.name, t, True))
    return pa.schema(fields)


def bq_schema(schema: pa.Schema) -> list[bigquery.SchemaField]:
    return [bigquery.SchemaField(f.name, arrow_to_logical(f.type), mode="NULLABLE") for f in schema]


class ParquetSpool:
    """Write Arrow batches one by one into a temp Parquet file (memory bounded by one batch)."""

    def __init__(self, schema: pa.Schema, where: str = "") -> None:
        self.schema = normalised_arrow_schema(schema)
        self.where = where
        self._dir = tempfile.TemporaryDirectory(prefix="opsloop-bq-")
        self.path = Path(self._dir.name) / "data.parquet"
        self.rows = 0

    def write(self, batches: Iterable[pa.RecordBatch]) -> int:
        with pq.ParquetWriter(self.path, self.schema, compression="snappy") as writer:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                try:
                    table = pa.Table.from_batches([batch]).select(self.schema.names).cast(self.schema)
                except (pa.ArrowException, KeyError) as exc:
                    msg = f"{self.where}: batch at row {self.rows} does not fit the schema {self.schema.names}: {exc}"
                    raise TerminalError(msg) from exc
                writer.write_table(table)
                self.rows += batch.num_rows
        return self.rows

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self._dir.cleanup()


# -- query parameters ---------------------------------------------------------------------------------
def _scalar_type(value: Any) -> str:
    if value is None or isinstance(value, str):
        return "STRING"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, float):
        return "FLOAT64"
    if isinstance(value, Decimal):
        exp = value.as_tuple().exponent
        frac = -exp if isinstance(exp, int) and exp < 0 else 0
        return "NUMERIC" if not value.is_finite() or (value.adjusted() < 29 and frac <= 9) else "BIGNUMERIC"
    if isinstance(value, datetime):
        return "TIMESTAMP"
    if isinstance(value, date):
        return "DATE"
    if isinstance(value, bytes):
        return "BYTES"
    raise TerminalError(f"query parameter of unsupported type {type(value).__name__}: {value!r}")


def query_parameters(params: Mapping[str, Any] | None) -> list[Any]:
    """Named parameters (``@name``) with types inferred from the Python values."""
    out: list[Any] = []
    for name, value in (params or {}).items():
        if isinstance(value, list | tuple):
            first = next((v for v in value if v is not None), None)
            out.append(bigquery.ArrayQueryParameter(name, _scalar_type(first), list(value)))
        else:
            out.append(bigquery.ScalarQueryParameter(name, _scalar_type(value), value))
    return out


# -- statistics -----------------------------------------------------------------------------------------
def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def job_stats(
    job: Any, kind: str, target: str | None, seconds: float, labels: Mapping[str, str], rows: int | None = None
) -> JobStats:
    """JobStats from a finished job's resource (``statistics`` as the REST API returns it)."""
    props: dict[str, Any] = getattr(job, "_properties", {}) or {}
    st: dict[str, Any] = props.get("statistics", {}) or {}
    q: dict[str, Any] = st.get("query", {}) or {}
    load: dict[str, Any] = st.get("load", {}) or {}
    dml: dict[str, Any] = q.get("dmlStats", {}) or {}
    if rows is None:
        rows = _int(load.get("outputRows")) if load else _int(q.get("numDmlAffectedRows"))
    return JobStats(
        kind=kind,
        job_id=getattr(job, "job_id", None),
        target=target,
        bytes_processed=_int(q.get("totalBytesProcessed", st.get("totalBytesProcessed"))),
        bytes_billed=_int(q.get("totalBytesBilled")),
        slot_ms=_int(q.get("totalSlotMs", st.get("totalSlotMs"))),
        rows=rows,
        inserted=_int(dml.get("insertedRowCount")),
        updated=_int(dml.get("updatedRowCount")),
        deleted=_int(dml.get("deletedRowCount")),
        seconds=seconds,
        labels=dict(getattr(job, "labels", None) or labels),
        cache_hit=bool(q.get("cacheHit", False)),
        started=getattr(job, "started", None),
    )


def storage_client(client: bigquery.Client, storage_endpoint: str | None) -> Any:
    """A BigQuery Storage Read API client, or None (read over REST).

    With ``storage_endpoint`` (an emulator's gRPC host:port) it talks plaintext gRPC to that host;
    with an overridden REST endpoint and no storage endpoint there is none (REST fallback), since
    the default Storage host is unreachable from where an emulator runs.
    """
    if storage_endpoint:
        import grpc
        from google.cloud.bigquery_storage_v1 import BigQueryReadClient
        from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

        channel = grpc.insecure_channel(storage_endpoint)
        return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
    base = str(getattr(getattr(client, "_connection", None), "API_BASE_URL", DEFAULT_HOST))
    if DEFAULT_HOST not in base or os.environ.get("BIGQUERY_EMULATOR_HOST"):
        return None
    try:
        return client._ensure_bqstorage_client()
    except Exception:  # storage extra missing or unusable → REST
        return None


def literal_value(value: Any) -> str:
    """A MIN/MAX partition bound as BigQuery literal text (UTC for timestamps)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(sep=" ") if value.tzinfo else value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def rechunk(batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterable[pa.RecordBatch]:
    """Split batches so none has more than ``batch_rows`` rows (Storage API streams pick their own size)."""
    for batch in batches:
        for start in range(0, batch.num_rows, batch_rows):
            yield batch.slice(start, batch_rows)


def sql_head(sql: str, n: int = 120) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"
