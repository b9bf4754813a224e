from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gateway_helpers import OPULON


def test_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    result = subprocess.run(
        [OPULON, "demo", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Mock provider listening" in out and "Gateway listening" in out
    assert "-> 200" in out and "-> 404" in out
    assert "Echo: Tell me what you store." in out  # the streamed answer
    # The usage table: four forwarded requests, one row each, nothing else stored.
    assert out.count("op-ul-") >= 5
    assert "Done." in out and "Traceback" not in result.stderr
    import sqlite3

    rows = sqlite3.connect(home / "opulon.db").execute("SELECT model, status FROM usage").fetchall()
    assert sorted(rows) == sorted(
        [
            ("gpt-4o-mini", 200),
            ("text-embedding-3-small", 200),
            ("claude-sonnet-4-5", 200),
            ("gpt-4o", 200),
        ]
    )
