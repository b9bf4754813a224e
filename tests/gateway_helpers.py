"""A live gateway for tests: ``opulon serve`` as a subprocess, in front of the mock provider."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from mock_provider import MockConfig, MockProvider

UPSTREAM_KEY = "upstream-secret-0123456789"
OPULON = str(Path(sys.executable).parent / "opulon")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(home: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    """Run the installed ``opulon`` as a user would; returns stdout, fails loudly otherwise."""
    result = subprocess.run(
        [OPULON, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        input=stdin,
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@dataclass
class Gateway:
    """A running ``opulon serve`` with its home, output file and mock provider."""

    home: Path
    tmp: Path
    port: int
    mock: MockProvider
    output: Path
    process: subprocess.Popen[bytes] | None = None
    keys: dict[str, str] = field(default_factory=dict)
    verify: Any = True  # for a gateway serving TLS: the context that trusts its certificate

    @property
    def url(self) -> str:
        scheme = "http" if self.verify is True else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> None:
        env = {**os.environ, "TMPDIR": str(self.tmp), "OPULON_HOME": str(self.home)}
        env.pop("OPULON_MASTER_KEY", None)
        handle = self.output.open("ab")
        self.process = subprocess.Popen(
            [OPULON, "serve", "--port", str(self.port), *extra],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output.read_text()
            try:
                health = httpx.get(self.url + "/healthz", timeout=1, verify=self.verify)
                if health.status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("the gateway did not start: " + self.output.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=40)
        self.process = None
        return code

    def create_key(self, name: str, *options: str) -> str:
        import json

        data = json.loads(cli(self.home, "keys", "create", "--name", name, *options, "--json"))
        key: str = data["key"]
        self.keys[name] = key
        return key

    def new_key(self, *options: str) -> str:
        """A fresh key (through the key store on the same database), once the server knows it."""
        from opulon.keys import KeyStore
        from opulon.limits import parse_limit
        from opulon.settings import Settings
        from opulon.storage import open_store

        limits = [parse_limit(text) for text in options]
        store = open_store(Settings(home=self.home))
        try:
            _, key = KeyStore(store).create("test", limits=limits)
        finally:
            store.close()
        deadline = time.monotonic() + 5
        headers = {"authorization": f"Bearer {key}"}
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/v1/models", headers=headers, timeout=5).status_code == 200:
                return key
            time.sleep(0.02)
        raise AssertionError("the server did not pick up a new key within 5 s")

    def rows(
        self, key: str | None = None, *, wait_for: int | None = None, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The usage rows (of ``key``), waiting (bounded) until at least ``wait_for`` exist."""
        deadline = time.monotonic() + timeout
        where, params = ("WHERE key_prefix = ?", [key[:16]]) if key else ("", [])
        while True:
            with sqlite3.connect(self.home / "opulon.db") as conn:
                conn.row_factory = sqlite3.Row
                rows = [
                    dict(row)
                    for row in conn.execute(f"SELECT * FROM usage {where} ORDER BY rowid", params)
                ]
            if wait_for is None or len(rows) >= wait_for or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


def start_gateway(
    base: Path, config: MockConfig | None = None, *serve_args: str, verify: Any = True
) -> Gateway:
    """A gateway in ``base`` with three providers; ``verify`` trusts its certificate when
    ``serve_args`` make it serve TLS."""
    home, tmp = base / "home", base / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    mock = MockProvider(config or MockConfig(api_key=UPSTREAM_KEY)).start()
    gateway = Gateway(
        home=home, tmp=tmp, port=free_port(), mock=mock, output=base / "server.log", verify=verify
    )
    env = {"UPSTREAM_KEY": UPSTREAM_KEY}
    cli(home, "providers", "add", "mock-openai", "--kind", "openai", "--base-url",
        mock.url + "/v1", "--api-key-env", "UPSTREAM_KEY", "--models", "gpt-*,text-embedding-*",
        env=env)  # fmt: skip
    cli(home, "providers", "add", "mock-anthropic", "--kind", "anthropic", "--base-url",
        mock.url, "--api-key-stdin", "--models", "claude-*", stdin=UPSTREAM_KEY + "\n")  # fmt: skip
    cli(home, "providers", "add", "unreachable", "--kind", "openai", "--base-url",
        f"http://127.0.0.1:{free_port()}/v1", "--api-key-env", "UPSTREAM_KEY",
        "--models", "dead-*", env=env)  # fmt: skip
    gateway.start(*serve_args)
    return gateway


def another_node(first: Gateway, base: Path) -> Gateway:
    """A second gateway (not started) beside ``first``: a data dir of its own in ``base``,
    holding the installation's master key, the same mock provider, a port of its own."""
    home = base / "home"
    home.mkdir(parents=True, mode=0o700)
    (home / "master.key").write_bytes((first.home / "master.key").read_bytes())
    (home / "master.key").chmod(0o600)
    (base / "tmp").mkdir()
    return Gateway(home, base / "tmp", free_port(), first.mock, base / "server.log")


async def streams_until_killed(
    gateway: Gateway, key: str, *, clients: int = 8, kill_after: float = 1.5
) -> tuple[int, int]:
    """Short streamed answers from ``clients`` clients at once, one after another, until
    ``gateway`` is killed (``SIGKILL``) ``kill_after`` seconds in; (answers that reached their
    client in full, requests begun). Bounded: 20 s and 5,000 requests at most."""
    import asyncio

    body = {
        "model": "gpt-4o",
        "stream": True,
        "messages": [{"role": "user", "content": "until killed"}],
        "mock": {"chunks": 4, "chunk-delay-ms": 5},
    }
    process = gateway.process
    assert process is not None
    finished = begun = 0
    deadline = time.monotonic() + 20
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def one_client() -> None:
            nonlocal finished, begun
            while time.monotonic() < deadline and begun < 5000:
                begun += 1
                try:
                    async with client.stream(
                        "POST",
                        gateway.url + "/v1/chat/completions",
                        json=body,
                        headers={"authorization": f"Bearer {key}"},
                    ) as response:
                        text = (await response.aread()).decode()
                except httpx.HTTPError:
                    return  # the gateway is gone
                assert response.status_code == 200, text
                if text.rstrip().endswith("data: [DONE]"):
                    finished += 1

        async def kill() -> None:
            await asyncio.sleep(kill_after)
            process.send_signal(signal.SIGKILL)

        await asyncio.gather(kill(), *(one_client() for _ in range(clients)))
    process.wait(timeout=10)
    gateway.process = None
    return finished, begun
