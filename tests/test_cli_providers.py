from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run, run_error, run_json, run_ok
from mock_provider import MockConfig, MockProvider

pytestmark = pytest.mark.usefixtures("database_from_env")


@pytest.fixture
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("UPSTREAM", "sk-upstream-123")
    return "sk-upstream-123"


def test_add_list_remove(upstream_key: str, isolated_home: Path) -> None:
    run_ok("providers", "add", "openai", "--kind", "openai", "--base-url",
           "https://api.openai.com/v1", "--api-key-env", "UPSTREAM", "--models", "gpt-*,o3*")  # fmt: skip
    run_ok("providers", "add", "claude", "--kind", "anthropic", "--base-url",
           "https://api.anthropic.com", "--api-key-stdin", input="sk-ant-xyz\n")  # fmt: skip
    listed = run_json("providers", "list")
    assert listed == [
        {"name": "openai", "kind": "openai", "base_url": "https://api.openai.com/v1",
         "models": ["gpt-*", "o3*"], "api_key": "set", "allow": []},
        {"name": "claude", "kind": "anthropic", "base_url": "https://api.anthropic.com",
         "models": ["*"], "api_key": "set", "allow": []},
    ]  # fmt: skip
    assert "openai" in run_ok("providers", "list").stdout
    for path in isolated_home.iterdir():
        assert b"sk-upstream-123" not in path.read_bytes()
        assert b"sk-ant-xyz" not in path.read_bytes()
    assert "not confirmed; nothing changed" in run_error("providers", "remove", "openai")
    assert len(run_json("providers", "list")) == 2
    run_ok("providers", "remove", "openai", "--yes")
    assert [p["name"] for p in run_json("providers", "list")] == ["claude"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--kind", "azure", "--base-url", "https://x.io", "--api-key-env", "UPSTREAM"],
            "invalid kind 'azure'",
        ),
        (
            ["--kind", "openai", "--base-url", "ftp://x.io", "--api-key-env", "UPSTREAM"],
            "invalid base URL",
        ),
        (
            ["--kind", "openai", "--base-url", "https://x.io?a=1", "--api-key-env", "UPSTREAM"],
            "no query",
        ),
        (
            ["--kind", "openai", "--base-url", "https://x.io", "--api-key-env", "NOPE_NOT_SET"],
            "NOPE_NOT_SET is not set",
        ),
        (
            ["--kind", "openai", "--base-url", "https://x.io"],
            "--api-key-env VAR or --api-key-stdin",
        ),
        (
            [
                "--kind",
                "openai",
                "--base-url",
                "https://x.io",
                "--api-key-env",
                "UPSTREAM",
                "--api-key-stdin",
            ],
            "not both",
        ),
        (
            ["--kind", "openai", "--base-url", "https://x.io", "--api-key-stdin"],
            "no API key on standard input",
        ),
        (
            [
                "--kind",
                "openai",
                "--base-url",
                "https://x.io",
                "--api-key-env",
                "UPSTREAM",
                "--models",
                "gpt-4o'); import os; ('",
            ],
            "invalid model pattern",
        ),
        (
            [
                "--kind",
                "openai",
                "--base-url",
                "https://x.io",
                "--api-key-env",
                "UPSTREAM",
                "--models",
                "gpt 4o",
            ],
            "invalid model pattern",
        ),
    ],
)
def test_bad_input_for_every_add_option(upstream_key: str, args: list[str], message: str) -> None:
    assert message in run_error("providers", "add", "p", *args)
    assert run_json("providers", "list") == []


def test_bad_names_and_duplicates(upstream_key: str) -> None:
    base = ["--kind", "openai", "--base-url", "https://x.io", "--api-key-env", "UPSTREAM"]
    assert "invalid provider name" in run_error("providers", "add", "a b", *base)
    run_ok("providers", "add", "p", *base)
    assert "exists" in run_error("providers", "add", "p", *base)
    assert "no provider named 'zz'" in run_error("providers", "remove", "zz")
    assert "no provider named 'zz'" in run_error("providers", "test", "zz")


def test_provider_test_makes_one_call_and_reports_status_and_latency(upstream_key: str) -> None:
    with MockProvider(MockConfig(api_key=upstream_key)) as mock:
        run_ok("providers", "add", "good", "--kind", "openai", "--base-url", mock.url + "/v1",
               "--api-key-env", "UPSTREAM")  # fmt: skip
        run_ok("providers", "add", "badkey", "--kind", "anthropic", "--base-url", mock.url,
               "--api-key-stdin", input="wrong\n")  # fmt: skip
        report = run_json("providers", "test", "good")
        assert report["status"] == 200 and report["ok"] is True and report["latency_ms"] > 0
        assert "HTTP 200" in run_ok("providers", "test", "good").stdout
        result = run("providers", "test", "badkey")
        assert result.exit_code == 1 and "HTTP 401" in result.stdout
    run_ok("providers", "add", "gone", "--kind", "openai", "--base-url", "http://127.0.0.1:9/v1",
           "--api-key-env", "UPSTREAM")  # fmt: skip
    assert "cannot connect" in run_error("providers", "test", "gone")


def test_add_echoes_exactly_the_base_url_it_stored(upstream_key: str) -> None:
    out = run_ok("providers", "add", "gemini", "--kind", "openai", "--base-url",
                 "https://generativelanguage.googleapis.com/v1beta/openai/",
                 "--api-key-env", "UPSTREAM").stdout  # fmt: skip
    assert "https://generativelanguage.googleapis.com/v1beta/openai," in " ".join(out.split())
    out = run_ok("providers", "add", "claude", "--kind", "anthropic", "--base-url",
                 "https://api.anthropic.com/v1", "--api-key-env", "UPSTREAM").stdout  # fmt: skip
    assert "https://api.anthropic.com," in " ".join(out.split())
    stored = {p["name"]: p["base_url"] for p in run_json("providers", "list")}
    assert stored == {
        "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
        "claude": "https://api.anthropic.com",
    }
