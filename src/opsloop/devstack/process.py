"""Background services with a pid file, a log file and a health URL; start and stop are idempotent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from opsloop.errors import ConfigError


def url_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback health URL)
            return bool(200 <= resp.status < 500)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _child_setup() -> None:
    # own session (so stop() can kill the whole group) and default signal handling, even when
    # the parent was started with SIGINT ignored (the classic `cmd &` worker-shutdown gotcha)
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class Service:
    name: str
    cmd: list[str]
    run_dir: Path
    health_url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    start_timeout: float = 90.0

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def healthy(self) -> bool:
        if self.pid() is None:
            return False
        return url_ok(self.health_url) if self.health_url else True

    def start(self) -> bool:
        """Start unless already running and healthy. Returns True when it started a new process."""
        if self.healthy():
            return False
        self.stop()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.logfile, "ab") as log:
            proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                preexec_fn=_child_setup,
            )
        self.pidfile.write_text(str(proc.pid))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace")[-3000:]
                raise ConfigError(f"{self.name} exited with {proc.returncode} during start:\n{tail}")
            if self.health_url is None or url_ok(self.health_url):
                return True
            time.sleep(0.25)
        tail = self.logfile.read_text(errors="replace")[-3000:]
        self.stop()
        raise ConfigError(f"{self.name} not healthy at {self.health_url} after {self.start_timeout:.0f}s:\n{tail}")

    def stop(self, timeout: float = 20.0) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.pid() is not None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.1)
            if self.pid() is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
