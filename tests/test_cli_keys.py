from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_error, run_json, run_ok

pytestmark = pytest.mark.usefixtures("database_from_env")


def _create(*extra: str) -> dict[str, str]:
    data: dict[str, str] = run_json("keys", "create", "--name", "t", *extra)
    return data


def test_create_prints_the_full_key_once_and_stores_it_encrypted(isolated_home: Path) -> None:
    data = _create("--limit", "requests:60/1m")
    key = data["key"]
    assert key.startswith("op-ul-") and data["prefix"] == key[:16]
    assert data["limits"] == ["requests:60/1m"]
    for path in isolated_home.iterdir():
        content = path.read_bytes()
        assert key.encode() not in content
        assert key[16:].encode() not in content
    listed = run_json("keys", "list")
    assert [row["prefix"] for row in listed] == [data["prefix"]]
    assert "key" not in listed[0]


def test_create_with_every_option() -> None:
    data = _create(
        "--email", "alice@example.com",
        "--limit", "requests:60/1m",
        "--limit", "tokens:1.5M/5h",
        "--budget", "tokens:100M",
        "--concurrency", "4",
        "--models", "gpt-4o*,claude-*",
        "--expires", "2099-01-31",
    )  # fmt: skip
    shown = run_json("keys", "show", data["prefix"])
    assert shown["email"] == "alice@example.com"
    assert shown["limits"] == ["requests:60/1m", "tokens:1.5M/5h"]
    assert shown["budget"] == "tokens:100M"
    assert shown["concurrency"] == 4
    assert shown["models"] == ["gpt-4o*", "claude-*"]
    assert shown["expires"] == "2099-01-31T00:00:00Z"


def test_human_output_shows_the_key_and_a_table() -> None:
    result = run_ok("keys", "create", "--name", "alice", "--limit", "requests:60/1m")
    assert "op-ul-" in result.stdout and "shown only this once" in result.stdout
    table = run_ok("keys", "list").stdout
    assert "alice" in table and "requests:60/1m" in table
    assert run_ok("keys", "show", table.split("op-ul-")[1][:10].join(["op-ul-", ""])).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "tokens:abc/1m"], "invalid amount 'abc' in limit 'tokens:abc/1m'"),
        (["--limit", "tokens:1/1y"], "invalid window '1y'"),
        (["--limit", "cats:1/1m"], "unknown metric 'cats'"),
        (["--budget", "tokens:1M/1d"], "a budget has no window"),
        (["--budget", "tokens:x"], "invalid amount 'x'"),
        (["--concurrency", "0"], "invalid concurrency '0'"),
        (["--concurrency", "many"], "invalid concurrency 'many'"),
        (["--expires", "2001-01-01"], "in the past"),
        (["--expires", "tomorrow"], "invalid expiry 'tomorrow'"),
        (["--email", "nobody"], "invalid email 'nobody'"),
        (["--models", "gpt 4"], "invalid model pattern"),
    ],
)
def test_bad_input_for_every_create_option(args: list[str], message: str) -> None:
    line = run_error("keys", "create", "--name", "t", *args)
    assert message in line
    assert run_json("keys", "list") == []  # nothing was created


def test_missing_name_is_one_line() -> None:
    assert "--name" in run_error("keys", "create", code=2)


def test_unknown_prefix_exits_1_with_a_clear_message() -> None:
    for command in ("show", "disable", "enable", "rotate", "reveal", "delete"):
        line = run_error("keys", command, "op-ul-aaaaaaaaaa", code=1)
        assert "no key with prefix op-ul-aaaaaaaaaa" in line
    assert "invalid key prefix" in run_error("keys", "show", "xyz")


def test_update_changes_limits_and_keeps_the_rest() -> None:
    data = _create("--limit", "requests:60/1m", "--budget", "tokens:1M", "--email", "a@b.co")
    prefix = data["prefix"]
    run_ok("keys", "update", prefix, "--limit", "requests:10/1s", "--concurrency", "2")
    shown = run_json("keys", "show", prefix)
    assert shown["limits"] == ["requests:60/1m", "requests:10/1s"]
    assert shown["budget"] == "tokens:1M"
    assert shown["concurrency"] == 2 and shown["email"] == "a@b.co"
    run_ok("keys", "update", prefix, "--budget", "none", "--email", "none", "--expires", "30d")
    shown = run_json("keys", "show", prefix)
    assert shown["budget"] is None and shown["email"] is None and shown["expires"]
    run_ok("keys", "update", prefix, "--clear-limits", "--expires", "never", "--name", "renamed")
    shown = run_json("keys", "show", prefix)
    assert shown["limits"] == [] and shown["expires"] is None and shown["name"] == "renamed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to update"),
        (["--limit", "requests:x/1m"], "invalid amount 'x'"),
        (["--remove-limit", "requests/1m", "--clear-limits"], "not both"),
        (["--remove-limit", "tokens/1d"], "the key has no limit on tokens per 1d"),
        (["--remove-limit", "requests"], "missing window"),
        (["--remove-limit", "bananas/1m"], "bananas"),
        (["--budget", "tokens"], "expected METRIC:AMOUNT"),
        (["--concurrency", "-1"], "invalid concurrency"),
        (["--expires", "yesterday"], "invalid expiry"),
        (["--email", "x@"], "invalid email"),
        (["--name", " "], "non-empty --name"),
    ],
)
def test_bad_input_for_every_update_option(args: list[str], message: str) -> None:
    prefix = _create("--limit", "requests:60/1m")["prefix"]
    assert message in run_error("keys", "update", prefix, *args)
    assert run_json("keys", "show", prefix)["limits"] == ["requests:60/1m"]


def test_update_limit_replaces_only_the_same_metric_and_window_and_says_what_changed() -> None:
    prefix = _create("--limit", "requests:60/1m", "--limit", "tokens:1M/1d")["prefix"]
    out = run_ok("keys", "update", prefix, "--limit", "requests:120/1m",
                 "--limit", "input_tokens:50k/1h").stdout  # fmt: skip
    assert "replaced requests:60/1m with requests:120/1m" in out
    assert "added input_tokens:50k/1h" in out
    limits = run_json("keys", "show", prefix)["limits"]
    assert sorted(limits) == ["input_tokens:50k/1h", "requests:120/1m", "tokens:1M/1d"]
    out = run_ok("keys", "update", prefix, "--remove-limit", "tokens/1d",
                 "--remove-limit", "input_tokens:50k/1h").stdout  # fmt: skip
    assert "removed tokens:1M/1d" in out and "removed input_tokens:50k/1h" in out
    assert run_json("keys", "show", prefix)["limits"] == ["requests:120/1m"]
    out = run_ok("keys", "update", prefix, "--clear-limits", "--limit", "requests:5/1s").stdout
    assert "removed requests:120/1m" in out and "added requests:5/1s" in out
    assert run_json("keys", "show", prefix)["limits"] == ["requests:5/1s"]


def test_rotate_gives_a_new_key_and_the_old_prefix_is_gone() -> None:
    data = _create("--limit", "requests:60/1m")
    rotated = run_json("keys", "rotate", data["prefix"])
    assert rotated["key"] != data["key"] and rotated["key"].startswith("op-ul-")
    assert rotated["previous_prefix"] == data["prefix"]
    assert rotated["limits"] == ["requests:60/1m"]
    assert "it was rotated" in run_error("keys", "show", data["prefix"])
    assert run_json("keys", "reveal", rotated["prefix"], "--yes")["key"] == rotated["key"]


def test_rotate_with_grace_and_bad_grace() -> None:
    data = _create()
    assert "invalid window 'soon'" in run_error("keys", "rotate", data["prefix"], "--grace", "soon")
    result = run_ok("keys", "rotate", data["prefix"], "--grace", "10m")
    assert "keeps working for 10m" in result.stdout


def test_disable_and_enable_show_in_the_status() -> None:
    prefix = _create()["prefix"]
    run_ok("keys", "disable", prefix)
    assert run_json("keys", "show", prefix)["status"] == "disabled"
    run_ok("keys", "enable", prefix)
    assert run_json("keys", "show", prefix)["status"] == "active"


def test_delete_asks_unless_yes() -> None:
    prefix = _create()["prefix"]
    assert "not confirmed" in run_error("keys", "delete", prefix, input="n\n")
    assert "not confirmed" in run_error("keys", "delete", prefix)
    assert len(run_json("keys", "list")) == 1
    run_ok("keys", "delete", prefix, input="y\n")
    assert run_json("keys", "list") == []
    prefix = _create()["prefix"]
    run_ok("keys", "delete", prefix, "--yes")
    assert run_json("keys", "list") == []


def test_reveal_asks_unless_yes() -> None:
    data = _create()
    assert "not confirmed" in run_error("keys", "reveal", data["prefix"])
    assert (
        run_ok("keys", "reveal", data["prefix"], input="y\n").stdout.strip().endswith(data["key"])
    )
    assert run_ok("keys", "reveal", data["prefix"], "--yes").stdout.strip() == data["key"]


def test_wrong_master_key_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    _create()
    monkeypatch.setenv("OPULON_MASTER_KEY", "q" * 43 + "=")
    line = run_error("keys", "list")
    assert "does not fit the database" in line
    monkeypatch.setenv("OPULON_MASTER_KEY", "nope")
    assert "not a valid master key" in run_error("keys", "list")


@pytest.mark.sqlite_only
def test_home_option_overrides_the_environment(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    run_ok("--home", str(other), "keys", "create", "--name", "x")
    assert (other / "opulon.db").exists()
    assert run_json("keys", "list") == []


def test_version_and_unknown_command() -> None:
    assert run_ok("--version").stdout.startswith("opulon ")
    assert "No such command" in run_error("frobnicate", code=2)


def test_the_installed_entry_point_runs_as_a_subprocess(isolated_home: Path) -> None:
    exe = shutil.which("opulon", path=str(Path(sys.executable).parent))
    assert exe, "the opulon console script is installed beside the interpreter"
    env = {**os.environ, "OPULON_HOME": str(isolated_home)}
    created = subprocess.run(
        [exe, "keys", "create", "--name", "sub", "--limit", "requests:60/1m", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    key = json.loads(created.stdout)["key"]
    assert key.startswith("op-ul-")
    bad = subprocess.run(
        [exe, "keys", "show", "op-ul-zzzzzzzzzz"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["error: no key with prefix op-ul-zzzzzzzzzz"]
    assert "Traceback" not in bad.stderr
    assert time.time()  # the process ran to completion within its timeout


def test_names_with_brackets_are_printed_as_written() -> None:
    name = "[bold]team[/path] x"
    result = run_ok("keys", "create", "--name", name)
    assert name in result.stdout
    assert (
        name in run_ok("keys", "list").stdout.replace("\n", "")
        or "[bold]team" in run_ok("keys", "list").stdout
    )
    line = run_error("keys", "show", "op-ul-[/x]aaaaa")
    assert "invalid key prefix" in line
