"""The local Postgres refuses a checkout that its ``postgres`` user cannot reach, naming the directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from opsloop.devstack.postgres import PgCluster, _blocking_ancestor
from opsloop.errors import ConfigError


@pytest.fixture
def closed() -> Iterator[Path]:
    """A directory only its owner may enter, directly under the world-traversable temp dir."""
    d = Path(tempfile.mkdtemp(prefix="opsloop-closed-"))  # mode 700
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unreachable_parent_is_named_before_initdb(closed: Path) -> None:
    base = closed / "checkout" / ".opsloop" / "pg"
    assert closed.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:  # Postgres is started as user postgres: it cannot enter `closed`
        assert _blocking_ancestor(base) == closed
        with pytest.raises(ConfigError, match=rf"cannot enter {closed} \(mode 700\).*chmod o\+x {closed}"):
            PgCluster(base).init()
        assert not (base / "data").exists()  # initdb never ran
        os.chmod(closed, 0o711)
        assert _blocking_ancestor(base) is None
    else:  # Postgres runs as the caller, who may enter its own directories
        assert _blocking_ancestor(base) is None
