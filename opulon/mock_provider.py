"""A mock AI model provider that speaks enough of the OpenAI and Anthropic HTTP APIs.

It is a real HTTP server (``aiohttp.web``) used by the gateway's tests, ``opulon demo`` and the
benchmarks. The official ``openai`` and ``anthropic`` SDKs parse its answers, streaming or not.

Endpoints (the SDK base URL is ``<url>/v1`` for OpenAI and ``<url>`` for Anthropic):

* OpenAI: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
  ``POST /v1/responses``, ``GET /v1/models`` and ``GET /v1/models/{id}``.
* Anthropic: ``POST /v1/messages``, ``POST /v1/messages/count_tokens``, and ``GET /v1/models``
  when the request carries an ``anthropic-version`` header.
* Any other path under ``/v1/``: the whole body is read and ``{"object": "mock", "path": ...,
  "bytes_received": N}`` is returned, without usage.
* ``GET /_mock/stats`` and ``POST /_mock/reset``: request counters (never headers or content).

The answer is :attr:`MockConfig.reply` when set, else ``"Echo: "`` followed by the text of the
last user message, cut to 200 characters. It is split into ``chunks`` equal, non-empty slices
(padded with spaces when shorter than ``chunks``); the non-streaming answer is the same padded
text. Token counts are deterministic:

* input tokens = ``max(1, len(text) // 4)`` where ``text`` is every text piece of the request
  (system prompt or instructions first, then each message's text, tool results included) joined
  with ``"\\n"``; for embeddings given as token arrays, the number of tokens in them;
* output tokens = the number of stream content chunks: ``chunks`` for text answers, and
  ``min(chunks, len(arguments_json))`` for tool calls.

Fault switches live in :class:`MockConfig` (server wide), and override the configuration per
request in ``x-mock-*`` request headers or, for requests that come through the gateway (which
forwards only the headers the APIs need), in a ``"mock"`` object of a JSON body:
``{"mock": {"status": 500, "chunk-delay-ms": 40}}``. With ``record`` on, the mock keeps what it
received (method, path, headers, body) for tests to inspect.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import signal
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from aiohttp import web

__all__ = ["MockConfig", "MockProvider", "Received", "create_mock_app", "main", "run_mock_provider"]

_DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
)
_MAX_CHUNKS = 10_000
_ECHO_LIMIT = 200
_STALL_SECONDS = 300.0
_STALL_POLL_SECONDS = 0.05
_SHUTDOWN_TIMEOUT = 0.5
_START_TIMEOUT = 10.0
_FINGERPRINT = "fp_opulon_mock"
_MODEL_CREATED = 1_700_000_000
_FAST_MODEL = "mock-fast"
_FAST_PROMPT_TOKENS = 16
_FAST_REPLY = "This is a fixed reply from the Opulon mock provider."
_EMBEDDING_DIMENSIONS = 8
_CLIENT_MAX_SIZE = 256 * 1024 * 1024
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


@dataclass(frozen=True)
class MockConfig:
    """Server-wide behaviour of the mock provider.

    Every field except ``models``, ``api_key`` and ``fast`` can be overridden per request by an
    ``x-mock-*`` header: ``x-mock-latency-ms``, ``x-mock-chunk-delay-ms``, ``x-mock-chunks``,
    ``x-mock-status``, ``x-mock-disconnect-after``, ``x-mock-stall-after`` and ``x-mock-reply``.
    For the optional integer switches, a header value of ``none`` turns the switch off.

    Attributes:
        models: model ids listed by ``GET /v1/models``; other ids are accepted in requests too.
        api_key: when set, OpenAI endpoints require ``Authorization: Bearer <key>`` and Anthropic
            endpoints require ``x-api-key: <key>`` (or the bearer header, which recent Anthropic
            SDKs send instead).
        reply: fixed answer text; when unset the answer echoes the last user message.
        chunks: number of stream content chunks, which is also the output token count.
        latency_ms: wait before responding.
        chunk_delay_ms: wait between stream chunks.
        error_status: answer every request with this HTTP error status (400-599) and an error
            body in the called API's shape.
        disconnect_after: streams close the connection after this many content chunks, without
            the terminating events; a non-streaming request with ``0`` gets no response at all.
        stall_after: streams stop sending after this many content chunks and hang (up to 300 s,
            ended early when the client goes away); a non-streaming request with ``0`` hangs
            before the response headers.
        fast: answer ``POST /v1/chat/completions`` (non-streaming, no ``x-mock-*`` header) with a
            fixed, precomputed body whose model is ``mock-fast``; for benchmarks.
        record: keep the last requests received (see :meth:`MockProvider.received`).
    """

    models: tuple[str, ...] = _DEFAULT_MODELS
    api_key: str | None = None
    reply: str | None = None
    chunks: int = 20
    latency_ms: float = 0
    chunk_delay_ms: float = 0
    error_status: int | None = None
    disconnect_after: int | None = None
    stall_after: int | None = None
    fast: bool = False
    record: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.chunks <= _MAX_CHUNKS:
            raise ValueError(f"chunks must be between 1 and {_MAX_CHUNKS}")
        if self.latency_ms < 0 or self.chunk_delay_ms < 0:
            raise ValueError("latency_ms and chunk_delay_ms must not be negative")
        if self.error_status is not None and not 400 <= self.error_status <= 599:
            raise ValueError("error_status must be between 400 and 599")
        for name in ("disconnect_after", "stall_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")


# --------------------------------------------------------------------------------------------
# Shared state
# --------------------------------------------------------------------------------------------

_COUNTER_NAMES = (
    "requests_started",
    "requests_completed",
    "requests_cancelled",
    "requests_aborted",
    "auth_failures",
)


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the mock received it (kept when ``record`` is on)."""

    method: str
    raw_path: str  # as sent, query string included
    headers: tuple[tuple[str, str], ...]  # names lower-cased
    body: bytes


_RECORD_LIMIT = 1000


class _State:
    """Configuration and counters of one app; read from other threads by :class:`MockProvider`."""

    def __init__(self, config: MockConfig) -> None:
        self.counters: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)
        self.current: tuple[MockConfig, bytes] = (config, _fast_body(config))
        self.received: collections.deque[Received] = collections.deque(maxlen=_RECORD_LIMIT)

    def record(self, request: web.Request, body: bytes) -> None:
        if self.config.record:
            headers = tuple((name.lower(), value) for name, value in request.headers.items())
            self.received.append(Received(request.method, request.raw_path, headers, body))

    @property
    def config(self) -> MockConfig:
        return self.current[0]

    def set_config(self, config: MockConfig) -> None:
        # One tuple assignment, so a request never sees a config with another config's body.
        self.current = (config, _fast_body(config))

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def reset(self) -> None:
        for name in _COUNTER_NAMES:
            self.counters[name] = 0


_STATE: web.AppKey[_State] = web.AppKey("opulon_mock_state", _State)

_Api = Literal["openai", "anthropic"]


class _Aborted(Exception):
    """The mock closed the connection on purpose (disconnect or end of a stall)."""

    def __init__(self, response: web.StreamResponse | None = None) -> None:
        super().__init__("connection closed by the mock provider")
        self.response = response


class _BadRequest(Exception):
    """The request cannot be served; answered with 400 in the API's error shape."""


@dataclass(slots=True)
class _Call:
    """One request as the endpoint handlers see it."""

    request: web.Request
    config: MockConfig
    api: _Api
    body: Any
    bytes_received: int


_Handler = Callable[[_Call], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_dumps(payload).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


# What real providers add to every answer about the account and the server: a gateway must not
# pass these on to the holders of its keys.
_ACCOUNT_HEADERS: dict[_Api, dict[str, str]] = {
    "openai": {
        "openai-organization": "org-mockoperator",
        "openai-project": "proj_mockoperator",
        "openai-processing-ms": "3",
        "openai-version": "2020-10-01",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "set-cookie": "__cf_bm=mockcookie; path=/; HttpOnly",
        "cf-ray": "mock-ray",
    },
    "anthropic": {
        "anthropic-organization-id": "mock-operator-org",
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "3999",
        "set-cookie": "_cfuvid=mockcookie; path=/",
        "cf-ray": "mock-ray",
    },
}


def _request_id_headers(api: _Api) -> dict[str, str]:
    rid = "req_" + secrets.token_hex(12)
    ids = {"request-id": rid} if api == "anthropic" else {"x-request-id": rid}
    return {**_ACCOUNT_HEADERS[api], **ids}


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


@functools.lru_cache(maxsize=512)
def _split(answer: str, chunks: int) -> tuple[str, ...]:
    """Split ``answer`` into exactly ``chunks`` equal, non-empty slices (padding with spaces)."""
    if len(answer) < chunks:
        answer = answer.ljust(chunks)
    size = len(answer)
    return tuple(answer[i * size // chunks : (i + 1) * size // chunks] for i in range(chunks))


def _split_upto(text: str, chunks: int) -> tuple[str, ...]:
    """Split ``text`` into ``min(chunks, len(text))`` non-empty slices, without padding."""
    return _split(text, max(1, min(chunks, len(text))))


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type") == "tool_result":
                    parts.append(_text_of(part.get("content")))
        return "\n".join(p for p in parts if p)
    return ""


def _item_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "content" in item:
            return _text_of(item["content"])
        output = item.get("output")
        if isinstance(output, str):
            return output
    return ""


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _item_text(message)
    return _item_text(messages[-1]) if messages else ""


def _answer(config: MockConfig, user_text: str) -> str:
    if config.reply is not None:
        return config.reply
    return ("Echo: " + user_text)[:_ECHO_LIMIT]


def _joined(pieces: Sequence[str]) -> str:
    return "\n".join(p for p in pieces if p)


def _require(body: Any, field: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(field)
    if value is None:
        raise _BadRequest(f"Missing required parameter: '{field}'.")
    if not isinstance(value, kind):
        raise _BadRequest(f"Invalid type for '{field}'.")
    return value


def _model(body: Any) -> str:
    model = _require(body, "model", str)
    assert isinstance(model, str)
    return model


def _placeholder(schema: Any) -> Any:
    """A value that fits a JSON schema well enough for a mock tool call."""
    if not isinstance(schema, dict):
        return "mock"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {name: _placeholder(sub) for name, sub in props.items()}
    if kind == "array":
        return [_placeholder(schema.get("items"))]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "mock"


@functools.lru_cache(maxsize=4096)
def _embedding(text: str) -> tuple[float, ...]:
    """A deterministic unit vector of 8 float32-exact values."""
    digest = hashlib.blake2b(text.encode(), digest_size=2 * _EMBEDDING_DIMENSIONS).digest()
    raw = [int.from_bytes(digest[i : i + 2], "little") / 32767.5 - 1.0 for i in range(0, 16, 2)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    fmt = f"<{_EMBEDDING_DIMENSIONS}f"
    return struct.unpack(fmt, struct.pack(fmt, *(v / norm for v in raw)))


# SSE templates: a payload is serialised once with a sentinel, and each piece of the answer is
# then spliced in with one small json.dumps call.
_SENTINEL = "\x00opulon-piece\x00"
_SENTINEL_JSON = json.dumps(_SENTINEL)

_Template = tuple[bytes, bytes]


def _template(payload: Any, event: str | None = None) -> _Template:
    head, tail = _dumps(payload).split(_SENTINEL_JSON)
    prefix = f"event: {event}\ndata: " if event else "data: "
    return (prefix + head).encode(), (tail + "\n\n").encode()


def _fill(template: _Template, piece: str) -> bytes:
    return template[0] + json.dumps(piece).encode() + template[1]


def _sse(payload: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\ndata: " if event else "data: "
    return (prefix + _dumps(payload) + "\n\n").encode()


_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# Errors in each API's shape
# --------------------------------------------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Mock bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "permission_denied", "You are not allowed to do this."),
    404: ("invalid_request_error", "not_found", "The requested resource does not exist."),
    409: ("invalid_request_error", "conflict", "The request conflicts with another one."),
    413: ("invalid_request_error", "request_too_large", "The request is too large."),
    422: ("invalid_request_error", None, "The request could not be processed."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
    504: ("server_error", "timeout", "The server timed out."),
}

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Mock bad request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    500: ("api_error", "Internal server error."),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}


def _error_response(api: _Api, status: int, message: str | None = None) -> web.Response:
    headers = _request_id_headers(api)
    if status in (429, 503, 529):
        headers["retry-after"] = "1"
    if api == "anthropic":
        kind, default = _ANTHROPIC_ERRORS.get(
            status,
            ("api_error", "Internal server error.")
            if status >= 500
            else ("invalid_request_error", "Mock error."),
        )
        payload: dict[str, Any] = {
            "type": "error",
            "error": {"type": kind, "message": message or default},
            "request_id": headers["request-id"],
        }
    else:
        kind, code, default = _OPENAI_ERRORS.get(
            status,
            ("server_error", None, "Mock server error.")
            if status >= 500
            else ("invalid_request_error", None, "Mock error."),
        )
        payload = {
            "error": {"message": message or default, "type": kind, "param": None, "code": code}
        }
    return _json_response(payload, status=status, headers=headers)


# --------------------------------------------------------------------------------------------
# Per-request overrides
# --------------------------------------------------------------------------------------------


def _parse_float(header: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise _BadRequest(f"Invalid {header} header: expected a number >= 0.")
    return number


def _parse_chunks(header: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= _MAX_CHUNKS:
        raise _BadRequest(f"Invalid {header} header: expected an integer from 1 to {_MAX_CHUNKS}.")
    return number


def _parse_status(header: str, value: str) -> int | None:
    if value.strip().lower() in ("", "none"):
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 400 <= number <= 599:
        raise _BadRequest(f"Invalid {header} header: expected a status from 400 to 599.")
    return number


def _parse_count(header: str, value: str) -> int | None:
    if value.strip().lower() in ("", "none"):
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise _BadRequest(f"Invalid {header} header: expected an integer >= 0 or 'none'.")
    return number


def _parse_text(header: str, value: str) -> str:
    return value


_OVERRIDES: tuple[tuple[str, str, Callable[[str, str], Any]], ...] = (
    ("x-mock-latency-ms", "latency_ms", _parse_float),
    ("x-mock-chunk-delay-ms", "chunk_delay_ms", _parse_float),
    ("x-mock-chunks", "chunks", _parse_chunks),
    ("x-mock-status", "error_status", _parse_status),
    ("x-mock-disconnect-after", "disconnect_after", _parse_count),
    ("x-mock-stall-after", "stall_after", _parse_count),
    ("x-mock-reply", "reply", _parse_text),
)


def _has_overrides(headers: Mapping[str, str]) -> bool:
    return any(header in headers for header, _, _ in _OVERRIDES)


def _effective_config(config: MockConfig, headers: Mapping[str, str], body: Any) -> MockConfig:
    """The configuration for one request: headers first, then a JSON body's ``"mock"`` object."""
    in_body = body.get("mock") if isinstance(body, dict) else None
    if in_body is not None and not isinstance(in_body, dict):
        raise _BadRequest("'mock' must be an object of switches")
    changes: dict[str, Any] = {}
    for header, field, parse in _OVERRIDES:
        value = headers.get(header)
        if in_body is not None:
            given = in_body.get(header[len("x-mock-") :])
            if given is not None:
                value = given if isinstance(given, str) else json.dumps(given)
        if value is not None:
            changes[field] = parse(header, value)
    return dataclasses.replace(config, **changes) if changes else config


# --------------------------------------------------------------------------------------------
# Delivery: plain JSON, streams, stalls and disconnects
# --------------------------------------------------------------------------------------------


def _close(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


async def _stall(request: web.Request) -> NoReturn:
    """Send nothing until the client goes away or the stall limit is reached."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _STALL_SECONDS
    while (left := deadline - loop.time()) > 0:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away during a stall")
        await asyncio.sleep(min(_STALL_POLL_SECONDS, left))
    _close(request)
    raise _Aborted()


async def _deliver_json(call: _Call, payload: Any, headers: Mapping[str, str]) -> web.Response:
    if call.config.stall_after == 0:
        await _stall(call.request)
    if call.config.disconnect_after == 0:
        _close(call.request)
        raise _Aborted()
    return _json_response(payload, headers=headers)


async def _deliver_stream(
    call: _Call,
    head: Sequence[bytes],
    pieces: Sequence[bytes],
    tail: Sequence[bytes],
    headers: Mapping[str, str],
) -> web.StreamResponse:
    """Send ``head``, then each content piece (delays and faults apply), then ``tail``."""
    cfg = call.config
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **headers,
        }
    )
    await response.prepare(call.request)
    if cfg.chunk_delay_ms <= 0 and cfg.disconnect_after is None and cfg.stall_after is None:
        await response.write(b"".join((*head, *pieces, *tail)))
        await response.write_eof()
        return response
    delay = cfg.chunk_delay_ms / 1000
    await response.write(b"".join(head))
    for index in range(len(pieces) + 1):
        if cfg.disconnect_after is not None and index >= cfg.disconnect_after:
            _close(call.request)
            raise _Aborted(response)
        if cfg.stall_after is not None and index >= cfg.stall_after:
            await _stall(call.request)
        if index == len(pieces):
            break
        if delay and index:
            await asyncio.sleep(delay)
        await response.write(pieces[index])
    if delay:
        await asyncio.sleep(delay)
    await response.write(b"".join(tail))
    await response.write_eof()
    return response


# --------------------------------------------------------------------------------------------
# OpenAI endpoints
# --------------------------------------------------------------------------------------------


def _openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(body: Any) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _chat_tool(body: Any, messages: Sequence[Any]) -> tuple[str, str] | None:
    """The (name, arguments JSON) of the tool call to answer with, if any."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or body.get("tool_choice") == "none":
        return None
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "tool":
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")
    ]
    if not functions:
        return None
    chosen = functions[0]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        chosen = next((f for f in functions if f.get("name") == wanted), chosen)
    arguments = _placeholder(chosen.get("parameters") or {"type": "object"})
    return str(chosen["name"]), json.dumps(arguments)


async def _chat_completions(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body)
    messages = _require(body, "messages", list)
    cfg = call.config
    prompt_tokens = _tokens(_joined([_item_text(m) for m in messages if isinstance(m, dict)]))
    tool = _chat_tool(body, messages)
    name, arguments = tool or ("", "")
    call_id = "call_" + secrets.token_hex(12)
    if tool is not None:
        pieces = _split_upto(arguments, cfg.chunks)
        finish = "tool_calls"
    else:
        pieces = _split(_answer(cfg, _last_user_text(messages)), cfg.chunks)
        finish = "stop"
    completion_tokens = len(pieces)
    cid = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    headers = _request_id_headers("openai")
    if body.get("stream") is not True:
        message: dict[str, Any]
        if tool is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                ],
                "refusal": None,
                "annotations": [],
            }
        else:
            message = {
                "role": "assistant",
                "content": "".join(pieces),
                "refusal": None,
                "annotations": [],
            }
        payload = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": _openai_usage(prompt_tokens, completion_tokens),
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
        return await _deliver_json(call, payload, headers)

    include_usage = _include_usage(body)

    def chunk(delta: Any, finish_reason: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return obj

    if tool is not None:
        first = chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ],
                "refusal": None,
            }
        )
        template = _template(
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": _SENTINEL}}]})
        )
    else:
        first = chunk({"role": "assistant", "content": "", "refusal": None})
        template = _template(chunk({"content": _SENTINEL}))
    tail = [_sse(chunk({}, finish))]
    if include_usage:
        usage_chunk = chunk({})
        usage_chunk["choices"] = []
        usage_chunk["usage"] = _openai_usage(prompt_tokens, completion_tokens)
        tail.append(_sse(usage_chunk))
    tail.append(_DONE)
    return await _deliver_stream(
        call, [_sse(first)], [_fill(template, p) for p in pieces], tail, headers
    )


async def _completions(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body)
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = [p for p in prompt if isinstance(p, str)]
    else:
        raise _BadRequest("Invalid type for 'prompt'.")
    cfg = call.config
    prompt_tokens = _tokens(_joined(prompts))
    pieces = _split(_answer(cfg, prompts[-1] if prompts else ""), cfg.chunks)
    cid = "cmpl-" + secrets.token_hex(12)
    created = int(time.time())
    headers = _request_id_headers("openai")
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(pieces),
        "total_tokens": prompt_tokens + len(pieces),
    }
    if body.get("stream") is not True:
        payload = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [
                {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        return await _deliver_json(call, payload, headers)

    include_usage = _include_usage(body)

    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return obj

    template = _template(chunk(_SENTINEL))
    tail = [_sse(chunk("", "stop"))]
    if include_usage:
        usage_chunk = chunk("")
        usage_chunk["choices"] = []
        usage_chunk["usage"] = usage
        tail.append(_sse(usage_chunk))
    tail.append(_DONE)
    return await _deliver_stream(call, [], [_fill(template, p) for p in pieces], tail, headers)


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


async def _embeddings(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body)
    raw = body.get("input")
    inputs: list[Any]
    if isinstance(raw, str) or _is_token_array(raw):
        inputs = [raw]
    elif (
        isinstance(raw, list) and raw and all(isinstance(v, str) or _is_token_array(v) for v in raw)
    ):
        inputs = raw
    else:
        raise _BadRequest("'input' must be a string, a list of strings or token arrays.")
    texts = [v for v in inputs if isinstance(v, str)]
    token_arrays = [v for v in inputs if not isinstance(v, str)]
    prompt_tokens = sum(len(v) for v in token_arrays)
    if texts or not token_arrays:
        prompt_tokens += _tokens(_joined(texts))
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, value in enumerate(inputs):
        vector = _embedding(value if isinstance(value, str) else ",".join(map(str, value)))
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if as_base64
            else list(vector)
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    payload = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return await _deliver_json(call, payload, _request_id_headers("openai"))


def _response_object(
    rid: str,
    created: int,
    model: str,
    body: Any,
    status: str,
    output: list[Any],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


async def _responses(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        texts, user_text = [raw], raw
    elif isinstance(raw, list):
        texts = [_item_text(item) for item in raw]
        user_text = _last_user_text(raw)
    else:
        raise _BadRequest("Missing required parameter: 'input'.")
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.insert(0, instructions)
    cfg = call.config
    input_tokens = _tokens(_joined(texts))
    pieces = _split(_answer(cfg, user_text), cfg.chunks)
    text = "".join(pieces)
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(pieces),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + len(pieces),
    }
    rid = "resp_" + secrets.token_hex(24)
    item_id = "msg_" + secrets.token_hex(24)
    created = int(time.time())
    headers = _request_id_headers("openai")
    part_done = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item_done = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "content": [part_done],
        "role": "assistant",
    }
    if body.get("stream") is not True:
        payload = _response_object(rid, created, model, body, "completed", [item_done], usage)
        return await _deliver_json(call, payload, headers)

    seq = 0

    def event(name: str, **fields: Any) -> bytes:
        nonlocal seq
        data = _sse({"type": name, "sequence_number": seq, **fields}, name)
        seq += 1
        return data

    pending = _response_object(rid, created, model, body, "in_progress", [], None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    head = [
        event("response.created", response=pending),
        event("response.in_progress", response=pending),
        event(
            "response.output_item.added",
            output_index=0,
            item={**item_done, "status": "in_progress", "content": []},
        ),
        event(
            "response.content_part.added",
            **where,
            part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
        ),
    ]
    deltas = [
        event("response.output_text.delta", **where, delta=piece, logprobs=[]) for piece in pieces
    ]
    done = _response_object(rid, created, model, body, "completed", [item_done], usage)
    tail = [
        event("response.output_text.done", **where, text=text, logprobs=[]),
        event("response.content_part.done", **where, part=part_done),
        event("response.output_item.done", output_index=0, item=item_done),
        event("response.completed", response=done),
    ]
    return await _deliver_stream(call, head, deltas, tail, headers)


def _openai_model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _MODEL_CREATED, "owned_by": "opulon-mock"}


def _anthropic_model(model_id: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "2024-10-22T00:00:00Z",
    }


async def _models(call: _Call) -> web.StreamResponse:
    models = call.config.models
    if call.api == "anthropic":
        payload: dict[str, Any] = {
            "data": [_anthropic_model(m) for m in models],
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
    else:
        payload = {"object": "list", "data": [_openai_model(m) for m in models]}
    return await _deliver_json(call, payload, _request_id_headers(call.api))


async def _model_detail(call: _Call) -> web.StreamResponse:
    model_id = call.request.match_info["model"]
    if model_id not in call.config.models:
        return _error_response(call.api, 404, f"The model '{model_id}' does not exist.")
    payload = _anthropic_model(model_id) if call.api == "anthropic" else _openai_model(model_id)
    return await _deliver_json(call, payload, _request_id_headers(call.api))


# --------------------------------------------------------------------------------------------
# Anthropic endpoints
# --------------------------------------------------------------------------------------------


def _anthropic_input_tokens(body: Any) -> tuple[list[Any], int]:
    messages = _require(body, "messages", list)
    texts = [_text_of(body.get("system"))]
    texts.extend(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    return messages, _tokens(_joined(texts))


def _anthropic_tool(body: Any, messages: Sequence[Any]) -> tuple[str, str] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return None
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    last = messages[-1] if messages else None
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    ):
        return None
    custom = [t for t in tools if isinstance(t, dict) and t.get("name") and "input_schema" in t]
    if not custom:
        return None
    chosen = custom[0]
    if isinstance(choice, dict) and choice.get("type") == "tool":
        chosen = next((t for t in custom if t.get("name") == choice.get("name")), chosen)
    return str(chosen["name"]), json.dumps(_placeholder(chosen.get("input_schema")))


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


async def _messages(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body)
    messages, input_tokens = _anthropic_input_tokens(body)
    cfg = call.config
    tool = _anthropic_tool(body, messages)
    block: dict[str, Any]
    if tool is not None:
        name, arguments = tool
        pieces = _split_upto(arguments, cfg.chunks)
        tool_id = "toolu_" + secrets.token_hex(12)
        block = {"type": "tool_use", "id": tool_id, "name": name, "input": json.loads(arguments)}
        stop_reason = "tool_use"
    else:
        pieces = _split(_answer(cfg, _last_user_text(messages)), cfg.chunks)
        block = {"type": "text", "text": "".join(pieces)}
        stop_reason = "end_turn"
    mid = "msg_" + secrets.token_hex(12)
    headers = _request_id_headers("anthropic")
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(input_tokens, len(pieces)),
    }
    if body.get("stream") is not True:
        return await _deliver_json(call, message, headers)

    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": _anthropic_usage(input_tokens, 1),
    }
    if tool is not None:
        empty_block: dict[str, Any] = {**block, "input": {}}
        delta: dict[str, Any] = {"type": "input_json_delta", "partial_json": _SENTINEL}
    else:
        empty_block = {"type": "text", "text": ""}
        delta = {"type": "text_delta", "text": _SENTINEL}
    head = [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": empty_block},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    template = _template(
        {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
    )
    tail = [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return await _deliver_stream(call, head, [_fill(template, p) for p in pieces], tail, headers)


async def _count_tokens(call: _Call) -> web.StreamResponse:
    _model(call.body)
    _, input_tokens = _anthropic_input_tokens(call.body)
    return await _deliver_json(
        call, {"input_tokens": input_tokens}, _request_id_headers("anthropic")
    )


# --------------------------------------------------------------------------------------------
# Anything else under /v1/
# --------------------------------------------------------------------------------------------


async def _other(call: _Call) -> web.StreamResponse:
    payload = {
        "object": "mock",
        "path": call.request.path,
        "raw_path": call.request.raw_path,  # as sent, query string included
        "bytes_received": call.bytes_received,
    }
    return await _deliver_json(call, payload, _request_id_headers(call.api))


# --------------------------------------------------------------------------------------------
# The request pipeline shared by every /v1 endpoint
# --------------------------------------------------------------------------------------------


def _authorized(api: _Api, headers: Mapping[str, str], key: str) -> bool:
    """OpenAI style: ``Authorization: Bearer``; Anthropic style: ``x-api-key`` or a bearer token.

    Recent Anthropic SDKs send the API key as a bearer token, so both are accepted there.
    """
    expected = key.encode()
    if api == "anthropic":
        given = headers.get("x-api-key")
        if given is not None and hmac.compare_digest(given.strip().encode(), expected):
            return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


async def _drain(request: web.Request, state: _State) -> int:
    received = 0
    kept: list[bytes] = []
    async for chunk in request.content.iter_chunked(64 * 1024):
        received += len(chunk)
        if state.config.record:
            kept.append(chunk)
    state.record(request, b"".join(kept))
    return received


async def _serve(
    request: web.Request, state: _State, api: _Api, handler: _Handler, json_body: bool
) -> web.StreamResponse:
    config = state.config
    if config.api_key is not None and not _authorized(api, request.headers, config.api_key):
        state.counters["auth_failures"] += 1
        await _drain(request, state)
        _, _, token = request.headers.get("authorization", "").partition(" ")
        given = (request.headers.get("x-api-key") or token).strip()
        # As OpenAI does: the refused key's first characters echoed back.
        message = (
            "invalid x-api-key"
            if api == "anthropic"
            else f"Incorrect API key provided: {given[:8]}****. You can find your API key in "
            "your dashboard."
        )
        return _error_response(api, 401, message)
    try:
        body: Any = None
        if json_body:
            raw = await request.read()
            state.record(request, raw)
            received = len(raw)
            try:
                body = json.loads(raw)
            except ValueError:
                raise _BadRequest("The request body is not valid JSON.") from None
            if not isinstance(body, dict):
                raise _BadRequest("The request body must be a JSON object.")
        else:
            received = await _drain(request, state)
        cfg = _effective_config(config, request.headers, body)
        if cfg.latency_ms > 0:
            await asyncio.sleep(cfg.latency_ms / 1000)
        if cfg.error_status is not None:
            return _error_response(api, cfg.error_status)
        return await handler(_Call(request, cfg, api, body, received))
    except _BadRequest as exc:
        return _error_response(api, 400, str(exc))


def _endpoint(
    api: _Api | None, handler: _Handler, *, json_body: bool = True
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap ``handler`` with auth, overrides, latency, error switch and the counters.

    ``api=None`` picks the Anthropic shape when the request has an ``anthropic-version``
    header, and the OpenAI shape otherwise.
    """

    async def endpoint(request: web.Request) -> web.StreamResponse:
        state = request.app[_STATE]
        counters = state.counters
        counters["requests_started"] += 1
        shape: _Api = api or ("anthropic" if "anthropic-version" in request.headers else "openai")
        try:
            response = await _serve(request, state, shape, handler, json_body)
        except asyncio.CancelledError:
            counters["requests_cancelled"] += 1
            raise
        except ConnectionError:
            counters["requests_cancelled"] += 1
            return web.Response()
        except _Aborted as exc:
            counters["requests_aborted"] += 1
            return exc.response or web.Response()
        counters["requests_completed"] += 1
        return response

    return endpoint


def _fast_body(config: MockConfig) -> bytes:
    pieces = _split(config.reply if config.reply is not None else _FAST_REPLY, config.chunks)
    payload = {
        "id": "chatcmpl-opulonmockfast",
        "object": "chat.completion",
        "created": _MODEL_CREATED,
        "model": _FAST_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(pieces),
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _openai_usage(_FAST_PROMPT_TOKENS, len(pieces)),
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
    }
    return _dumps(payload).encode()


_chat_endpoint = _endpoint("openai", _chat_completions)


async def _chat_entry(request: web.Request) -> web.StreamResponse:
    """Chat completions, with the precomputed answer when ``fast`` is on."""
    state = request.app[_STATE]
    config, fast_body = state.current
    if not config.fast or config.record or _has_overrides(request.headers):
        return await _chat_endpoint(request)
    raw = await request.read()
    if _STREAM_TRUE.search(raw) or b'"mock"' in raw:
        return await _chat_endpoint(request)
    counters = state.counters
    counters["requests_started"] += 1
    if config.api_key is not None and not _authorized("openai", request.headers, config.api_key):
        counters["auth_failures"] += 1
        counters["requests_completed"] += 1
        return _error_response("openai", 401, "Incorrect API key provided.")
    try:
        if config.latency_ms > 0:
            await asyncio.sleep(config.latency_ms / 1000)
    except asyncio.CancelledError:
        counters["requests_cancelled"] += 1
        raise
    if config.error_status is not None:
        counters["requests_completed"] += 1
        return _error_response("openai", config.error_status)
    counters["requests_completed"] += 1
    return web.Response(body=fast_body, content_type="application/json")


async def _stats(request: web.Request) -> web.Response:
    return _json_response(request.app[_STATE].stats())


async def _reset(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.reset()
    return _json_response(state.stats())


def create_mock_app(config: MockConfig = MockConfig()) -> web.Application:
    """Build the mock provider's aiohttp application for ``config``.

    Serve it with ``handler_cancellation=True`` and ``access_log=None`` (as :class:`MockProvider`
    and :func:`run_mock_provider` do) so that a client going away cancels its handler at once.
    """
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[_STATE] = _State(config)
    router = app.router
    router.add_post("/v1/chat/completions", _chat_entry)
    router.add_post("/v1/completions", _endpoint("openai", _completions))
    router.add_post("/v1/embeddings", _endpoint("openai", _embeddings))
    router.add_post("/v1/responses", _endpoint("openai", _responses))
    router.add_post("/v1/messages", _endpoint("anthropic", _messages))
    router.add_post("/v1/messages/count_tokens", _endpoint("anthropic", _count_tokens))
    router.add_get("/v1/models", _endpoint(None, _models, json_body=False))
    router.add_get("/v1/models/{model}", _endpoint(None, _model_detail, json_body=False))
    router.add_get("/_mock/stats", _stats)
    router.add_post("/_mock/reset", _reset)
    router.add_route("*", "/v1/{tail:.*}", _endpoint(None, _other, json_body=False))
    return app


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the mock provider only listens on loopback addresses, not {host!r}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start_runner(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound


class MockProvider:
    """Runs the mock in a background thread with its own event loop; context manager.

    ``with MockProvider(MockConfig(api_key="k")) as mock: ...`` serves on a free loopback port;
    :attr:`url` is the server root (append ``/v1`` for the OpenAI SDK's ``base_url``).
    """

    def __init__(
        self, config: MockConfig = MockConfig(), host: str = "127.0.0.1", port: int = 0
    ) -> None:
        _check_loopback(host)
        self._host = host
        self._port = port
        self._app = create_mock_app(config)
        self._state = self._app[_STATE]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    def start(self) -> MockProvider:
        """Bind (port 0 picks a free port) and return once the server is listening."""
        if self._thread is not None:
            raise RuntimeError("the mock provider is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                runner, self._bound_port = loop.run_until_complete(
                    _start_runner(self._app, self._host, self._port)
                )
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())
                _cancel_remaining(loop)
                loop.close()

        thread = threading.Thread(target=run, name="opulon-mock-provider", daemon=True)
        thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError("the mock provider did not start in time")
        if failure:
            thread.join(_START_TIMEOUT)
            raise failure[0]
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop serving, end open connections and join the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT)
        self._loop = self._thread = None
        self._bound_port = None

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:54321`` (without ``/v1``)."""
        if self._bound_port is None:
            raise RuntimeError("the mock provider is not running")
        return _url(self._host, self._bound_port)

    @property
    def config(self) -> MockConfig:
        """The server-wide configuration; assign a new one to change it while running."""
        return self._state.config

    @config.setter
    def config(self, config: MockConfig) -> None:
        self._state.set_config(config)

    def stats(self) -> dict[str, int]:
        """A copy of the request counters (the same as ``GET /_mock/stats``)."""
        return self._state.stats()

    def reset_stats(self) -> None:
        """Set every counter back to zero."""
        self._state.reset()

    def received(self) -> list[Received]:
        """The requests received so far (the last 1,000), when ``record`` is on."""
        return list(self._state.received)

    def __enter__(self) -> MockProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def run_mock_provider(config: MockConfig, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve in the foreground until interrupted (used by a CLI command and benchmarks).

    Prints one line with the URL; stops cleanly on Ctrl-C or SIGTERM.
    """
    _check_loopback(host)

    async def serve() -> None:
        runner, bound = await _start_runner(create_mock_app(config), host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            print(f"Opulon mock provider listening on {_url(host, bound)}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m opulon.mock_provider --port 8001``."""
    parser = argparse.ArgumentParser(
        prog="python -m opulon.mock_provider",
        description="Serve a mock OpenAI/Anthropic provider on a loopback address.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=8001, help="port (0 picks a free one)")
    parser.add_argument("--fast", action="store_true", help="precomputed chat completions")
    parser.add_argument("--api-key", default=None, help="require this API key")
    parser.add_argument("--chunks", type=int, default=20, help="stream chunks per answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0, help="delay between chunks")
    parser.add_argument("--latency-ms", type=float, default=0, help="delay before responding")
    parser.add_argument("--reply", default=None, help="fixed answer instead of the echo")
    args = parser.parse_args(argv)
    try:
        config = MockConfig(
            api_key=args.api_key,
            reply=args.reply,
            chunks=args.chunks,
            latency_ms=args.latency_ms,
            chunk_delay_ms=args.chunk_delay_ms,
            fast=args.fast,
        )
        _check_loopback(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    run_mock_provider(config, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
