from __future__ import annotations

import subprocess
import sys
import time

from opulon.interpreter import SLOWER_BUILD, describe, shared_libpython, summary


def test_another_process_of_this_interpreter_is_the_same_kind() -> None:
    mine = shared_libpython()
    assert mine in (True, False)  # Linux: /proc tells
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        deadline = time.monotonic() + 5
        while shared_libpython(child.pid) != mine and time.monotonic() < deadline:
            time.sleep(0.02)  # until the child has loaded its libraries
        assert shared_libpython(child.pid) == mine
    finally:
        child.kill()
        child.wait()


def test_the_description_names_the_build_and_advises_only_on_a_shared_one() -> None:
    line, fast = describe()
    assert line.startswith(f"Python {sys.version.split()[0]} ({sys.executable})")
    shared = shared_libpython()
    assert fast is (not shared)
    assert (SLOWER_BUILD in line) is bool(shared)
    assert summary().endswith("shared libpython" if shared else "static libpython")


def test_a_process_that_is_not_there_cannot_be_told() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                           capture_output=True, check=True)  # fmt: skip
    assert shared_libpython(int(child.stdout)) is None
