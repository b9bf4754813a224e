"""Running the CLI the way a user does, for the CLI tests."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from opulon.cli import app

runner = CliRunner()


def run(*args: str, input: str | None = None) -> Any:
    return runner.invoke(app, list(args), input=input)


def run_ok(*args: str, input: str | None = None) -> Any:
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def run_json(*args: str) -> Any:
    return json.loads(run_ok(*args, "--json").stdout)


def run_error(*args: str, code: int | None = None, input: str | None = None) -> str:
    """Run a command that must fail with one clear line; return that line."""
    result = run(*args, input=input)
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]
