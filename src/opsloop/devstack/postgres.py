"""A throwaway or long-lived PostgreSQL cluster from ``initdb``/``pg_ctl`` on PATH.

PostgreSQL refuses to run as root; as root we run the binaries as the ``postgres`` user and make
the cluster directory theirs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from opsloop.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _chown_to_pg(path: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam("postgres")
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _blocking_ancestor(path: Path) -> Path | None:
    """As root, Postgres runs as ``postgres``: the first directory above ``path`` it cannot enter."""
    if os.geteuid() != 0:
        return None
    uid = pwd.getpwnam("postgres").pw_uid
    for d in reversed(path.resolve().parents):
        st = d.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return d
    return None


@dataclass
class PgCluster:
    """``base`` holds ``data/`` and ``postgres.log``; both owned by the user running postgres."""

    base: Path
    port: int = 55432
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _check_binaries(self) -> None:
        missing = [b for b in ("initdb", "pg_ctl", "postgres") if shutil.which(b) is None]
        if missing:
            raise ConfigError(f"PostgreSQL binaries not on PATH: {missing} (install PostgreSQL ≥ 14)")

    def init(self) -> None:
        """initdb once (idempotent)."""
        self._check_binaries()
        if (self.data / "PG_VERSION").exists():
            return
        self.base.mkdir(parents=True, exist_ok=True)
        blocked = _blocking_ancestor(self.base)
        if blocked is not None:
            raise ConfigError(
                f"PostgreSQL runs as user 'postgres' (opsloop was started as root), which cannot enter {blocked} "
                f"(mode {blocked.stat().st_mode & 0o777:o}) on the way to {self.base}: run `chmod o+x {blocked}` "
                "or put the checkout in a directory other users can enter"
            )
        os.chmod(self.base, 0o755)  # noqa: S103 (postgres must traverse it)
        _chown_to_pg(self.base)
        res = subprocess.run(
            _as_pg_user(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]),
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise ConfigError(f"initdb -D {self.data} failed (exit {res.returncode}): {res.stderr.strip()[-800:]}")

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        res = subprocess.run(_as_pg_user(["pg_ctl", "-D", str(self.data), "status"]), capture_output=True)
        return res.returncode == 0

    def start(self) -> None:
        """Start (idempotent); ``wal_level=logical`` so CDC slots work."""
        self.init()
        if self.running():
            return
        opts = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.data),
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "max_connections": "200",
            **self.settings,
        }
        o = " ".join(f"-c {k}={v}" for k, v in opts.items())
        res = subprocess.run(
            _as_pg_user(["pg_ctl", "-D", str(self.data), "-o", o, "-l", str(self.log), "-w", "-t", "60", "start"]),
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise ConfigError(f"PostgreSQL did not start on port {self.port}: {res.stderr.strip()}\n{tail}")

    def stop(self) -> None:
        if self.running():
            subprocess.run(
                _as_pg_user(["pg_ctl", "-D", str(self.data), "stop", "-m", "fast", "-w"]), capture_output=True
            )

    def create_database(self, name: str) -> str:
        """CREATE DATABASE if missing; returns its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as con:
            exists = con.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                con.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)
