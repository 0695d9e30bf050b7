"""Test session setup. Environment first (before anything imports Prefect), then fixture plugins:
every module in tests/support/fixtures/ is loaded, so each area adds its fixtures in its own file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from opsloop.devstack.postgres import free_port

_HOME = Path(tempfile.mkdtemp(prefix="opsloop-test-"))
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(_HOME / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "OPSLOOP_TEST_HOME": str(_HOME),
        "NO_GCE_CHECK": "true",
    }
)
os.environ.pop("OPSLOOP_FAULT", None)

pytest_plugins = sorted(
    f"tests.support.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "support" / "fixtures").glob("*.py")
    if p.stem != "__init__"
)
