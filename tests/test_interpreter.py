from __future__ import annotations

import subprocess
import sys

from opulon.interpreter import describe, shared_libpython


def test_another_process_of_this_interpreter_is_described_alike() -> None:
    mine = shared_libpython()
    assert mine in (True, False)  # Linux: /proc tells
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        for _ in range(100):  # until the child has loaded its libraries
            if shared_libpython(child.pid) == mine:
                break
            subprocess.run(["sleep", "0.02"], check=True)
        assert shared_libpython(child.pid) == mine
        line, fast = describe(child.pid)
        assert fast is (not mine)
        assert f"process {child.pid}" in line
    finally:
        child.kill()
        child.wait()


def test_a_process_that_is_not_there_cannot_be_told() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                           capture_output=True, check=True)  # fmt: skip
    gone = int(child.stdout)
    assert shared_libpython(gone) is None
    line, fast = describe(gone)
    assert fast and line.endswith(f"(process {gone})")
