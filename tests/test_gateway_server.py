"""The uvicorn protocol of ``opulon serve``: a response's head goes out with its body."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from opulon.gateway.server import GatewayHttpProtocol

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
