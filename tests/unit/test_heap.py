"""opsloop.heap: the objects a stage starts with are frozen once per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_first_stage_freezes_what_exists_and_later_calls_do_nothing() -> None:
    # a fresh interpreter: the test process may have run a stage already
    code = textwrap.dedent(
        """
        import gc
        from opsloop.heap import freeze_startup_objects
        assert gc.get_freeze_count() == 0
        kept = [{"cycle": None}]
        kept[0]["cycle"] = kept
        assert freeze_startup_objects() is True
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen  # the imported modules' objects
        later = [{}]
        later[0]["self"] = later
        assert freeze_startup_objects() is False
        assert gc.get_freeze_count() == frozen  # objects made after the first call stay collectable
        del later
        assert gc.collect() >= 2  # the later cycle is reclaimed
        print("ok", frozen)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
