"""Child process for the warehouse-storage cases when no tmpfs can be mounted: runs one file-source
ingest into a DuckDB file (under an RLIMIT_FSIZE or as an unprivileged user, set by the parent) and
prints the outcome as one JSON line.

    python -m tests.bad_inputs.wh_child <warehouse.duckdb> <csv glob> <run_id> [<uid to switch to>]

Switching users happens after the imports (as root, the interpreter itself may live where an
unprivileged user cannot read).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from opsloop.errors import TransientError
from opsloop.warehouse.duckdb import DuckDBAdapter
from tests.bad_inputs.conftest import file_spec, ingest_files


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead
    path, pattern, run_id, *user = argv
    if user:
        os.setgroups([])
        os.setgid(int(user[0]))
        os.setuid(int(user[0]))
    try:
        out = ingest_files(DuckDBAdapter(path, lock_timeout=5), file_spec(pattern), run_id)
        print(json.dumps({"ok": True, "inserted": out["inserted"]}))
    except Exception as exc:
        kind = {"type": type(exc).__name__, "transient": isinstance(exc, TransientError), "message": str(exc)}
        print(json.dumps({"ok": False, **kind}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
