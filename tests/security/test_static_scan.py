"""Static security scan (issue 9, part 6): bandit, offline, over the shipped code (what ``make security``
runs), reports no high-severity finding — and does report one in a file that has one, so a scan that
silently checks nothing cannot pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.fixtures.core import REPO

SHIPPED = ("src/opsloop", "flows", "tasks", "blocks")


def bandit(*targets: str | Path) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "bandit", "-q", "-r", "-lll", "-f", "json", *map(str, targets)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode in (0, 1), res.stderr[-2000:]  # 1 = findings
    report: dict[str, Any] = json.loads(res.stdout)
    assert not report["errors"], report["errors"]  # a file bandit could not parse is not "clean"
    return report


def test_bandit_finds_no_high_severity_issue_in_shipped_code(tmp_path: Path) -> None:
    bad = tmp_path / "planted.py"
    bad.write_text("import subprocess\n\n\ndef run(cmd: str) -> None:\n    subprocess.call(cmd, shell=True)\n")
    planted = bandit(bad)
    assert [r["test_id"] for r in planted["results"]] == ["B602"], planted["results"]

    report = bandit(*SHIPPED)
    scanned = [f for f in report["metrics"] if f != "_totals"]
    for top in SHIPPED:  # every shipped tree was really scanned
        assert any(f.startswith(top) for f in scanned), (top, scanned[:5])
    assert len(scanned) > 50
    assert report["results"] == [], [(r["filename"], r["line_number"], r["test_id"]) for r in report["results"]]
