"""The CLI's help and global options, run as a user runs the installed ``opulon``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from gateway_helpers import OPULON


def _run(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    if home is not None:
        env.pop("OPULON_HOME", None)
    return subprocess.run([OPULON, *args], capture_output=True, text=True, timeout=60, env=env)


def test_bare_opulon_prints_the_help_and_succeeds() -> None:
    result = _run()
    assert result.returncode == 0
    assert "Usage: opulon" in result.stdout and "keys" in result.stdout
    assert "error" not in result.stderr


def test_the_version_with_a_short_flag() -> None:
    for flag in ("-V", "--version"):
        result = _run(flag)
        assert result.returncode == 0 and result.stdout.startswith("opulon ")


COMMANDS = [
    ("keys", "create"), ("keys", "update"), ("keys", "rotate"), ("providers", "add"),
    ("providers", "update"), ("serve",), ("usage",), ("doctor",),
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_each_value_and_keeps_option_names_whole(command: tuple[str, ...]) -> None:
    result = _run(*command, "--help")
    assert result.returncode == 0
    for placeholder in ("<str>", "<bool>", "<list[str]>", "<int>", "<float>"):
        assert placeholder not in result.stdout
    assert "Example" in result.stdout or command in (("doctor",), ("keys", "rotate"))


def test_help_shows_the_value_names() -> None:
    out = _run("keys", "update", "--help").stdout
    assert "--limit" in out and "LIMIT" in out and "METRIC/WINDOW" in out
    assert "--home" in _run("--help").stdout and "DIR" in _run("--help").stdout


def test_home_is_accepted_before_and_after_the_subcommand(tmp_path: Path) -> None:
    after = tmp_path / "after"
    before = tmp_path / "before"
    assert _run("keys", "create", "--name", "a", "--home", str(after), home=after).returncode == 0
    assert _run("--home", str(before), "keys", "list", home=before).returncode == 0
    assert (after / "opulon.db").exists() and (before / "opulon.db").exists()
    assert _run("keys", "list", f"--home={after}", "--json", home=after).stdout.count('"a"') == 1
