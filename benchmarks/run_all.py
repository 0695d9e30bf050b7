"""`make bench`: run every benchmark module in benchmarks/ that defines main() — except those with
``IN_DEFAULT_SET = False`` (long runs such as ``load``), which run only when named:
``python -m benchmarks.run_all load``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main() -> None:
    only = set(sys.argv[1:])
    for path in sorted(Path(__file__).parent.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name == "run_all" or (only and name not in only):
            continue
        mod = importlib.import_module(f"benchmarks.{name}")
        if not only and not getattr(mod, "IN_DEFAULT_SET", True):
            continue
        if hasattr(mod, "main"):
            print(f"== benchmark {name}", flush=True)
            mod.main()


if __name__ == "__main__":
    main()
