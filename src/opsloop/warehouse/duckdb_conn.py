"""The DuckDB file under an adapter: connections (one per operation, or one per session), the
transaction around a session's operations, and the buffer pool's cache — the plumbing that
:class:`opsloop.warehouse.duckdb.DuckDBAdapter` builds the warehouse operations on."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import duckdb

from opsloop.errors import TransientError
from opsloop.heap import duckdb_release_unused
from opsloop.warehouse.duckdb_support import Session, translate

# duckdb.connect() from two threads of one process at the same moment, when neither finds the file's
# database instance open yet, can hand one of them an instance whose Python table functions are not
# registered: its next register() + query fails with "Table Function with name python_arrow_scan does
# not exist" (DuckDB 2.0.1; the pipeline lease's heartbeat thread opens the file beside the flow's own
# operations). Opening one at a time per process avoids it; the retries below wait outside the lock.
_CONNECT_LOCK = threading.Lock()


class DuckDBFile:
    """One DuckDB file: where it is, how to open it (threads, ``memory_limit``, how long to wait for
    another process's lock) and the session connection, if one is open."""

    def __init__(
        self, path: str | Path, lock_timeout: float = 120.0, threads: int | None = None, memory_limit: str | None = None
    ) -> None:
        self.path = str(path)
        self.lock_timeout = lock_timeout
        self.threads = threads
        self.memory_limit = memory_limit
        self._session = Session()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one operation (the session's, inside :meth:`session`); errors translated."""
        con = self._session.con
        try:
            if con is not None:
                yield con
                return
            con = self._open()
            try:
                yield con
            finally:
                con.close()
        except duckdb.Error as exc:
            raise translate(exc, self.path) from exc

    @contextlib.contextmanager
    def session(self) -> Iterator[Self]:
        """Run every operation inside the block on one connection (nested sessions join the outer one).
        The file stays locked by this process until the block ends."""
        s = self._session
        if s.con is not None:
            yield self
            return
        s.con = self._open()
        try:
            yield self
        finally:
            con, s.con, s.in_tx = s.con, None, False
            try:
                con.close()
            except duckdb.Error as exc:  # the closing checkpoint failed (disk full …)
                raise translate(exc, self.path) from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One DuckDB transaction around the block (inside a session; a nested block joins it): commits
        when the block ends, rolls back when it raises."""
        with self.session():
            s = self._session
            assert s.con is not None
            if s.in_tx:
                yield
                return
            s.con.execute("BEGIN TRANSACTION")
            s.in_tx = True
            try:
                yield
            except BaseException:
                s.in_tx = False
                with contextlib.suppress(duckdb.Error):
                    s.con.execute("ROLLBACK")
                raise
            s.in_tx = False
            try:
                s.con.execute("COMMIT")
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):
                    s.con.execute("ROLLBACK")
                raise translate(exc, self.path) from exc

    def _open(self) -> duckdb.DuckDBPyConnection:
        """Open the file; retries while another process holds the file lock."""
        deadline = time.monotonic() + self.lock_timeout
        config: dict[str, Any] = {}
        if self.threads:
            config["threads"] = self.threads
        if self.memory_limit:
            config["memory_limit"] = self.memory_limit
        delay = 0.05
        while True:
            try:
                with _CONNECT_LOCK:
                    con = duckdb.connect(self.path, config=config)
                break
            except duckdb.Error as exc:
                err = translate(exc, self.path)
                if isinstance(err, TransientError) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise err from exc
        con.execute("SET enable_progress_bar = false")  # no bar on a worker's stderr
        return con

    def checkpoint(self, release: bool = True) -> None:
        """Inside a session, between transactions: write what is committed into the file now (DuckDB
        does it when the WAL passes ``checkpoint_threshold``, or when the connection closes). A
        source calls it while it waits on its own server (:meth:`StreamLoader.settle`), so the
        checkpoint overlaps that wait instead of coming after it; so does a CRM push's background
        flush near its end. ``release``: hand DuckDB's free memory back to the system first. Elsewhere:
        nothing."""
        s = self._session
        if s.con is None or s.in_tx:
            return
        try:
            if release:
                duckdb_release_unused()
            with contextlib.suppress(duckdb.TransactionException):  # another transaction in the way: a later
                s.con.execute("CHECKPOINT")  # checkpoint (at the latest when the session closes) writes it
        except duckdb.Error as exc:
            raise translate(exc, self.path) from exc

    def release_cache(self) -> None:
        """Drop the table blocks DuckDB's buffer pool keeps after the statements that read or wrote
        them (it frees them only at ``memory_limit``, or when the file's last connection closes): a
        session's connection is closed and opened again. Between the committed pieces of a long load
        this keeps memory at a piece's, not the table's (5M-row initial load: 321 → 253–257 MB). Outside a
        session each operation's connection has closed already; inside a transaction it waits."""
        s = self._session
        if s.con is None or s.in_tx:
            return
        con, s.con = s.con, None
        try:
            con.close()
        except duckdb.Error as exc:  # the closing checkpoint failed (disk full …)
            raise translate(exc, self.path) from exc
        s.con = self._open()

    @contextlib.contextmanager
    def single_threaded(self) -> Iterator[None]:
        """Inside a session: its statements run on one DuckDB thread until the block ends (elsewhere:
        nothing changes). For small writes made while other work keeps the cores busy — a CRM push's
        sync-log flushes run beside the HTTP threads and the CRM itself: a second DuckDB thread
        shortens them little and takes CPU the push needs (100k-record push: 0.1 s less CPU)."""
        con = self._session.con
        if con is None:
            yield
            return
        with self._threads(con, "SET threads = 1", ""):
            yield

    def _one_thread(self, con: duckdb.DuckDBPyConnection) -> contextlib.AbstractContextManager[None]:
        """DuckDB on one thread, flushing each finished row group, for a load from one Arrow stream:
        one thread reads the stream anyway, and each further thread buffers its own row groups (+70 MB
        per 1M rows, at no measured gain in speed; flushing one row group at a time saves 10 more)."""
        return self._threads(
            con, "SET threads = 1; SET write_buffer_row_group_count = 1", "RESET write_buffer_row_group_count"
        )

    @contextlib.contextmanager
    def _threads(self, con: duckdb.DuckDBPyConnection, settings: str, reset: str) -> Iterator[None]:
        """``settings`` for the block; then ``reset`` and the file's own thread count again."""
        con.execute(settings)
        try:
            yield
        finally:
            if reset:
                con.execute(reset)
            con.execute(f"SET threads = {int(self.threads)}" if self.threads else "RESET threads")
