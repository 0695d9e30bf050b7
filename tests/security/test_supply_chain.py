"""Dependencies are pinned: every package in uv.lock has an exact version and (from the registry) a
hash, every declared dependency (main, extras, dev group) is in the lock, and the lock matches
pyproject.toml (``uv lock --check``, offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

from tests.support.fixtures.core import REPO


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_uv_lock_pins_every_dependency_with_a_hash() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    assert len(packages) > 50
    unpinned = [n for n, p in packages.items() if not re.fullmatch(r"\d+(\.\w+)*", str(p.get("version", "")))]
    assert not unpinned, unpinned
    registry = {n: p for n, p in packages.items() if "registry" in p.get("source", {})}
    assert set(packages) - set(registry) == {"opsloop"}, "only the project itself may come from outside the registry"
    hashes = {
        n: [p.get("sdist", {}).get("hash"), *(w.get("hash") for w in p.get("wheels", []))] for n, p in registry.items()
    }
    no_hash = [n for n, hs in hashes.items() if not any(str(h or "").startswith("sha256:") for h in hs)]
    assert not no_hash, no_hash
    declared = list(project["project"]["dependencies"])
    declared += [d for extra in project["project"].get("optional-dependencies", {}).values() for d in extra]
    declared += [d for group in project.get("dependency-groups", {}).values() for d in group if isinstance(d, str)]
    missing = sorted({_name(d) for d in declared} - set(packages))
    assert not missing, f"declared but not locked: {missing}"
    uv = shutil.which("uv")
    if uv is not None:  # the lock is what pyproject.toml resolves to
        res = subprocess.run([uv, "lock", "--check", "--offline"], cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
