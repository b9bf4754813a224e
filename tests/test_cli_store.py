"""The store the CLI and the gateway use: ``--database`` / ``OPULON_DATABASE_URL``, on both engines.

On the ``sqlite`` engine the URL is ``sqlite:///`` a file outside the data dir; on
``postgresql`` a schema of this test's own in the test PostgreSQL.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cli_helpers import run_error, run_json, run_ok
from gateway_helpers import Gateway, another_node, cli, start_gateway

from opulon.keys import KeyRecord, KeyStore
from opulon.providers import ProviderStore
from opulon.runtime import Runtime
from opulon.settings import GatewaySettings, Settings
from opulon.storage import open_store


@pytest.fixture
def url(engine: str, database_url: str | None, tmp_path: Path) -> str:
    return database_url or f"sqlite:///{tmp_path / 'elsewhere' / 'opulon.db'}"


def test_every_command_uses_the_database_given_by_option_or_environment(
    url: str, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = run_json("--database", url, "keys", "create", "--name", "alice")
    # After the subcommand too, as --home (the console script moves it to the front).
    after = subprocess.run(
        [sys.executable, "-m", "opulon", "keys", "update", created["prefix"],
         "--limit", "requests:5/1m", "--database", url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert after.returncode == 0, after.stderr
    monkeypatch.setenv("UPSTREAM", "sk-upstream-123")
    monkeypatch.setenv("OPULON_DATABASE_URL", url)
    run_ok("providers", "add", "openai", "--kind", "openai", "--base-url",
           "https://api.openai.com/v1", "--api-key-env", "UPSTREAM")  # fmt: skip
    listed = run_json("keys", "list")
    assert [(row["prefix"], row["limits"]) for row in listed] == [
        (created["prefix"], ["requests:5/1m"])
    ]
    assert run_json("usage", "--since", "1h")["totals"]["requests"] == 0
    monkeypatch.delenv("OPULON_DATABASE_URL")
    # The data is in that database, not in the data dir's own file...
    assert run_json("keys", "list") == []
    store = open_store(Settings(home=isolated_home, database_url=url))
    try:
        assert [k.prefix for k in KeyStore(store).all()] == [created["prefix"]]
        # ...and its secrets open with the master key of the data dir.
        assert ProviderStore(store).get("openai").api_key == "sk-upstream-123"
        assert KeyStore(store).reveal(created["prefix"]) == created["key"]
    finally:
        store.close()


async def _seen_within(runtime: Runtime, raw_key: str, want_record: bool) -> float:
    """Seconds until the gateway's poll (every reload_interval) sees the key as wanted."""
    started = time.monotonic()
    while time.monotonic() - started < 5:
        runtime.reload()
        result = runtime._authenticate(raw_key)
        if isinstance(result, KeyRecord) == want_record:
            return time.monotonic() - started
        await asyncio.sleep(runtime.gateway.reload_interval)
    raise AssertionError("the gateway never saw the change")


def test_a_change_made_by_the_cli_reaches_a_running_gateway_within_a_second(
    url: str, isolated_home: Path
) -> None:
    runtime = Runtime(Settings(home=isolated_home, database_url=url), GatewaySettings())
    try:
        created = run_json("--database", url, "keys", "create", "--name", "alice")
        assert asyncio.run(_seen_within(runtime, created["key"], True)) < 1.0
        run_ok("--database", url, "keys", "disable", created["prefix"])
        assert asyncio.run(_seen_within(runtime, created["key"], False)) < 1.0
    finally:
        runtime.close()


def test_a_bad_database_url_is_one_line_without_its_password(url: str) -> None:
    assert "postgresql://USER@HOST" in run_error(
        "--database", "mysql://root:hunter2@db/opulon", "keys", "list", code=2
    )
    assert "it is not a database URL" in run_error(
        "--database", "root:hunter2@db", "keys", "list", code=2
    )
    line = run_error(
        "--database", "postgresql://opulon:hunter2@127.0.0.1:9/opulon", "keys", "list", code=1
    )
    assert line.startswith("error: cannot connect to the database postgresql://opulon@127.0.0.1:9")
    assert "hunter2" not in line


def _answers(gateway: Gateway, key: str, status: int) -> float:
    """Seconds until the gateway answers ``status`` to a request with ``key`` (at most 5)."""
    started = time.monotonic()
    while time.monotonic() - started < 5:
        answer = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        if answer.status_code == status:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"no {status} from {gateway.url} within 5 s")


def test_two_gateways_share_one_store(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``opulon serve`` on the same database (each with a data dir of its own and the same
    master key): a key the CLI creates works on both within a second, every answered request
    of either is a row of the store, and a deleted key is refused by both within a second."""
    monkeypatch.setenv("OPULON_DATABASE_URL", url)
    one = start_gateway(tmp_path / "one")
    two = another_node(one, tmp_path / "two")
    try:
        two.start()
        key = one.create_key("shared")
        assert max(_answers(one, key, 200), _answers(two, key, 200)) < 1.0
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
        for gateway, count in ((one, 3), (two, 2)):
            for _ in range(count):
                answer = httpx.post(
                    gateway.url + "/v1/chat/completions",
                    json=chat,
                    headers={"authorization": f"Bearer {key}"},
                    timeout=10,
                )
                assert answer.status_code == 200, answer.text
        cli(two.home, "keys", "delete", key[:16], "--yes")
        assert max(_answers(one, key, 401), _answers(two, key, 401)) < 1.0
    finally:
        for gateway in (one, two):
            if gateway.process is not None:
                gateway.stop()
        one.mock.stop()
    assert "serving on port" in two.output.read_text()


def test_every_answered_request_of_two_gateways_is_a_row_of_the_store(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPULON_DATABASE_URL", url)
    one = start_gateway(tmp_path / "one")
    two = another_node(one, tmp_path / "two")
    try:
        two.start()
        key = one.create_key("shared")
        _answers(one, key, 200)
        _answers(two, key, 200)
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
        for gateway, count in ((one, 30), (two, 20)):
            for _ in range(count):
                answer = httpx.post(
                    gateway.url + "/v1/chat/completions",
                    json=chat,
                    headers={"authorization": f"Bearer {key}"},
                    timeout=10,
                )
                assert answer.status_code == 200, answer.text
    finally:
        for gateway in (one, two):
            if gateway.process is not None:
                gateway.stop()
        one.mock.stop()
    store = open_store(Settings(home=one.home, database_url=url))
    try:
        report = run_json("--home", str(one.home), "--database", url, "usage", "--since", "1h")
        rows = store.db.execute("SELECT count(*), count(DISTINCT status) FROM usage").fetchone()
    finally:
        store.close()
    assert tuple(rows) == (50, 1)
    assert report["totals"]["requests"] == 50
