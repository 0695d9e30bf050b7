"""`opsloop stack up|status|down` on a throw-away data dir and free ports: idempotent both ways,
and `up` says where everything lives."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from opsloop.cli import main
from opsloop.devstack.postgres import free_port
from opsloop.devstack.process import url_ok
from opsloop.devstack.stack import LocalStack

pytestmark = [pytest.mark.slow]


def test_stack_up_down_idempotent(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    home = Path(tempfile.mkdtemp(prefix="opsloop-stack-", dir="/tmp"))
    home.chmod(0o755)
    ports = {k: str(free_port()) for k in ("PG", "PREFECT", "MLFLOW", "SANDBOX")}
    monkeypatch.setenv("OPSLOOP_HOME", str(home))
    for k, v in ports.items():
        monkeypatch.setenv(f"OPSLOOP_{k}_PORT", v)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    stack = LocalStack.from_env()
    try:
        assert main(["stack", "up", "--services", "sandbox"]) == 0
        out = capsys.readouterr().out
        assert "started: postgres, sandbox" in out
        assert f"Prefect UI         http://127.0.0.1:{ports['PREFECT']}" in out
        assert f"CRM sandbox        http://127.0.0.1:{ports['SANDBOX']}" in out
        assert f"source {home / 'env'}" in out
        assert url_ok(f"{stack.sandbox_url}/__control/health")
        env = (home / "env").read_text()
        assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['PREFECT']}/api" in env
        assert "export OPSLOOP_REPO=" in env

        assert main(["stack", "up", "--services", "sandbox"]) == 0  # again: nothing new
        assert "started: nothing (already running)" in capsys.readouterr().out

        assert main(["stack", "status"]) == 0
        status = capsys.readouterr().out
        assert "postgres   up" in status and "sandbox    up" in status and "prefect    down" in status

        assert main(["stack", "down"]) == 0
        assert "local stack stopped (sandbox, postgres)" in capsys.readouterr().out
        assert not url_ok(f"{stack.sandbox_url}/__control/health") and not stack.pg.running()
        assert main(["stack", "down"]) == 0  # again: nothing to stop, no error
        assert "nothing was running" in capsys.readouterr().out
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
