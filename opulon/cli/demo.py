"""``opulon demo``: the whole product, end to end, on this machine.

Starts the built-in mock provider and the gateway on free loopback ports in a temporary home,
adds the provider, creates a key, sends a few requests, streams one answer to the terminal,
prints the usage rows, and shuts everything down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from opulon.cli.console import console
from opulon.cli.serve import uvicorn_config
from opulon.formatting import CLOCK, utc
from opulon.keys import KeyStore
from opulon.limits import parse_limit
from opulon.providers import ProviderStore
from opulon.settings import GatewaySettings, Settings
from opulon.storage import open_store

if TYPE_CHECKING:  # the HTTP stack loads only when the demo runs
    import httpx


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def running_gateway(settings: Settings, gateway: GatewaySettings) -> Iterator[str]:
    """Serve the gateway in a background thread on a free loopback port; yields its URL."""
    import uvicorn

    sock = _loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn_config(settings, dataclasses.replace(gateway, port=port))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def demo(
    home: Annotated[
        Path | None,
        typer.Option(
            "--home", help="Data dir for the demo. Default: a temporary one, removed after."
        ),
    ] = None,
) -> None:
    """Run the gateway end to end against a built-in mock provider.

    Example: opulon demo
    """
    import httpx

    from opulon.demo_provider import DemoConfig, DemoProvider

    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opulon-demo-")))
        settings = Settings(home=home.absolute())
        provider_key = "mock-" + secrets.token_urlsafe(16)
        mock = stack.enter_context(
            DemoProvider(DemoConfig(api_key=provider_key, chunks=12, chunk_delay_ms=60))
        )
        console.print(f"[bold]1.[/] Mock provider listening on {mock.url}")
        store = open_store(settings)
        try:
            ProviderStore(store).add(
                "mock-openai", kind="openai", base_url=mock.url + "/v1", api_key=provider_key,
                models=("gpt-*", "text-embedding-*"),
            )  # fmt: skip
            ProviderStore(store).add(
                "mock-anthropic", kind="anthropic", base_url=mock.url, api_key=provider_key,
                models=("claude-*",),
            )  # fmt: skip
            record, key = KeyStore(store).create(
                "demo", limits=[parse_limit("requests:60/1m"), parse_limit("tokens:100k/1h")]
            )
        finally:
            store.close()
        console.print(f"[bold]2.[/] Data dir {settings.home}")
        console.print(
            f"   providers added; key {record.prefix} created (requests:60/1m, tokens:100k/1h)"
        )
        gateway = GatewaySettings(log_requests=False, flush_interval=0.1)
        url = stack.enter_context(running_gateway(settings, gateway))
        console.print(f"[bold]3.[/] Gateway listening on {url}\n")
        client = stack.enter_context(
            httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30)
        )
        _requests(client)
        _stream(client)
        time.sleep(0.3)  # let the usage writer flush
        _usage_table(settings)
    console.print("\n[green]Done.[/] The gateway and the mock provider have stopped.")


def _requests(client: httpx.Client) -> None:
    calls: list[tuple[str, str, dict[str, Any], dict[str, str]]] = [
        ("chat", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello, gateway!"}]}, {}),
        ("embeddings", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "privacy first"}, {}),
        ("anthropic", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi Claude"}]}, {"anthropic-version": "2023-06-01"}),
        ("unknown model", "/v1/chat/completions", {"model": "llama-9000", "messages": []}, {}),
    ]  # fmt: skip
    for label, path, payload, headers in calls:
        response = client.post(path, json=payload, headers=headers)
        body = response.json()
        if response.status_code == 200:
            summary = _answer_text(body)
        else:
            error = body.get("error", {})
            summary = error.get("message", "") if isinstance(error, dict) else str(error)
        console.print(f"  {label:<14} POST {path:<22} -> {response.status_code}  {summary}")
    remaining = response.headers.get("x-ratelimit-remaining-requests")
    if remaining is not None:
        console.print(f"  rate-limit headers: {remaining} requests left this minute")


def _answer_text(body: dict[str, Any]) -> str:
    if "choices" in body:
        return str(body["choices"][0]["message"]["content"]).strip()
    if body.get("object") == "list":
        return f"{len(body['data'][0]['embedding'])}-dimensional embedding"
    if "content" in body:
        return str(body["content"][0]["text"]).strip()
    return ""


def _stream(client: httpx.Client) -> None:
    console.print("\n[bold]4.[/] Streaming an answer as it arrives:\n  ", end="")
    payload = {
        "model": "gpt-4o",
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me what you store."}],
    }
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    console.print(text, end="", markup=False, highlight=False)
    console.print()


def _usage_table(settings: Settings) -> None:
    store = open_store(settings)
    try:
        rows = store.db.execute(
            "SELECT key_prefix, ts, model, status, latency_ms, input_tokens, output_tokens "
            "FROM usage ORDER BY ts"
        ).fetchall()
    finally:
        store.close()
    table = Table(title="\n5. Usage rows recorded (this is everything stored per request)")
    table.add_column("key", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("model", overflow="fold")
    for column in ("status", "latency ms", "in", "out"):
        table.add_column(column, justify="right")
    for prefix, ts, model, status, latency, tokens_in, tokens_out in rows:
        clock = utc(ts, CLOCK)
        table.add_row(
            prefix, clock, model, str(status), f"{latency:.1f}", str(tokens_in), str(tokens_out)
        )
    console.print(table)
