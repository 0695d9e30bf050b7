"""BigQuery adapter: the production warehouse, on google-cloud-bigquery.

Every job carries the adapter's labels and (queries) the ``maximum_bytes_billed`` cap; its statistics
come back as :class:`JobStats`. Staging loads are one Parquet load job with a deterministic job id
from ``job_key`` (a retried load finds its job and waits for it instead of loading twice). MERGE comes
from the shared builder, pruned to the staging partition range; the state row is committed by a second
job after it (the MERGE is idempotent). Vendor errors are translated once, here (bigquery_support).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pyarrow as pa
from google.api_core import exceptions as gexc
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY

from opsloop import faults
from opsloop.errors import TerminalError
from opsloop.warehouse import bigquery_support as bqs
from opsloop.warehouse.base import JobStats, MergeSpec, StateUpdate, TableRef, TableSchema, clean_labels, record_job
from opsloop.warehouse.bigquery_support import ParquetSpool, make_bigquery_client, translate_error
from opsloop.warehouse.merge import (
    STATE_SCHEMA,
    STATE_TABLE,
    Dialect,
    add_column_sql,
    create_table_sql,
    merge_sql,
    state_merge_sql,
    state_params,
)

__all__ = ["BigQueryAdapter", "make_bigquery_client"]

T = TypeVar("T")
STAGING_TTL = timedelta(days=1)
MAX_LOAD_ATTEMPTS = 5
_OPTIONS = ["project", "location", "dataset_prefix", "meta_dataset", "maximum_bytes_billed", "storage_endpoint"]
_OPTIONS += ["job_timeout", "retry_deadline", "upload_retries"]


class BigQueryAdapter:
    """Warehouse protocol on BigQuery. ``dataset`` ↔ dataset (with ``dataset_prefix``), ``table`` ↔ table."""

    dialect = "bigquery"

    def __init__(
        self,
        client: bigquery.Client,
        *,
        project: str,
        location: str | None,
        dataset_prefix: str = "",
        meta_dataset: str = "opsloop_meta",
        labels: Mapping[str, Any] | None = None,
        maximum_bytes_billed: int | None = None,
        storage_endpoint: str | None = None,
        job_timeout: float | None = 3600.0,
        retry_deadline: float = 120.0,
        upload_retries: int = 6,
    ) -> None:
        self.client = client
        self.project = project
        self.location = location
        self.dataset_prefix = dataset_prefix
        self.meta_dataset = meta_dataset
        self.labels = clean_labels(labels or {})
        self.maximum_bytes_billed = maximum_bytes_billed
        self.storage_endpoint = storage_endpoint
        self.job_timeout = job_timeout
        self.retry_deadline = retry_deadline
        self.upload_retries = upload_retries
        # the client retries transient API errors for a bounded time; then TransientError → task retry
        self._retry = bigquery.DEFAULT_RETRY.with_timeout(retry_deadline)
        self._job_retry = DEFAULT_JOB_RETRY.with_timeout(2 * retry_deadline)
        self.jobs: list[JobStats] = []
        self._sql = Dialect("bigquery", project, dataset_prefix)
        self._datasets: set[str] = set()
        self._state_ready = False
        self._storage_client: Any = None
        self._storage_checked = False

    # -- plumbing ------------------------------------------------------------------------------
    def with_labels(self, **labels: Any) -> BigQueryAdapter:
        """A clone whose jobs carry extra labels; it shares ``jobs`` with this adapter."""
        options = {k: getattr(self, k) for k in _OPTIONS}
        clone = BigQueryAdapter(self.client, **options, labels={**self.labels, **labels})
        clone.jobs = self.jobs
        clone._datasets = self._datasets
        return clone

    def param(self, name: str) -> str:
        return self._sql.param(name)

    def quote(self, ref: TableRef | str) -> str:
        return self._sql.table(ref) if isinstance(ref, TableRef) else self._sql.ident(ref)

    def table_id(self, ref: TableRef) -> str:
        return f"{self.project}.{self._sql.dataset(ref.dataset)}.{ref.table}"

    def _call(self, where: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise translate_error(exc, where, self.maximum_bytes_billed) from exc

    def _log_job(self, stats: JobStats) -> JobStats:
        """Keep a finished job's statistics here and in the process-wide job log (cost ledger)."""
        self.jobs.append(stats)
        record_job(stats)
        return stats

    def _query_job(
        self, sql: str, params: Mapping[str, Any] | None, kind: str, target: str | None = None, record: bool = True
    ) -> tuple[bigquery.QueryJob, JobStats]:
        """Run one query job to completion: labels, bytes cap, parameters; errors translated."""
        config = bigquery.QueryJobConfig(
            labels=dict(self.labels),
            query_parameters=bqs.query_parameters(params),
            maximum_bytes_billed=self.maximum_bytes_billed,
        )
        started = time.perf_counter()
        job: bigquery.QueryJob | None = None
        try:
            job = self.client.query(
                sql,
                job_config=config,
                location=self.location,
                job_id_prefix=f"opsloop_{kind}_",
                retry=self._retry,
                job_retry=None,  # the insert is retried by `retry`; failed jobs are re-run by result()
            )
            job.result(retry=self._retry, timeout=self.job_timeout, job_retry=self._job_retry)
        except Exception as exc:
            jid = job.job_id if job is not None else "(not started)"
            where = f"{kind} job {jid}" + (f" on {target}" if target else "") + f" [{bqs.sql_head(sql)}]"
            raise translate_error(exc, where, self.maximum_bytes_billed) from exc
        stats = bqs.job_stats(job, kind, target, time.perf_counter() - started, self.labels)
        if record:
            self._log_job(stats)
        return job, stats

    # -- DDL -----------------------------------------------------------------------------------
    def ensure_dataset(self, dataset: str) -> None:
        physical = self._sql.dataset(dataset)
        if physical in self._datasets:
            return
        ds = bigquery.Dataset(f"{self.project}.{physical}")
        ds.location = self.location
        ds.labels = {"managed_by": "opsloop"}
        self._call(
            f"dataset {self.project}.{physical}", self.client.create_dataset, ds, exists_ok=True, retry=self._retry
        )
        self._datasets.add(physical)

    def table_schema(self, ref: TableRef) -> TableSchema | None:
        try:
            table = self.client.get_table(self.table_id(ref), retry=self._retry)
        except gexc.NotFound:
            return None
        except Exception as exc:
            raise translate_error(exc, f"table {self.table_id(ref)}") from exc
        return bqs.schema_from_table(table)

    def ensure_table(self, ref: TableRef, schema: TableSchema) -> TableSchema:
        """Create the table (partitioning, clustering) if missing; add columns it lacks."""
        self.ensure_dataset(ref.dataset)
        existing = self.table_schema(ref)
        if existing is None:
            self._query_job(create_table_sql(self._sql, ref, schema), None, "ddl", str(ref))
        else:
            for col in schema.columns:
                if existing.column(col.name) is None:
                    self._query_job(add_column_sql(self._sql, ref, col), None, "ddl", str(ref))
        return self.table_schema(ref) or schema

    def drop_table(self, ref: TableRef) -> None:
        tid = self.table_id(ref)
        self._call(f"drop table {tid}", self.client.delete_table, tid, not_found_ok=True, retry=self._retry)

    # -- loading -------------------------------------------------------------------------------
    def load_staging(
        self, ref: TableRef, data: pa.Table | Iterable[pa.RecordBatch], schema: pa.Schema, job_key: str
    ) -> JobStats:
        """Replace ``ref`` with the batches: spooled to a temp Parquet file, then one load job."""
        started = time.perf_counter()
        self.ensure_dataset(ref.dataset)
        spool = ParquetSpool(schema, f"staging {self.table_id(ref)}")
        try:
            spool.write(data.to_batches() if isinstance(data, pa.Table) else data)
            if spool.rows == 0:
                return self._empty_staging(ref, spool.schema, started)
            stats = self._load(
                ref, spool, bigquery.WriteDisposition.WRITE_TRUNCATE, job_key, bqs.bq_schema(spool.schema)
            )
        finally:
            spool.close()
        self._expire(ref)
        return stats

    def append(self, ref: TableRef, data: pa.Table, job_key: str | None = None, checked: bool = False) -> JobStats:
        """Append rows (logs, ledgers); with ``job_key`` a retried append is loaded once. ``checked``:
        the caller ensured the table and its columns already (no table read before the load)."""
        if not checked:
            self.ensure_table(ref, TableSchema.from_arrow(data.schema))
        spool = ParquetSpool(data.schema, f"append to {self.table_id(ref)}")
        try:
            spool.write(data.to_batches())
            if spool.rows == 0:
                stats = JobStats(kind="append", target=str(ref), labels=dict(self.labels))
                self._log_job(stats)
                return stats
            return self._load(ref, spool, bigquery.WriteDisposition.WRITE_APPEND, job_key, None, kind="append")
        finally:
            spool.close()

    def _load(
        self,
        ref: TableRef,
        spool: ParquetSpool,
        disposition: str,
        job_key: str | None,
        schema: list[bigquery.SchemaField] | None,
        kind: str = "load",
    ) -> JobStats:
        tid = self.table_id(ref)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=disposition,
            decimal_target_types=["NUMERIC", "BIGNUMERIC"],
            labels=dict(self.labels),
        )
        if schema is not None:
            config.schema = schema
        for attempt in range(MAX_LOAD_ATTEMPTS):
            job_id = bqs.job_id_for(kind, tid, job_key, attempt) if job_key else None
            started = time.perf_counter()
            resumed = False
            job: Any
            try:
                with open(spool.path, "rb") as fh:
                    job = self.client.load_table_from_file(
                        fh, tid, size=spool.size, job_id=job_id, job_id_prefix=f"opsloop_{kind}_",
                        location=self.location, job_config=config, num_retries=self.upload_retries,
                    )  # fmt: skip
            except Exception as exc:
                if not (job_id and bqs.is_conflict(exc)):
                    raise translate_error(exc, f"{kind} job {job_id or '(new)'} into {tid}") from exc
                # the same load was submitted before (a retry): wait for that job, do not load twice
                job = self._call(
                    f"{kind} job {job_id}", self.client.get_job, job_id, location=self.location, retry=self._retry
                )
                resumed = True
            try:
                job.result(retry=self._retry, timeout=self.job_timeout)
            except Exception as exc:
                if resumed:
                    continue  # that earlier attempt failed: load again under the next deterministic id
                raise translate_error(exc, f"{kind} job {job.job_id} into {tid}") from exc
            if resumed and disposition == bigquery.WriteDisposition.WRITE_TRUNCATE and not self._holds(ref, job):
                continue  # its table was dropped or replaced since: load again
            stats = bqs.job_stats(job, kind, str(ref), time.perf_counter() - started, self.labels)
            self._log_job(stats)
            return stats
        raise TerminalError(f"BigQuery {kind} into {tid}: {MAX_LOAD_ATTEMPTS} load jobs for key {job_key!r} failed")

    def _holds(self, ref: TableRef, job: Any) -> bool:
        """Does ``ref`` still hold what a finished WRITE_TRUNCATE load job wrote?"""
        try:
            table = self.client.get_table(self.table_id(ref), retry=self._retry)
        except gexc.NotFound:
            return False
        except Exception as exc:
            raise translate_error(exc, f"table {self.table_id(ref)}") from exc
        return bool(table.num_rows == getattr(job, "output_rows", None))

    def _empty_staging(self, ref: TableRef, schema: pa.Schema, started: float) -> JobStats:
        tid = self.table_id(ref)
        self.drop_table(ref)
        table = bigquery.Table(tid, schema=bqs.bq_schema(schema))
        table.expires = datetime.now(UTC) + STAGING_TTL
        self._call(f"create staging table {tid}", self.client.create_table, table, retry=self._retry)
        stats = JobStats(kind="load", target=str(ref), seconds=time.perf_counter() - started, labels=dict(self.labels))
        self._log_job(stats)
        return stats

    def _expire(self, ref: TableRef) -> None:
        """Staging tables expire after a day, so a crashed run leaves nothing behind for long."""
        tid = self.table_id(ref)
        table = bigquery.Table(tid)
        table.expires = datetime.now(UTC) + STAGING_TTL
        self._call(f"set expiration on {tid}", self.client.update_table, table, ["expires"], retry=self._retry)

    # -- MERGE ---------------------------------------------------------------------------------
    def merge(
        self, spec: MergeSpec, staging: TableRef, state: StateUpdate | None = None, job_key: str | None = None
    ) -> JobStats:
        """MERGE staging into target (pruned to the staging partition range), then commit the state."""
        bounds = self._partition_bounds(spec, staging) if spec.partition_column else None
        sql = merge_sql(self._sql, spec, staging=staging, partition_bounds=bounds)
        _, stats = self._query_job(sql, None, "merge", str(spec.target))
        faults.checkpoint("after_merge_before_state")
        if state is not None:
            self.commit_state(state)
        return stats

    def _partition_bounds(self, spec: MergeSpec, staging: TableRef) -> tuple[str, str] | None:
        col = self._sql.ident(spec.partition_column or "")
        sql = f"SELECT MIN({col}) AS lo, MAX({col}) AS hi FROM {self._sql.table(staging)}"
        job, _ = self._query_job(sql, None, "merge_bounds", str(staging))
        rows = list(self._call(f"merge_bounds job {job.job_id}", job.result, retry=self._retry))
        lo, hi = (rows[0][0], rows[0][1]) if rows else (None, None)
        if lo is None or hi is None:
            return None
        return bqs.literal_value(lo), bqs.literal_value(hi)

    # -- queries -------------------------------------------------------------------------------
    def execute(self, sql: str, params: Mapping[str, Any] | None = None, kind: str = "query") -> JobStats:
        return self._query_job(sql, params, kind)[1]

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        started = time.perf_counter()
        job, _ = self._query_job(sql, params, "query", record=False)
        storage = self._storage()
        where = f"query job {job.job_id} [{bqs.sql_head(sql)}]"
        rows = self._call(where, job.result, retry=self._retry)
        if storage is not None:
            table = self._call(where, rows.to_arrow, bqstorage_client=storage)
        else:
            table = self._call(where, rows.to_arrow, create_bqstorage_client=False)
        self._log_job(bqs.job_stats(job, "query", None, time.perf_counter() - started, self.labels, table.num_rows))
        return table

    def read_batches(
        self, sql: str, params: Mapping[str, Any] | None = None, batch_rows: int = 100_000
    ) -> Iterator[pa.RecordBatch]:
        """Stream the result as Arrow batches of ≤ ``batch_rows`` rows (Storage Read API when available)."""
        started = time.perf_counter()
        job, _ = self._query_job(sql, params, "read", record=False)
        where = f"read job {job.job_id} [{bqs.sql_head(sql)}]"
        total = 0
        try:
            rows = job.result(page_size=batch_rows, retry=self._retry)
            for batch in bqs.rechunk(rows.to_arrow_iterable(bqstorage_client=self._storage()), batch_rows):
                total += batch.num_rows
                yield batch
        except Exception as exc:
            raise translate_error(exc, where, self.maximum_bytes_billed) from exc
        finally:
            self._log_job(bqs.job_stats(job, "read", None, time.perf_counter() - started, self.labels, total))

    def _storage(self) -> Any:
        """The Storage Read API client (built once), or None to read over REST."""
        if not self._storage_checked:
            self._storage_checked = True
            self._storage_client = bqs.storage_client(self.client, self.storage_endpoint)
        return self._storage_client

    # -- state ---------------------------------------------------------------------------------
    def _ensure_state_table(self) -> None:
        if not self._state_ready:
            self.ensure_table(TableRef(self.meta_dataset, STATE_TABLE), STATE_SCHEMA)
            self._state_ready = True

    def get_state(self, pipeline: str, source: str) -> dict[str, Any] | None:
        self._ensure_state_table()
        t = self._sql.table(TableRef(self.meta_dataset, STATE_TABLE))
        rows = self.query(
            f"SELECT * FROM {t} WHERE pipeline = @pipeline AND source = @source",
            {"pipeline": pipeline, "source": source},
        ).to_pylist()
        return rows[0] if rows else None

    def commit_state(self, state: StateUpdate) -> JobStats:
        """Upsert the state row (a separate job, after the MERGE it describes)."""
        self._ensure_state_table()
        sql = state_merge_sql(self._sql, self.meta_dataset)
        return self._query_job(sql, state_params(state), "state", f"{self.meta_dataset}.{STATE_TABLE}")[1]

    def close(self) -> None:
        """Close the Storage API channel this adapter opened (the REST client belongs to the caller)."""
        if self._storage_client is not None and self.storage_endpoint:
            with contextlib.suppress(Exception):
                self._storage_client.transport.close()
        self._storage_client, self._storage_checked = None, False
