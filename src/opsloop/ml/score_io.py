"""The two background threads of batch scoring, so predict_proba (which releases the GIL) is never
waiting for the warehouse:

* :class:`PopulationReader` streams the population from the warehouse into local Arrow files of
  ``rows`` rows, one per chunk, and hands each file over as soon as it is written: scoring starts on
  the first chunk while the read goes on, the warehouse connection is held only as long as the read
  itself, and memory stays bounded by a chunk however large the population.
* :class:`Stager` loads the scored chunks into the partition's staging table, ``flush_rows`` at a
  time, while the next chunks are being scored (DuckDB). Each flush is one short warehouse operation
  (K partition processes sharing a DuckDB file take turns on its lock); the first flush replaces what
  a crashed run left behind. On BigQuery the rows are spilled locally and staged by one load job.
  The target table is not touched: the MERGE runs once scoring is complete.

An error in a thread surfaces in the caller at its next call; :meth:`close` / :meth:`abort` stop a
thread and wait for it, so nothing outlives the temporary directory.
"""

from __future__ import annotations

import contextlib
import itertools
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
T = TypeVar("T")
U = TypeVar("U")


def rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Generator[pa.RecordBatch, None, None]:
    """Regroup a stream into batches of exactly ``rows`` rows (the last one shorter): the warehouse
    reader yields smaller ones, and fewer, larger predict_proba calls cost less per row."""
    buf: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        if b.num_rows == 0:
            continue
        buf.append(b)
        have += b.num_rows
        while have >= rows:
            table = pa.Table.from_batches(buf)
            yield table.slice(0, rows).combine_chunks().to_batches()[0]
            rest = table.slice(rows)
            buf, have = rest.combine_chunks().to_batches() if rest.num_rows else [], rest.num_rows
    if have:
        yield pa.Table.from_batches(buf).combine_chunks().to_batches()[0]


class PopulationReader:
    """Read ``source()`` in a background thread into one local Arrow IPC file per chunk of ``rows``;
    iterate to get the chunks in order as they land (each file is deleted once handed over)."""

    def __init__(self, source: Callable[[], Iterable[pa.RecordBatch]], rows: int, tmp: Path) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(source, rows, tmp), name="opsloop-score-read", daemon=True
        )
        self._thread.start()

    def _run(self, source: Callable[[], Iterable[pa.RecordBatch]], rows: int, tmp: Path) -> None:
        try:
            stream = iter(source())
            chunks = rebatch(stream, rows)
            try:
                for i, batch in enumerate(chunks):
                    if self._stop.is_set():
                        break
                    path = tmp / f"population_{i:06d}.arrow"
                    # uncompressed IPC: cheap to write and to read back
                    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
                        writer.write_batch(batch)
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
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            # plain reads, not a memory map: mapped pages would count towards this process's RSS
            with pa.OSFile(str(item)) as source:
                batch = pa.ipc.open_file(source).get_batch(0)
            item.unlink()
            yield batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Stager:
    """Stage batches into ``ref`` (replaced) from a background thread. Rows with a NULL ``keys`` value
    are refused (they would never match in the MERGE).

    On an adapter with sessions and streamed inserts (DuckDB) the rows go in while scoring goes on,
    ``flush_rows`` per flush, each flush one short operation. Elsewhere (BigQuery: every load is a job,
    1,500 per table and day) they are spilled to a local Arrow file and staged by one load at the end,
    as one ``load_staging`` call always did."""

    def __init__(
        self,
        wh: Warehouse,
        ref: TableRef,
        schema: pa.Schema,
        keys: tuple[str, ...],
        target: TableRef,
        flush_rows: int,
        job_key: str,
        tmp: Path,
    ) -> None:
        self.wh, self.ref, self.schema, self.flush_rows, self.job_key = wh, ref, schema, flush_rows, job_key
        self.incremental = isinstance(wh, TransactionalWarehouse)
        self._spill = tmp / f"{ref.table}.arrow"
        self.rows = 0
        self.flushes = 0
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
        """Stop without staging what is pending (the caller failed; a staging table is left over and
        replaced by the next run)."""
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
            if self.incremental:
                self._stage_incrementally(batches)
            else:
                self._stage_at_the_end(batches)
        except BaseException as exc:  # raised in the caller at its next put() / finish()
            self.error = exc
            with contextlib.suppress(queue.Empty):  # unblock a caller waiting on a full queue
                while True:
                    self._q.get_nowait()

    def _stage_incrementally(self, batches: Iterator[pa.RecordBatch]) -> None:
        pending: list[pa.RecordBatch] = []
        have = 0
        for batch in batches:
            pending.append(batch)
            have += batch.num_rows
            while have >= self.flush_rows:  # exactly flush_rows per flush (see STAGE_FLUSH_ROWS)
                cut = self.flush_rows - (have - pending[-1].num_rows)
                last = pending.pop()
                self._flush([*pending, last.slice(0, cut)])
                rest = last.slice(cut)
                pending, have = ([rest] if rest.num_rows else []), rest.num_rows
        if pending and not self._abort.is_set():
            self._flush(pending)

    def _flush(self, batches: list[pa.RecordBatch]) -> None:
        wh = self.wh
        assert isinstance(wh, TransactionalWarehouse)
        with wh.session():  # one connection (one open, one checkpoint) per flush
            if self.flushes == 0:
                job = wh.load_staging(self.ref, iter(batches), self.schema, job_key=f"{self.job_key}_load")
            else:
                job = wh.insert_batches(self.ref, iter(batches), self.schema)
        self.flushes += 1
        self.rows += job.rows

    def _stage_at_the_end(self, batches: Iterator[pa.RecordBatch]) -> None:
        with pa.OSFile(str(self._spill), "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        if self._abort.is_set():
            return
        job = self.wh.load_staging(self.ref, _read_file(self._spill), self.schema, job_key=f"{self.job_key}_load")
        self.flushes, self.rows = 1, job.rows


def prefetched(items: Iterable[T], fn: Callable[[T], U]) -> Generator[U, None, None]:
    """``fn`` of each item, computed for the next item in a worker thread while the caller works on the
    current one (one item ahead: memory stays bounded)."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opsloop-score-prep") as pool:
        ahead = [pool.submit(fn, item) for item in itertools.islice(it, 1)]
        while ahead:
            current = ahead[0].result()
            ahead = [pool.submit(fn, item) for item in itertools.islice(it, 1)]
            yield current


def _read_file(path: Path) -> Iterator[pa.RecordBatch]:
    # plain reads, not a memory map: mapped pages would count towards this process's RSS
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
