"""The mock provider of the tests and the benchmark: the demo provider, with faults on demand.

It answers exactly as :mod:`opulon.demo_provider` does (the same endpoint handlers), and adds
what a test of the gateway needs from an upstream:

* fault switches in :class:`MockConfig` (server wide), overridden per request in ``x-mock-*``
  request headers or, for requests that come through the gateway (which forwards only the
  headers the APIs need), in a ``"mock"`` object of a JSON body:
  ``{"mock": {"status": 500, "chunk-delay-ms": 40}}``;
* the headers real providers add about the operator's account, which the gateway must not
  pass on;
* any other path under ``/v1/``: the whole body is read and ``{"object": "mock", "path": ...,
  "bytes_received": N}`` is returned, without usage;
* request counters (``GET /_mock/stats``, ``POST /_mock/reset``; never headers or content) and,
  with ``record`` on, what it received (method, path, headers, body) for tests to inspect;
* fast mode for the benchmark: a fixed, precomputed chat completion.

The benchmark runs it as a script: ``python tests/mock_provider.py --port 8001 --fast``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web

from opulon.demo_provider import (
    CLIENT_MAX_SIZE,
    FINGERPRINT,
    MAX_CHUNKS,
    MODEL_CREATED,
    ROUTES,
    Answer,
    Api,
    ApiError,
    Call,
    DemoConfig,
    JsonAnswer,
    LoopbackServer,
    Route,
    api_of,
    authorized,
    check_loopback,
    command_parser,
    deliver,
    error_response,
    json_response,
    openai_usage,
    prepare_stream,
    read_json,
    serve_in_foreground,
    split,
    unauthorized,
)

__all__ = ["MockConfig", "MockProvider", "Received", "create_mock_app", "main"]

_STALL_SECONDS = 300.0
_STALL_POLL_SECONDS = 0.05
_FAST_MODEL = "mock-fast"
_FAST_PROMPT_TOKENS = 16
_FAST_REPLY = "This is a fixed reply from the Opulon mock provider."
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_RECORD_LIMIT = 1000


@dataclass(frozen=True)
class MockConfig(DemoConfig):
    """Server-wide behaviour of the mock provider: the demo provider's, and the faults.

    Every field except ``models``, ``api_key``, ``fast`` and ``record`` can be overridden per
    request by an ``x-mock-*`` header: ``x-mock-latency-ms``, ``x-mock-chunk-delay-ms``,
    ``x-mock-chunks``, ``x-mock-status``, ``x-mock-disconnect-after``, ``x-mock-stall-after``
    and ``x-mock-reply``. For the optional integer switches, ``none`` turns the switch off.

    Attributes:
        latency_ms: wait before responding.
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

    latency_ms: float = 0
    error_status: int | None = None
    disconnect_after: int | None = None
    stall_after: int | None = None
    fast: bool = False
    record: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latency_ms < 0:
            raise ValueError("latency_ms must not be negative")
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


@dataclass(slots=True)
class _Call(Call):
    bytes_received: int = 0


class _Aborted(Exception):
    """The mock closed the connection on purpose (disconnect or end of a stall)."""

    def __init__(self, response: web.StreamResponse | None = None) -> None:
        super().__init__("connection closed by the mock provider")
        self.response = response


# --------------------------------------------------------------------------------------------
# What real providers add: account headers, and errors of every status
# --------------------------------------------------------------------------------------------

# What real providers add to every answer about the account and the server: a gateway must not
# pass these on to the holders of its keys.
_ACCOUNT_HEADERS: dict[Api, dict[str, str]] = {
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


def _error_response(api: Api, status: int, message: str | None = None) -> web.Response:
    headers = dict(_ACCOUNT_HEADERS[api])
    if status in (429, 503, 529):
        headers["retry-after"] = "1"
    if api == "anthropic":
        kind, default = _ANTHROPIC_ERRORS.get(
            status,
            ("api_error", "Internal server error.")
            if status >= 500
            else ("invalid_request_error", "Mock error."),
        )
        return error_response(api, status, message or default, kind=kind, headers=headers)
    kind, code, default_message = _OPENAI_ERRORS.get(
        status,
        ("server_error", None, "Mock server error.")
        if status >= 500
        else ("invalid_request_error", None, "Mock error."),
    )
    return error_response(
        api, status, message or default_message, kind=kind, code=code, headers=headers
    )


# --------------------------------------------------------------------------------------------
# Per-request overrides
# --------------------------------------------------------------------------------------------


def _parse_float(header: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ApiError(f"Invalid {header} header: expected a number >= 0.")
    return number


def _parse_chunks(header: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_CHUNKS:
        raise ApiError(f"Invalid {header} header: expected an integer from 1 to {MAX_CHUNKS}.")
    return number


def _parse_status(header: str, value: str) -> int | None:
    if value.strip().lower() in ("", "none"):
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 400 <= number <= 599:
        raise ApiError(f"Invalid {header} header: expected a status from 400 to 599.")
    return number


def _parse_count(header: str, value: str) -> int | None:
    if value.strip().lower() in ("", "none"):
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ApiError(f"Invalid {header} header: expected an integer >= 0 or 'none'.")
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
        raise ApiError("'mock' must be an object of switches")
    changes: dict[str, Any] = {}
    for header, name, parse in _OVERRIDES:
        value = headers.get(header)
        if in_body is not None:
            given = in_body.get(header[len("x-mock-") :])
            if given is not None:
                value = given if isinstance(given, str) else json.dumps(given)
        if value is not None:
            changes[name] = parse(header, value)
    return dataclasses.replace(config, **changes) if changes else config


# --------------------------------------------------------------------------------------------
# Delivery with faults: stalls and disconnects
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


async def _deliver(request: web.Request, cfg: MockConfig, answer: Answer) -> web.StreamResponse:
    if isinstance(answer, JsonAnswer):
        if cfg.stall_after == 0:
            await _stall(request)
        if cfg.disconnect_after == 0:
            _close(request)
            raise _Aborted()
        return await deliver(request, answer)
    if cfg.disconnect_after is None and cfg.stall_after is None:
        return await deliver(request, answer, cfg.chunk_delay_ms)
    response = await prepare_stream(request, answer.headers)
    delay = cfg.chunk_delay_ms / 1000
    pieces = answer.pieces
    await response.write(b"".join(answer.head))
    for index in range(len(pieces) + 1):
        if cfg.disconnect_after is not None and index >= cfg.disconnect_after:
            _close(request)
            raise _Aborted(response)
        if cfg.stall_after is not None and index >= cfg.stall_after:
            await _stall(request)
        if index == len(pieces):
            break
        if delay and index:
            await asyncio.sleep(delay)
        await response.write(pieces[index])
    if delay:
        await asyncio.sleep(delay)
    await response.write(b"".join(answer.tail))
    await response.write_eof()
    return response


# --------------------------------------------------------------------------------------------
# The request pipeline: counters, recording, auth, overrides, then the demo's handlers
# --------------------------------------------------------------------------------------------


def _other(call: Call) -> Answer:
    """Any other path under /v1/: what arrived, so that tests see what the gateway forwarded."""
    assert isinstance(call, _Call)
    request = call.request
    payload = {
        "object": "mock",
        "path": request.path,
        "raw_path": request.raw_path,  # as sent, query string included
        "bytes_received": call.bytes_received,
    }
    return JsonAnswer(payload, {})


async def _drain(request: web.Request, state: _State) -> int:
    received = 0
    kept: list[bytes] = []
    async for chunk in request.content.iter_chunked(64 * 1024):
        received += len(chunk)
        if state.config.record:
            kept.append(chunk)
    state.record(request, b"".join(kept))
    return received


async def _serve(request: web.Request, state: _State, route: Route) -> web.StreamResponse:
    config = state.config
    api = api_of(route, request)
    if config.api_key is not None and not authorized(api, request.headers, config.api_key):
        state.counters["auth_failures"] += 1
        await _drain(request, state)
        return unauthorized(api, request.headers, _ACCOUNT_HEADERS[api])
    try:
        body: Any = None
        if route.json_body:
            raw = await request.read()
            state.record(request, raw)
            received = len(raw)
            _, body = await read_json(request)  # the body read above, kept by aiohttp
        else:
            received = await _drain(request, state)
        cfg = _effective_config(config, request.headers, body)
        if cfg.latency_ms > 0:
            await asyncio.sleep(cfg.latency_ms / 1000)
        if cfg.error_status is not None:
            return _error_response(api, cfg.error_status)
        answer = route.handler(_Call(request, cfg, api, body, received))
    except ApiError as exc:
        return _error_response(api, exc.status, exc.message)
    answer.headers.update(_ACCOUNT_HEADERS[api])
    return await _deliver(request, cfg, answer)


def _served(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Serve ``route`` with auth, overrides, latency, the error switch and the counters."""

    async def serve(request: web.Request) -> web.StreamResponse:
        counters = request.app[_STATE].counters
        counters["requests_started"] += 1
        try:
            response = await _serve(request, request.app[_STATE], route)
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

    return serve


def _fast_body(config: MockConfig) -> bytes:
    pieces = split(config.reply if config.reply is not None else _FAST_REPLY, config.chunks)
    payload = {
        "id": "chatcmpl-opulonmockfast",
        "object": "chat.completion",
        "created": MODEL_CREATED,
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
        "usage": openai_usage(_FAST_PROMPT_TOKENS, len(pieces)),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def _fast_chat(
    chat: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Chat completions, with the precomputed answer when ``fast`` is on."""

    async def serve(request: web.Request) -> web.StreamResponse:
        state = request.app[_STATE]
        config, fast_body = state.current
        if not config.fast or config.record or _has_overrides(request.headers):
            return await chat(request)
        raw = await request.read()
        if _STREAM_TRUE.search(raw) or b'"mock"' in raw:
            return await chat(request)
        counters = state.counters
        counters["requests_started"] += 1
        if config.api_key is not None and not authorized("openai", request.headers, config.api_key):
            counters["auth_failures"] += 1
            counters["requests_completed"] += 1
            return unauthorized("openai", request.headers)
        try:
            if config.latency_ms > 0:
                await asyncio.sleep(config.latency_ms / 1000)
        except asyncio.CancelledError:
            counters["requests_cancelled"] += 1
            raise
        counters["requests_completed"] += 1
        if config.error_status is not None:
            return _error_response("openai", config.error_status)
        return web.Response(body=fast_body, content_type="application/json")

    return serve


async def _stats(request: web.Request) -> web.Response:
    return json_response(request.app[_STATE].stats())


async def _reset(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.reset()
    return json_response(state.stats())


_OTHER = Route("*", "/v1/{tail:.*}", None, _other, json_body=False)


def create_mock_app(config: MockConfig = MockConfig()) -> web.Application:
    """The mock provider's aiohttp application for ``config``."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[_STATE] = _State(config)
    for route in ROUTES:
        handler = _served(route)
        if route.path == "/v1/chat/completions":
            handler = _fast_chat(handler)
        app.router.add_route(route.method, route.path, handler)
    app.router.add_get("/_mock/stats", _stats)
    app.router.add_post("/_mock/reset", _reset)
    app.router.add_route(_OTHER.method, _OTHER.path, _served(_OTHER))
    return app


class MockProvider(LoopbackServer):
    """Runs the mock in a background thread with its own event loop; context manager.

    ``with MockProvider(MockConfig(api_key="k")) as mock: ...`` serves on a free loopback port;
    :attr:`url` is the server root (append ``/v1`` for the OpenAI SDK's ``base_url``).
    """

    def __init__(
        self, config: MockConfig = MockConfig(), host: str = "127.0.0.1", port: int = 0
    ) -> None:
        app = create_mock_app(config)
        super().__init__(app, host, port)
        self._state = app[_STATE]

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

    def received(self) -> list[Received]:
        """The requests received so far (the last 1,000), when ``record`` is on."""
        return list(self._state.received)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python tests/mock_provider.py --port 8001 --fast``."""
    parser = command_parser(
        "python tests/mock_provider.py",
        "Serve the tests' mock OpenAI/Anthropic provider on a loopback address.",
    )
    parser.add_argument("--fast", action="store_true", help="precomputed chat completions")
    parser.add_argument("--latency-ms", type=float, default=0, help="delay before responding")
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
        check_loopback(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    serve_in_foreground(create_mock_app(config), args.host, args.port, "Opulon mock provider")


if __name__ == "__main__":
    main()
