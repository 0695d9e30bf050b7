"""The warehouse's disk is full or read-only: the real ingest into a DuckDB file on a tiny tmpfs (or,
where nothing can be mounted, under RLIMIT_FSIZE / without write permission). The load fails with a
TerminalError naming the file (never retried as a 'transaction conflict'), the committed rows and
position stay as they were, and once space / write access is back the rerun converges."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsloop.errors import TerminalError, TransientError
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.bad_inputs.conftest import count, file_spec, ingest_files

REPO = Path(__file__).resolve().parents[2]
EVENTS = "raw_files.events"


def _csv(d: Path, name: str, start: int, n: int, width: int, day: int) -> None:
    rows = "".join(f"{i},{'x' * width},2026-11-{day:02d}T00:00:00Z\n" for i in range(start, start + n))
    (d / name).write_text("id,name,updated_at\n" + rows)


@contextlib.contextmanager
def _storage(size: str) -> Iterator[tuple[Path, bool]]:
    """A directory for the warehouse: a tmpfs of ``size`` when this process may mount one (root with
    CAP_SYS_ADMIN), else a plain world-traversable temp dir. Yields (dir, mounted)."""
    base = Path(tempfile.mkdtemp(prefix="opsloop-bi-wh-", dir="/tmp"))
    base.chmod(0o755)
    mnt = base / "wh"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    mounted = res.returncode == 0
    try:
        yield mnt, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def _child(wh_path: Path, pattern: Path, run_id: str, *user: str, **popen: Any) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "tests.bad_inputs.wh_child", str(wh_path), str(pattern), run_id, *user],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **popen,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def _inputs(mnt: Path) -> Path:
    d = mnt.parent / "in"
    d.mkdir()
    d.chmod(0o755)
    return d


def test_warehouse_disk_full_fails_naming_the_file_and_the_rerun_converges() -> None:
    """BI-30: the second load needs ~6 MB on a 3 MB disk → TerminalError 'DuckDB <file>: disk full —
    free space and rerun' (the failed commit used to be reported as a transient 'transaction
    conflict' when the write failed with EFBIG); 100 rows and the watermark stay; after the disk
    grows the rerun loads all 20,000 new rows once."""
    with _storage("3m") as (mnt, mounted):
        wh_path = mnt / "wh.duckdb"
        inputs = _inputs(mnt)
        _csv(inputs, "p1.csv", 0, 100, 5, 1)
        wh = DuckDBAdapter(wh_path)
        spec = file_spec(inputs / "*.csv", dedup=False)
        assert ingest_files(wh, spec, "r1")["inserted"] == 100
        state = wh.get_state("bi_files", "files.events")
        _csv(inputs, "p2.csv", 100, 20_000, 300, 2)
        if mounted:
            with pytest.raises(TerminalError) as err:
                ingest_files(wh, spec, "r2")
            assert not isinstance(err.value, TransientError)
            message, errno_text = str(err.value), "No space left on device"
        else:  # no tmpfs: the same write failure from a file-size limit (EFBIG)
            limit = os.path.getsize(wh_path) + (1 << 20)
            got = _child(
                wh_path,
                inputs / "*.csv",
                "r2",
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
            )
            assert (got["ok"], got["type"], got["transient"]) == (False, "TerminalError", False), got
            message, errno_text = got["message"], "File too large"
        assert message.startswith(f"DuckDB {wh_path}: disk full — free space and rerun: ") and errno_text in message
        assert count(wh, EVENTS) == 100 and wh.get_state("bi_files", "files.events")["watermark"] == state["watermark"]
        if mounted:
            _remount(mnt, "size=64m")
        out = ingest_files(wh, spec, "r3")
        assert (out["inserted"], count(wh, EVENTS)) == (20_000, 20_100)


def test_warehouse_read_only_fails_naming_the_file_and_the_rerun_converges() -> None:
    """BI-31: the warehouse's file system turns read-only (or the file loses write permission) →
    TerminalError 'DuckDB <file>: cannot write (read-only or permission denied)' before anything is
    read; once writable again the rerun loads exactly the new row."""
    with _storage("16m") as (mnt, mounted):
        wh_path = mnt / "wh.duckdb"
        inputs = _inputs(mnt)
        _csv(inputs, "p1.csv", 0, 10, 5, 1)
        wh = DuckDBAdapter(wh_path, lock_timeout=5)
        spec = file_spec(inputs / "*.csv", dedup=False)
        ingest_files(wh, spec, "r1")
        _csv(inputs, "p2.csv", 10, 1, 5, 2)
        expected = f"DuckDB {wh_path}: cannot write (read-only or permission denied): IO Error: Cannot open file "
        if mounted:
            _remount(mnt, "ro")
            with pytest.raises(TerminalError) as err:
                ingest_files(wh, spec, "r2")
            assert str(err.value) == expected + f'"{wh_path}": Read-only file system'
            _remount(mnt, "rw")
        else:
            mnt.chmod(0o555)
            wh_path.chmod(0o444)
            if os.geteuid() == 0:  # root ignores permissions: try as an unprivileged user
                got = _child(wh_path, inputs / "*.csv", "r2", "65534")
                assert (got["ok"], got["type"], got["transient"]) == (False, "TerminalError", False), got
                message = got["message"]
            else:
                with pytest.raises(TerminalError) as err:
                    ingest_files(wh, spec, "r2")
                message = str(err.value)
            assert message.startswith(expected) and "Permission denied" in message
            mnt.chmod(0o755)
            wh_path.chmod(0o644)
        assert count(wh, EVENTS) == 10
        out = ingest_files(wh, spec, "r3")
        assert (out["inserted"], count(wh, EVENTS)) == (1, 11)
