from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from cli_helpers import run, run_json, run_ok


def test_doctor_reports_a_sound_setup(isolated_home: Path) -> None:
    run_ok("keys", "list")
    report = run_json("doctor")
    assert report["ok"] is True
    assert report["schema"].startswith("m0")
    names = {check["name"] for check in report["checks"]}
    assert {"database", "master key file", "master key fits", "schema"} <= names
    python = next(check for check in report["checks"] if check["name"] == "python")
    assert python["ok"] is True  # advice only: any CPython serves
    assert python["detail"].startswith(f"Python {sys.version.split()[0]} ")
    assert "All checks passed" in run_ok("doctor").stdout


def test_doctor_fails_on_a_loose_file_mode(isolated_home: Path) -> None:
    run_ok("keys", "list")
    os.chmod(isolated_home / "opulon.db", 0o644)
    result = run("doctor")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout


def test_doctor_fails_on_a_wrong_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    run_ok("keys", "list")
    monkeypatch.setenv("OPULON_MASTER_KEY", "q" * 43 + "=")
    result = run("doctor", "--json")
    assert result.exit_code == 1
    assert "does not fit" in result.stdout


def test_doctor_on_an_empty_home_says_so() -> None:
    result = run("doctor")
    assert result.exit_code == 1
    assert "missing" in result.stdout
