"""The two background threads of batch scoring, so predict_proba (which releases the GIL) is never
waiting for the warehouse:

* :class:`PopulationReader` streams the population from the warehouse into local Arrow files of
  ``rows`` rows, one per chunk, and hands each file over as soon as it is written: scoring starts on
  the first chunk while the read goes on, the warehouse connection is held only as long as the read
  itself, and memory stays bounded by a chunk however large the population.
* :class:`Stager` writes the scored chunks to a local file while the next chunks are being scored.
  On DuckDB that file (Parquet, uncompressed) *is* the staging table: the MERGE reads it with
  ``read_parquet`` — nothing is written to the warehouse while predict_proba runs (no compression
  of rows that are read once and dropped, no file lock taken from the other partition processes).
  On BigQuery the file (Arrow IPC) is staged by one load job at the end. The target table is not
  touched: the MERGE runs once scoring is complete.

An error in a thread surfaces in the caller at its next call; :meth:`close` / :meth:`abort` stop a
thread and wait for it, so nothing outlives the temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from opsloop.ingest.writer import TransactionalWarehouse
from opsloop.warehouse.base import TableRef, Warehouse
from opsloop.warehouse.write import _checked

_DONE = object()
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if os.name == "posix" else None


def release_memory() -> None:
    """Hand freed memory back to the OS: Arrow's pool and, on glibc, every malloc arena. Scoring
    frees chunk-sized buffers on four threads; without this the allocators keep the pages and the
    process grows with the run's length, not its chunk size (5M rows: +100 MB). ≈ 4 ms a call."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


T = TypeVar("T")
U = TypeVar("U")


def rebatch(
    batches: Iterable[pa.RecordBatch], rows: int, first: int | None = None
) -> Generator[pa.RecordBatch, None, None]:
    """Regroup a stream into batches of exactly ``rows`` rows (the last one shorter; the first one
    ``first`` rows when given): the warehouse reader yields smaller ones, and fewer, larger
    predict_proba calls cost less per row."""
    buf: list[pa.RecordBatch] = []
    have = 0
    want = first or rows
    for b in batches:
        if b.num_rows == 0:
            continue
        buf.append(b)
        have += b.num_rows
        while have >= want:
            table = pa.Table.from_batches(buf)
            yield table.slice(0, want).combine_chunks().to_batches()[0]
            rest = table.slice(want)
            buf, have = rest.combine_chunks().to_batches() if rest.num_rows else [], rest.num_rows
            want = rows
    if have:
        yield pa.Table.from_batches(buf).combine_chunks().to_batches()[0]


class PopulationReader:
    """Read ``source()`` in a background thread into one local Arrow IPC file per chunk of ``rows``;
    iterate to get the chunks in order as they land (each file is deleted once handed over). The
    first chunk is an eighth of ``rows`` and handed over in memory: scoring starts after a small
    read and preprocessing (then the next chunk is prepared while the first one is scored).

    ``overlap=False``: the first chunk is handed over only once the whole read has landed — for a
    warehouse that caches what a scan reads for as long as the read is open (DuckDB keeps the
    table's blocks in its buffer pool until the read's connection closes), so the cache is gone
    before the scoring buffers fill; a local read is fast and would take its CPU from scoring anyway."""

    def __init__(
        self, source: Callable[[], Iterable[pa.RecordBatch]], rows: int, tmp: Path, *, overlap: bool = True
    ) -> None:
        self._overlap = overlap
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(source, rows, tmp), name="opsloop-score-read", daemon=True
        )
        self._thread.start()

    def _run(self, source: Callable[[], Iterable[pa.RecordBatch]], rows: int, tmp: Path) -> None:
        try:
            stream = iter(source())
            chunks = rebatch(stream, rows, first=max(1, rows // 8))
            try:
                for i, batch in enumerate(chunks):
                    if self._stop.is_set():
                        break
                    if i == 0:
                        self._q.put(batch)
                        del batch
                        continue
                    path = tmp / f"population_{i:06d}.arrow"
                    # uncompressed IPC: cheap to write and to read back
                    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
                        writer.write_batch(batch)
                    del batch
                    release_memory()  # the read runs ahead of scoring: its buffers go back at once
                    self._q.put(path)
            finally:
                chunks.close()
                if isinstance(stream, Generator):
                    stream.close()  # ends the warehouse read (DuckDB: closes its connection)
        except BaseException as exc:  # handed to the consumer, raised there
            self._q.put(exc)
            return
        self._q.put(_DONE)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        if not self._overlap:
            self._thread.join()  # the read hands over errors through the queue too
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, pa.RecordBatch):
                yield item
                continue
            # plain reads, not a memory map: mapped pages would count towards this process's RSS
            with pa.OSFile(str(item)) as source:
                batch = pa.ipc.open_file(source).get_batch(0)
            item.unlink()
            yield batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Stager:
    """Write batches to a local file from a background thread. Rows with a NULL ``keys`` value are
    refused (they would never match in the MERGE).

    DuckDB (an adapter with sessions): a Parquet file, one row group per batch, that the MERGE reads
    as its staging source (:attr:`parquet`). Elsewhere (BigQuery: every load is a job, 1,500 per table
    and day): an Arrow file loaded into ``ref`` (replaced) by one load job at the end."""

    def __init__(
        self,
        wh: Warehouse,
        ref: TableRef,
        schema: pa.Schema,
        keys: tuple[str, ...],
        target: TableRef,
        job_key: str,
        tmp: Path,
    ) -> None:
        self.wh, self.ref, self.schema, self.job_key = wh, ref, schema, job_key
        self.local = isinstance(wh, TransactionalWarehouse)
        self._spill = tmp / f"{ref.table}.arrow"
        self.parquet: Path | None = tmp / f"{ref.table}.parquet" if self.local else None
        self.rows = 0
        self.error: BaseException | None = None
        self._q: queue.Queue[Any] = queue.Queue(maxsize=2)  # bounded: memory stays bounded by a few chunks
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(keys, target), name="opsloop-score-stage", daemon=True)
        self._thread.start()

    def put(self, batch: pa.RecordBatch | Callable[[], pa.RecordBatch]) -> None:
        """Queue a batch, or the function that builds it (called in the staging thread)."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._q.put(batch, timeout=0.2)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise self.error or RuntimeError("staging thread ended unexpectedly") from None

    def finish(self) -> int:
        """Stage what is left, wait for the thread; the number of rows staged."""
        while self._thread.is_alive():
            try:
                self._q.put(_DONE, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.rows

    def abort(self) -> None:
        """Stop without staging what is pending (the caller failed)."""
        self._abort.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(_DONE)
        self._thread.join()

    def _items(self) -> Iterator[pa.RecordBatch]:
        while (item := self._q.get()) is not _DONE and not self._abort.is_set():
            yield item() if callable(item) else item

    def _run(self, keys: tuple[str, ...], target: TableRef) -> None:
        try:
            batches = _checked(self._items(), keys, target)
            if self.parquet is not None:
                self._stage_to_parquet(batches, self.parquet)
            else:
                self._stage_at_the_end(batches)
        except BaseException as exc:  # raised in the caller at its next put() / finish()
            self.error = exc
            with contextlib.suppress(queue.Empty):  # unblock a caller waiting on a full queue
                while True:
                    self._q.get_nowait()

    def _stage_to_parquet(self, batches: Iterator[pa.RecordBatch], path: Path) -> None:
        import pyarrow.parquet as pq  # only scoring on DuckDB needs it

        # uncompressed, no statistics: written once, read once by the MERGE
        with pq.ParquetWriter(str(path), self.schema, compression="none", write_statistics=False) as writer:
            for batch in batches:
                writer.write_batch(batch)
                self.rows += batch.num_rows

    def _stage_at_the_end(self, batches: Iterator[pa.RecordBatch]) -> None:
        with pa.OSFile(str(self._spill), "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        if self._abort.is_set():
            return
        job = self.wh.load_staging(self.ref, _read_file(self._spill), self.schema, job_key=f"{self.job_key}_load")
        self.rows = job.rows


def prefetched(items: Iterable[T], fn: Callable[[T], U]) -> Generator[U, None, None]:
    """``fn`` of each item, computed for the next item in a worker thread while the caller works on the
    current one (one item ahead: memory stays bounded). The worker also takes the items from
    ``items``, so the caller never waits for the next item before it gets the current one."""
    it = iter(items)

    def take() -> tuple[bool, U | None]:
        for item in it:
            return True, fn(item)
        return False, None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opsloop-score-prep") as pool:
        ahead = pool.submit(take)
        while True:
            more, current = ahead.result()
            if not more:
                return
            ahead = pool.submit(take)
            yield current  # type: ignore[misc]


def _read_file(path: Path) -> Iterator[pa.RecordBatch]:
    # plain reads, not a memory map: mapped pages would count towards this process's RSS
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
