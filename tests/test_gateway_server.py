"""The uvicorn protocol of ``opulon serve``: a response's head goes out with its body.

Also the internals of uvicorn, aiohttp and sqlite-utils that the code relies on: each check
names the internal and the module that uses it. pyproject.toml bounds these dependencies to
versions these tests passed on; raise a bound only once they pass on the new version.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import client_proto
from sqlite_utils import Database
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

from opulon.demo_provider import DemoProvider
from opulon.gateway.server import GatewayHttpProtocol
from opulon.gateway.upstream import UpstreamClient
from opulon.storage import migrations

REQUEST = b"POST /v1/x HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"


class RecordingTransport(asyncio.Transport):
    """Records every write, as the socket would see them one ``send`` at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.closed_by_app = False  # closed before the test ended the connection

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def exchange(app: Any, request: bytes = REQUEST) -> RecordingTransport:
    """Feed one request to the protocol and run the app to its end."""

    async def run() -> RecordingTransport:
        config = uvicorn.Config(app, http=GatewayHttpProtocol, lifespan="off", log_level="error")
        protocol = GatewayHttpProtocol(config, ServerState(), {})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(request)
        for _ in range(100):
            if not protocol.tasks:
                break
            await asyncio.sleep(0.01)
        assert not protocol.tasks, "the app did not finish"
        transport.closed_by_app = transport.closed
        protocol.connection_lost(None)
        return transport

    return asyncio.run(run())


def test_a_response_with_a_length_goes_out_in_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    transport = exchange(app)
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 11" in head
    assert body == b'{"ok":true}'
    assert not transport.closed_by_app  # keep-alive as before


def test_a_stream_sends_its_head_at_once() -> None:
    head_written = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        head_written.set()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    transport = exchange(app)
    assert head_written.is_set()
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n")  # the head alone, before any event
    assert b"data: 1" in transport.writes[1]
    assert b"".join(transport.writes).endswith(b"0\r\n\r\n")


def test_a_held_head_gives_way_to_the_error_of_an_app_that_fails() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
        )
        raise RuntimeError("failed before its body")

    transport = exchange(app)
    sent = b"".join(transport.writes)
    assert sent.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"200 OK" not in sent


def test_connection_close_still_closes_after_the_single_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    request = REQUEST.replace(b"host: t\r\n", b"host: t\r\nconnection: close\r\n")
    transport = exchange(app, request)
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"\r\n\r\nok")
    assert transport.closed_by_app


# --------------------------------------------------------------------------------------------
# The dependencies' internals
# --------------------------------------------------------------------------------------------


def relied_on(internal: str, user: str, holds: bool, detail: str = "") -> None:
    """Fail with a message that names the internal that changed and the code that uses it."""
    if not holds:
        pytest.fail(f"{internal} changed ({detail or 'not as expected'}): {user} relies on it")


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


SERVER = "opulon/gateway/server.py"


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_uvicorn_makes_a_plain_request_response_cycle_per_request() -> None:
    async def run() -> Any:
        config = uvicorn.Config(ok_app, http=GatewayHttpProtocol, lifespan="off")
        protocol = GatewayHttpProtocol(config, ServerState(), {})
        protocol.connection_made(RecordingTransport())
        protocol.data_received(REQUEST)  # the request's task has not run yet
        cycle = protocol.cycle
        protocol.connection_lost(None)
        return cycle

    cycle = asyncio.run(run())
    internal = "uvicorn HttpToolsProtocol.on_headers_complete() setting self.cycle"
    relied_on(
        internal,
        SERVER,
        type(cycle).__name__ == "_CoalescingCycle",
        f"the cycle is a {type(cycle).__qualname__}, not a plain RequestResponseCycle",
    )
    for attribute in ("transport", "response_started"):
        relied_on(f"uvicorn RequestResponseCycle.{attribute}", SERVER, hasattr(cycle, attribute))


def test_uvicorn_cycle_sends_through_its_transport_write_and_close() -> None:
    send = httptools_impl.RequestResponseCycle.send
    internal = "uvicorn RequestResponseCycle.send(message)"
    relied_on(internal, SERVER, inspect.iscoroutinefunction(send), "no longer a coroutine")
    relied_on(internal, SERVER, parameters(send) == ["self", "message"], str(parameters(send)))
    # The held head and the body are collected by swapping self.transport for a stand-in
    # that has write() and close() only.
    used = set(re.findall(r"self\.transport\.(\w+)", inspect.getsource(send)))
    relied_on(internal, SERVER, used <= {"write", "close"}, f"it calls transport.{used}")


def test_uvicorn_server_startup_and_flags() -> None:
    startup = uvicorn.Server.startup
    relied_on(
        "uvicorn Server.startup(sockets)",
        "opulon/cli/serve.py (announcing_server)",
        inspect.iscoroutinefunction(startup) and parameters(startup) == ["self", "sockets"],
        str(parameters(startup)),
    )
    server = uvicorn.Server(uvicorn.Config(ok_app))
    for flag in ("started", "should_exit"):
        relied_on(
            f"uvicorn Server.{flag}",
            "opulon/cli/demo.py (running_gateway)",
            getattr(server, flag, None) is False,
        )


UPSTREAM = "opulon/gateway/upstream.py (UpstreamClient.send)"


@pytest.mark.parametrize(
    ("internal", "function", "expected"),
    [
        (
            "aiohttp ClientRequest(method, url, *, headers, data, loop, response_class, session)",
            aiohttp.ClientRequest.__init__,
            ["method", "url", "headers", "data", "loop", "response_class", "session"],
        ),
        (
            "aiohttp TCPConnector.connect(req, traces, timeout)",
            aiohttp.TCPConnector.connect,
            ["req", "traces", "timeout"],
        ),
        (
            "aiohttp ResponseHandler.set_response_params(skip_payload, read_until_eof, "
            "auto_decompress, read_timeout)",
            client_proto.ResponseHandler.set_response_params,
            ["skip_payload", "read_until_eof", "auto_decompress", "read_timeout"],
        ),
        ("aiohttp ClientRequest.send(conn)", aiohttp.ClientRequest.send, ["conn"]),
        ("aiohttp ClientResponse.start(connection)", aiohttp.ClientResponse.start, ["connection"]),
    ],
)
def test_aiohttp_client_parts_the_upstream_client_calls(
    internal: str, function: Callable[..., Any], expected: list[str]
) -> None:
    missing = [name for name in expected if name not in parameters(function)]
    relied_on(internal, UPSTREAM, not missing, f"no parameter {missing}")


def test_the_upstream_client_makes_a_round_trip_with_aiohttps_parts() -> None:
    async def run(url: str) -> tuple[int, bytes]:
        client = UpstreamClient(connect_timeout=5)
        await client.start()
        try:
            body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hop"}]}'
            target = client.url(url + "/v1/chat/completions", "")
            headers = [("content-type", "application/json")]
            response = await client.send("POST", target, headers, body)
            try:
                return response.status, await response.read()
            finally:
                response.release()
        finally:
            await client.close()

    with DemoProvider() as demo:
        status, body = asyncio.run(run(demo.url))
    relied_on("aiohttp's client parts, driven by hand", UPSTREAM, status == 200, f"HTTP {status}")
    assert b"Echo: hop" in body


def test_sqlite_utils_migrations_list() -> None:
    internal = "sqlite-utils Migrations._migrations"
    user = "opulon/storage.py (Store.unknown_migrations)"
    relied_on(internal, user, isinstance(getattr(migrations, "_migrations", None), list))
    registered = [m.name for m in migrations._migrations]
    public = [m.name for m in migrations.pending(Database(memory=True))]
    relied_on(
        internal, user, bool(registered) and registered == public, f"{registered} != {public}"
    )
