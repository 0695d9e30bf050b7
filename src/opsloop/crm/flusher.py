"""Record a push's results on a background thread while the push goes on.

One flush at a time, in the order handed over: :meth:`BackgroundFlusher.submit` waits for the
previous flush (and raises its error — a failed flush stops the push at the next hand-off), then
hands the next one over. On DuckDB the thread keeps one connection over back-to-back flushes:
opening and closing the file for each (a checkpoint each time) cost about a tenth of a 100k-record
push. It closes it when no flush came for ``idle_seconds``, when it has been open ``hold_seconds``,
and at the end — so another process waiting for the file gets its turn, and none waits for it while
the push waits on the CRM. On that connection DuckDB runs on one thread: the HTTP threads and the CRM
need the cores more than a sync-log write needs a second thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from opsloop.crm.synclog import SyncTables, held_open

Job = tuple[Callable[..., None], tuple[Any, ...]]


class BackgroundFlusher:
    def __init__(self, tables: SyncTables, idle_seconds: float = 1.0, hold_seconds: float = 10.0) -> None:
        self.tables = tables
        self.idle_seconds = idle_seconds
        self.hold_seconds = hold_seconds
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="sync-flush", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Wait for the flush in progress (raising its error), then hand ``fn(*args)`` over."""
        self._idle.wait()
        self._raise()
        self._idle.clear()
        self._jobs.put((fn, args))

    def finish(self) -> BaseException | None:
        """Wait for the flush in progress, close the connection and stop the thread; returns the
        first error a flush or the closing raised (None if none)."""
        self._jobs.put(None)
        self._thread.join()
        return self._error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        held: contextlib.ExitStack | None = None
        opened = 0.0

        def close() -> None:
            nonlocal held
            stack, held = held, None
            if stack is not None:
                try:
                    stack.close()
                except BaseException as exc:  # the closing checkpoint failed (disk full …)
                    self._error = self._error or exc

        try:
            while True:
                try:
                    job = self._jobs.get(timeout=self.idle_seconds) if held is not None else self._jobs.get()
                except queue.Empty:
                    close()  # nothing came: let other processes have the file
                    continue
                if job is None:
                    return
                fn, args = job
                wh = self.tables.wh
                try:
                    if held is None:
                        held = contextlib.ExitStack()
                        held.enter_context(held_open(wh))
                        single = getattr(wh, "single_threaded", None)
                        if single is not None:
                            held.enter_context(single())
                        opened = time.monotonic()
                    if self._error is None:
                        fn(*args)
                except BaseException as exc:
                    self._error = self._error or exc
                finally:
                    if time.monotonic() - opened >= self.hold_seconds:
                        close()
                    self._idle.set()
        finally:
            close()
            self._idle.set()
