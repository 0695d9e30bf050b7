"""One run of a pipeline at a time: a lease row per pipeline in the warehouse meta dataset.

Deployment concurrency limits only see runs of one deployment; a manual ``ingest`` run and the
ingest *subflow* of the nightly run are runs of different deployments and would otherwise process
the same CDC batch side by side. Every stage flow therefore takes the pipeline's lease first
(``tasks/lease.py``):

* **holder** = the root flow run id, so the subflows of one nightly run (ingest, train, score,
  sync, scoring fan-out children) re-enter the lease their root holds; any other run waits up to
  ``warehouse.leaseWait`` and then fails with a message naming the run that holds it.
* **heartbeat**: the holder renews ``expires_at`` every ``ttl / 4``; a lease that was not renewed
  for ``warehouse.leaseTtl`` is stale and the next run takes it over. A holder on this machine
  whose process is gone (killed, OOM) is stale at once (same host, boot id, PID namespace, and the
  PID missing, a zombie or reused by a younger process).
* **race-free without locks**: taking over = delete the stale row by its token, append our row,
  read back; we hold the lease only if no other live row is there. A taker that sees another live
  row deletes its own and tries again after a random pause (then it finds the winner and waits).
  Of two takers at most one can read back only its own row (the later insert sees the earlier
  one), so two never both win — ordering by a client timestamp could not promise that: a row
  stamped earlier but inserted later would "win" after the other taker had already started. That
  needs nothing beyond DML, so it behaves the same on DuckDB and BigQuery.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

import pyarrow as pa

from opsloop.errors import TerminalError, TransientError
from opsloop.transform import pyvalues
from opsloop.warehouse.base import TableRef, TableSchema, Warehouse

LEASE_TABLE = "_pipeline_lease"
TS = pa.timestamp("us", tz="UTC")
LEASE_ARROW = pa.schema(
    [
        ("pipeline", pa.string()),
        ("holder", pa.string()),  # the root flow run id
        ("holder_flow", pa.string()),
        ("holder_run", pa.string()),  # the flow run that took the lease (root or a stage run on its own)
        ("token", pa.string()),
        ("owner", pa.string()),  # host|boot id|pid namespace|pid|process start (see process_identity)
        ("acquired_at", TS),
        ("heartbeat_at", TS),
        ("expires_at", TS),
    ]
)
RUNBOOK = "docs/reliability.md#overlap"
SETTLE_SECONDS = 5.0  # an unconfirmed row younger than this is a taker in a race, not yet a holder


class PipelineBusyError(TerminalError):
    """Another run holds the pipeline's lease (still alive) after ``warehouse.leaseWait``."""


@dataclass(frozen=True)
class Lease:
    pipeline: str
    holder: str
    holder_flow: str
    holder_run: str
    token: str
    owner: str
    acquired_at: datetime
    heartbeat_at: datetime
    expires_at: datetime

    @property
    def confirmed(self) -> bool:
        """Its taker won and confirmed it (or has renewed it since)."""
        return self.heartbeat_at > self.acquired_at

    def describe(self) -> str:
        what = f"flow run {self.holder}"
        if self.holder_flow or (self.holder_run and self.holder_run != self.holder):
            stage = f", stage run {self.holder_run}" if self.holder_run and self.holder_run != self.holder else ""
            what += f" ({self.holder_flow or 'flow'}{stage})"
        return (
            f"{what} since {_fmt(self.acquired_at)} (last heartbeat {_fmt(self.heartbeat_at)}, "
            f"expires {_fmt(self.expires_at)} unless renewed)"
        )


def _fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- who holds it: a process identity that can be checked on the same machine ---------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, None when it does not exist."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _machine() -> str:
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{ns}"


def process_identity() -> str:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return f"{_machine()}|{pid}|{stat[1] if stat else ''}"


def holder_gone(owner: str) -> bool:
    """True only when ``owner`` is provably dead: it ran on this machine (host, boot id and PID
    namespace match) and its PID no longer exists, is a zombie, or belongs to a newer process."""
    parts = owner.split("|")
    if len(parts) != 5 or not all(parts[:3]) or "|".join(parts[:3]) != _machine():
        return False
    try:
        pid = int(parts[3])
    except ValueError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] in ("Z", "X") or (bool(parts[4]) and stat[1] != parts[4])


# -- the lease -------------------------------------------------------------------------------------
class PipelineLease:
    """Hold ``pipeline``'s lease as ``holder`` (the root flow run id) for a ``with`` block.

    ``acquire`` returns True when this call took the lease (and ``release`` gives it back) or False
    when ``holder`` already held it (a subflow of the holding run: nothing to release)."""

    def __init__(
        self,
        wh: Warehouse,
        pipeline: str,
        holder: str,
        *,
        flow: str = "",
        run_id: str = "",
        ttl: float = 600.0,
        wait: float = 600.0,
        poll: float | None = None,
        log: Callable[[str], None] | None = None,
        link: Callable[[str], str] | None = None,
    ) -> None:
        self.wh = wh
        self.pipeline = pipeline
        self.holder = holder
        self.flow = flow
        self.run_id = run_id or holder
        self.ttl = max(float(ttl), 1.0)
        self.wait = max(float(wait), 0.0)
        self.poll = poll if poll is not None else min(5.0, self.ttl / 4)
        self.log = log or (lambda _msg: None)
        self.link = link  # flow run id → its UI address, for the busy message
        self.ref = TableRef(wh.meta_dataset, LEASE_TABLE)
        self.token: str | None = None  # the row we hold or re-entered
        self.owned = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = False
        self._acquired_at = datetime.now(UTC)

    # -- SQL helpers ---------------------------------------------------------------------------
    def _p(self, name: str) -> str:
        return self.wh.param(name)

    def _ensure(self) -> None:
        if self._ready:
            return
        for attempt in range(5):
            try:
                self.wh.ensure_table(self.ref, TableSchema.from_arrow(LEASE_ARROW))
                break
            except TransientError:  # another run created it at the same moment (a catalog conflict)
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        self._ready = True

    def rows(self) -> list[Lease]:
        """Every lease row of the pipeline (live or stale), the oldest (acquired_at, token) first."""
        self._ensure()
        table = self.wh.query(
            f"SELECT * FROM {self.wh.quote(self.ref)} WHERE pipeline = {self._p('pipeline')}",
            {"pipeline": self.pipeline},
        )
        found = [Lease(**{k: r[k] for k in LEASE_ARROW.names}) for r in pyvalues.rows(table)]
        return sorted(found, key=lambda r: (r.acquired_at, r.token))

    def current(self) -> Lease | None:
        """The live lease (see :meth:`holder_of`), None when the pipeline is free."""
        live = self.live(self.rows(), datetime.now(UTC))
        return self.holder_of(live) if live else None

    @staticmethod
    def holder_of(live: list[Lease]) -> Lease:
        """Of the live rows, the one that holds the lease: a row its taker confirmed after winning
        (the oldest such), else the oldest — other rows are takers that will step back."""
        return next((r for r in live if r.confirmed), live[0])

    def _confirm(self) -> None:
        """Mark our row as the winner (heartbeat after acquisition), so waiters name this run and not
        a competing taker whose row is about to disappear."""
        now = datetime.now(UTC)
        self.wh.execute(
            f"UPDATE {self.wh.quote(self.ref)} SET heartbeat_at = {self._p('now')} "
            f"WHERE pipeline = {self._p('pipeline')} AND token = {self._p('token')}",
            {
                "now": max(now, self._acquired_at + timedelta(microseconds=1)),
                "pipeline": self.pipeline,
                "token": self.token,
            },
            kind="lease",
        )

    def _delete(self, token: str) -> None:
        self.wh.execute(
            f"DELETE FROM {self.wh.quote(self.ref)} "
            f"WHERE pipeline = {self._p('pipeline')} AND token = {self._p('token')}",
            {"pipeline": self.pipeline, "token": token},
            kind="lease",
        )

    def _insert(self, now: datetime) -> str:
        token = uuid.uuid4().hex
        row = {
            "pipeline": self.pipeline,
            "holder": self.holder,
            "holder_flow": self.flow,
            "holder_run": self.run_id,
            "token": token,
            "owner": process_identity(),
            "acquired_at": now,
            "heartbeat_at": now,
            "expires_at": now + timedelta(seconds=self.ttl),
        }
        self.wh.append(self.ref, pa.Table.from_pylist([row], schema=LEASE_ARROW), job_key=None)
        self._acquired_at = now
        return token

    def stale_reason(self, lease: Lease, now: datetime) -> str | None:
        if lease.expires_at < now:
            return f"not renewed since {_fmt(lease.heartbeat_at)} (expired {_fmt(lease.expires_at)})"
        if holder_gone(lease.owner):
            return "its process on this machine is gone"
        return None

    # -- acquire / renew / release -------------------------------------------------------------
    def live(self, rows: list[Lease], now: datetime) -> list[Lease]:
        return [r for r in rows if self.stale_reason(r, now) is None]

    def acquire(self) -> bool:
        started = time.monotonic()
        told = False
        backoff = 0.05
        while True:
            now = datetime.now(UTC)
            rows = self.rows()
            live = self.live(rows, now)
            mine = next((r for r in live if r.holder == self.holder), None)
            if mine is not None:
                self.token, self.owned = mine.token, False  # a subflow of the run that holds it
                self.renew()
                return False
            if not live:
                for r in rows:  # stale: its holder stopped renewing or its process is gone
                    why = self.stale_reason(r, now)
                    self.log(f"pipeline {self.pipeline}: taking over the lease of {r.describe()}: {why}")
                    self._delete(r.token)
                token = self._insert(now)
                after = self.rows()
                others = [r for r in self.live(after, datetime.now(UTC)) if r.token != token]
                if not others and any(r.token == token for r in after):
                    self.token, self.owned = token, True
                    self._confirm()
                    return True
                self._delete(token)  # another taker came at the same moment: step back, look again
                time.sleep(random.uniform(0.0, backoff))  # noqa: S311 - jitter, not a secret
                backoff = min(backoff * 2, max(self.poll, 0.05))
                continue
            win = self.holder_of(live)
            waited = time.monotonic() - started
            settling = not win.confirmed and (now - win.acquired_at).total_seconds() < SETTLE_SECONDS
            if waited >= self.wait and not settling:
                raise PipelineBusyError(self.busy_message(win, waited))
            if settling:  # takers racing right now: wait for the one that wins before naming it
                time.sleep(random.uniform(0.05, 0.2))  # noqa: S311 - jitter, not a secret
                continue
            if not told:
                self.log(
                    f"pipeline {self.pipeline} is being processed by {win.describe()}; "
                    f"waiting up to {self.wait:.0f} s (warehouse.leaseWait)"
                )
                told = True
            time.sleep(min(self.poll, max(self.wait - waited, 0.05)))

    def busy_message(self, win: Lease, waited: float) -> str:
        me = f"this {self.flow} run" if self.flow else "this run"
        url = self.link(win.holder) if self.link else ""
        return (
            f"pipeline {self.pipeline} is being processed by {win.describe()}{f' <{url}>' if url else ''}; "
            f"waited {waited:.0f} s "
            f"(warehouse.leaseWait {self.wait:.0f} s) — {me} changed nothing. Rerun it once that run has "
            f"finished. Runbook: {RUNBOOK}"
        )

    def renew(self) -> bool:
        """Extend our lease by ``ttl``; False (and ``lost``) when it is no longer ours."""
        if self.token is None:
            return False
        now = datetime.now(UTC)
        self.wh.execute(
            f"UPDATE {self.wh.quote(self.ref)} SET heartbeat_at = {self._p('now')}, expires_at = {self._p('exp')} "
            f"WHERE pipeline = {self._p('pipeline')} AND token = {self._p('token')}",
            {"now": now, "exp": now + timedelta(seconds=self.ttl), "pipeline": self.pipeline, "token": self.token},
            kind="lease",
        )
        rows = self.rows()
        ok = any(r.token == self.token for r in rows)
        win = next(iter(self.live(rows, now)), None)
        if not ok and not self.lost:
            self.lost = True
            self.log(
                f"pipeline {self.pipeline}: lease lost (now held by {win.describe() if win else 'nobody'}); "
                f"heartbeats stopped for longer than warehouse.leaseTtl ({self.ttl:.0f} s)?"
            )
        return ok

    def release(self) -> None:
        self._stop_heartbeat()
        if self.owned and self.token is not None:
            self._delete(self.token)
        self.owned = False
        self.token = None

    # -- heartbeat -----------------------------------------------------------------------------
    def _beat(self) -> None:
        interval = max(self.ttl / 4, 0.5)
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a missed beat is not fatal; the next one may succeed
                self.log(f"pipeline {self.pipeline}: lease heartbeat failed: {exc}")

    def start_heartbeat(self) -> None:
        if self._thread is None and self.token is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"lease-{self.pipeline}", daemon=True)
            self._thread.start()

    def _stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> PipelineLease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
