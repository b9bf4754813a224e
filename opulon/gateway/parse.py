"""Stage 1, parse: the request's headers, then (once routed) the body its route reads.

Headers are scanned once for what the later stages need: the key, the body's length and
type, and whether the client speaks the Anthropic API. A JSON body is decoded with msgspec;
a multipart body is read in memory only for its ``model`` field. Bodies are never written
anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from opulon.gateway.errors import ANTHROPIC
from opulon.gateway.exchange import Exchange, Receive, Refused, Scope, Send
from opulon.gateway.multipart_model import MultipartRefusal, form_model

_json = msgspec.json.Decoder()
_BOM = b"\xef\xbb\xbf"
_MAX_MODEL_LENGTH = 256


class ClientGone(Exception):
    """The client disconnected before the request was read."""


class TooLarge(Exception):
    """The request body is larger than the configured limit."""


def parse_head(scope: Scope, receive: Receive, send: Send, started: float, ts: float) -> Exchange:
    """The exchange of a new request, with what its headers say."""
    x = Exchange(scope, receive, send, started, ts)
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    x.raw_path = raw_path
    anthropic = raw_path.startswith(b"/v1/messages")
    raw_key: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if value[:7].lower() == b"bearer ":
                raw_key = value[7:].strip()
        elif name == b"x-api-key":
            raw_key = raw_key or value.strip()
        elif name == b"content-length":
            with contextlib.suppress(ValueError):
                x.content_length = int(value)
        elif name == b"content-type":
            x.content_type = value.lower()
            x.content_types += 1
        elif name == b"anthropic-version":
            anthropic = True
    x.raw_key = raw_key
    if anthropic:
        x.flavor = ANTHROPIC
    return x


def model_refusal(model: object) -> Refused | None:
    """Why ``model`` is not a model name the gateway routes by, or None."""
    if not isinstance(model, str) or not model:
        return Refused(400, "'model' must be a non-empty string")
    if len(model) > _MAX_MODEL_LENGTH:
        return Refused(400, f"'model' is longer than {_MAX_MODEL_LENGTH} characters")
    if not model.isprintable():
        return Refused(400, "'model' contains control characters")
    return None


async def read_request(x: Exchange, limit: int) -> Refused | None:
    """Read the body the route reads, its JSON object, and the model it names.

    Sets ``x.gone`` when the client went away. Bodies the gateway does not read (file
    uploads on a stateful route) are left to stream through.
    """
    route = x.route
    assert route is not None
    if route.body == "none":
        return None
    try:
        body = await _read_body(x.receive, limit)
    except TooLarge:
        return Refused(413, f"request body too large: at most {limit} bytes")
    except ClientGone:
        x.gone = True
        return None
    x.body = body
    if route.body == "multipart":
        try:
            model: object = form_model(x.content_type, body)
        except MultipartRefusal as exc:
            return Refused(400, str(exc))
    else:
        try:
            parsed = _json.decode(body[3:] if body.startswith(_BOM) else body)
        except (ValueError, RecursionError):  # msgspec's errors and UnicodeDecodeError
            return Refused(400, "the request body is not valid JSON")
        if not isinstance(parsed, dict):
            return Refused(400, "the request body must be a JSON object")
        x.payload = parsed
        model = parsed.get("model")
    if model is None:
        return Refused(400, "the request names no 'model'") if route.needs_model else None
    refusal = model_refusal(model)
    if refusal is None:
        assert isinstance(model, str)
        x.model = model
    return refusal


async def _read_body(receive: Receive, limit: int) -> bytes:
    # The loop of BodyStream.chunks without an async generator: this one runs for every JSON request.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise TooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodyStream:
    """The client's body, chunk by chunk, straight to the upstream: never spooled.

    The HTTP client wraps what the chunks raise in its own errors: :attr:`failure` keeps
    why the body ended early (:class:`TooLarge` or :class:`ClientGone`).
    """

    __slots__ = ("_limit", "_receive", "done", "failure")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.done = asyncio.Event()  # set once the body has been read, whole or not
        self.failure: TooLarge | ClientGone | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        size = 0
        try:
            while True:
                message: Any = await self._receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > self._limit:
                        raise TooLarge
                    yield chunk
                if not message.get("more_body", False):
                    return
        except (TooLarge, ClientGone) as exc:
            self.failure = exc
            raise
        finally:
            self.done.set()
