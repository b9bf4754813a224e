"""The proxy for ``/v1/...``: authenticate, admit, forward, stream back, settle, record.

A raw ASGI application: the hot path of the gateway carries no framework layers it does not
use. Request and response bodies live in memory only while in transit; nothing here writes
them anywhere, logs them or puts them in an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from opulon.gateway.errors import ANTHROPIC, OPENAI, error_body, stream_error_event
from opulon.gateway.request_log import RequestLog
from opulon.gateway.upstream import UpstreamClient
from opulon.keys import KeyRecord, Refusal
from opulon.limiter import Refusal as LimitRefusal
from opulon.limiter import Usage
from opulon.providers import Provider
from opulon.runtime import Runtime
from opulon.usage import UsageRow
from opulon.usage_extract import (
    Endpoint,
    StreamUsage,
    TokenCount,
    estimate_input_tokens,
    requested_output_tokens,
    usage_from_body,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("opulon.gateway")

# Requests whose JSON body the gateway reads: it needs the model, and for some the stream flag.
JSON_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
}
_GENERATING: frozenset[Endpoint] = frozenset({"chat", "completions", "responses", "messages"})

# Never forwarded upstream: our own credentials, hop-by-hop headers, and anything naming the
# client's address.
_DROP_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"authorization",
        b"x-api-key",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"accept-encoding",
        b"expect",
        b"cookie",
        b"forwarded",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
    }
)
# Never passed back: hop-by-hop headers, lengths and encodings we recompute, the provider's
# own rate limits (the key's limits replace them) and cookies.
_DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"content-encoding",
        b"set-cookie",
        b"server",
        b"date",
        b"alt-svc",
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
        b"x-ratelimit-reset-requests",
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    }
)
_json = msgspec.json.Decoder()
_BOM = b"\xef\xbb\xbf"
_NO_MODEL = "-"
_ANTHROPIC_VERSION = "2023-06-01"
_MODELS_CACHE_SECONDS = 60.0
_WATCH_AFTER = 0.05  # seconds a request is in flight before a disconnect watcher starts
_SWEEP_EVERY = 0.025  # seconds between two looks at the requests in flight


class _ClientGone(Exception):
    """The client disconnected before the response was complete."""


class _TooLarge(Exception):
    """The request body is larger than the configured limit."""


@dataclass(slots=True)
class _Outcome:
    """What happened to one forwarded request, for the usage row and the settlement."""

    status: int = 0
    tokens: TokenCount | None = None


def _json_response_start(status: int, extra: list[tuple[bytes, bytes]] | None = None) -> Message:
    headers = [(b"content-type", b"application/json")]
    if extra:
        headers.extend(extra)
    return {"type": "http.response.start", "status": status, "headers": headers}


class Proxy:
    """ASGI app for every ``/v1/...`` path."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.upstream = UpstreamClient(runtime.gateway.connect_timeout)
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self._flights: set[_Flight] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._models_cache: dict[str, tuple[float, list[str]]] = {}
        self.request_log = RequestLog() if runtime.gateway.log_requests else None

    async def start(self) -> None:
        """Open the upstream connection pool and watch requests (inside the running loop)."""
        self.loop = asyncio.get_running_loop()
        await self.upstream.start()
        self._sweeper = self.loop.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.upstream.close()

    # -- the request ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        ts = time.time()
        path: str = scope["path"]
        method: str = scope["method"]
        flavor = ANTHROPIC if path.startswith("/v1/messages") else OPENAI
        raw_key: bytes | None = None
        content_length: int | None = None
        content_type = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                if value[:7].lower() == b"bearer ":
                    raw_key = value[7:].strip()
            elif name == b"x-api-key":
                raw_key = raw_key or value.strip()
            elif name == b"content-length":
                with contextlib.suppress(ValueError):
                    content_length = int(value)
            elif name == b"content-type":
                content_type = value
            elif name == b"anthropic-version":
                flavor = ANTHROPIC

        # Known so far, for the log line of a refusal: never the key itself.
        prefix = "-"
        model = _NO_MODEL

        async def refuse(
            status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
        ) -> None:
            await send(_json_response_start(status, extra))
            await send({"type": "http.response.body", "body": error_body(flavor, status, message)})
            if self.request_log is not None:
                latency_ms = (time.perf_counter() - started) * 1000
                self.request_log.add(prefix, path, model, status, latency_ms, 0, 0)

        if not raw_key:
            await refuse(
                401, "missing API key: send it as 'Authorization: Bearer op-ul-...' or 'x-api-key'"
            )
            return
        key = self.runtime.authenticate(raw_key.decode("latin-1"))
        if isinstance(key, Refusal):
            await refuse(401, key.value)
            return
        prefix = key.prefix
        limit = self.runtime.gateway.max_body_bytes
        if content_length is not None and content_length > limit:
            await refuse(413, f"request body too large: at most {limit} bytes")
            return

        endpoint = JSON_ENDPOINTS.get(path) if method == "POST" else None
        body: bytes | None = None
        payload: dict[str, Any] | None = None
        if endpoint is not None or (
            method in ("POST", "PUT", "PATCH")
            and content_type.startswith(b"application/json")
            and content_length is not None
        ):
            try:
                body = await _read_body(receive, limit)
            except _TooLarge:
                await refuse(413, f"request body too large: at most {limit} bytes")
                return
            except _ClientGone:
                return
            try:
                parsed = _json.decode(body[3:] if body.startswith(_BOM) else body)
            except (ValueError, RecursionError):  # msgspec's errors and UnicodeDecodeError
                await refuse(400, "the request body is not valid JSON")
                return
            if not isinstance(parsed, dict):
                await refuse(400, "the request body must be a JSON object")
                return
            payload = parsed

        if payload is not None and "model" in payload:
            if not isinstance(payload["model"], str) or not payload["model"]:
                await refuse(400, "'model' must be a non-empty string")
                return
            model = payload["model"]
        elif endpoint is not None:
            await refuse(400, "the request names no 'model'")
            return

        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                await refuse(405, f"{method} is not allowed on {path}")
                return
            await self._models(key, path, flavor, send, refuse)
            return

        kind = ANTHROPIC if path.startswith("/v1/messages") else OPENAI
        if model != _NO_MODEL:
            if not key.allows_model(model):
                await refuse(403, f"this API key may not use the model {model!r}")
                return
            provider = self.runtime.providers.route(model, kind)
            if provider is None:
                await refuse(404, f"the model {model!r} is not served by this gateway")
                return
        else:
            provider = self.runtime.providers.first(kind)
            if provider is None:
                await refuse(404, f"no {kind} provider is configured for {path}")
                return

        if endpoint in _GENERATING and payload is not None:
            expected_out = requested_output_tokens(payload) or (
                self.runtime.gateway.default_output_tokens
            )
        else:
            expected_out = 0
        expected_in = estimate_input_tokens(body) if body and endpoint != "count_tokens" else 0
        ticket = self.runtime.limiter.admit(key.id, Usage(1, expected_in, expected_out))
        if isinstance(ticket, LimitRefusal):
            extra = self.runtime.limiter.rate_limit_headers(key.id, fresh=True)
            if ticket.retry_after is not None:
                extra = [
                    *extra,
                    (b"retry-after", str(max(1, int(ticket.retry_after + 0.999))).encode()),
                ]
            await refuse(429, ticket.message, extra)
            return

        outcome = _Outcome()
        try:
            await self._forward(
                scope,
                receive,
                send,
                key,
                provider,
                endpoint,
                body,
                payload,
                flavor,
                outcome,
                started,
            )
        finally:
            tokens = outcome.tokens or TokenCount()
            if (
                not tokens.reported
                and 200 <= outcome.status < 300
                and body
                and endpoint
                not in (
                    None,
                    "count_tokens",
                )
            ):
                # The upstream reported no input count: estimate it from the request size.
                tokens.input_tokens = tokens.input_tokens or estimate_input_tokens(body)
            actual = Usage(1, tokens.input_tokens, tokens.output_tokens)
            self.runtime.limiter.settle(ticket, actual)
            latency_ms = round((time.perf_counter() - started) * 1000, 3)
            self.runtime.record(
                UsageRow(
                    key.id,
                    key.prefix,
                    ts,
                    model,
                    outcome.status,
                    latency_ms,
                    tokens.input_tokens,
                    tokens.output_tokens,
                )
            )
            if self.request_log is not None:
                self.request_log.add(
                    key.prefix,
                    path,
                    model,
                    outcome.status,
                    latency_ms,
                    tokens.input_tokens,
                    tokens.output_tokens,
                )

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        key: KeyRecord,
        provider: Provider,
        endpoint: Endpoint | None,
        body: bytes | None,
        payload: dict[str, Any] | None,
        flavor: str,
        outcome: _Outcome,
        started: float,
    ) -> None:
        settings = self.runtime.gateway
        stream_requested = bool(payload and payload.get("stream") is True)
        strip_usage = False
        if stream_requested and endpoint in ("chat", "completions") and payload is not None:
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Ask the upstream for its usage chunk, and take it out again on the way back.
                payload["stream_options"] = {**(options or {}), "include_usage": True}
                body = msgspec.json.encode(payload)
                strip_usage = True

        headers: list[tuple[str, str]] = []
        has_version = False
        for name, value in scope["headers"]:
            if name in _DROP_REQUEST_HEADERS:
                continue
            if name == b"anthropic-version":
                has_version = True
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        headers.extend(provider.auth_headers())
        headers.append(("accept-encoding", "identity"))
        if provider.kind == ANTHROPIC and not has_version:
            headers.append(("anthropic-version", _ANTHROPIC_VERSION))

        data: bytes | AsyncIterator[bytes] | None
        body_done: asyncio.Event | None = None
        if body is not None:
            data = body
        else:
            body_done = asyncio.Event()
            data = _stream_body(receive, settings.max_body_bytes, body_done)
            for name, value in scope["headers"]:
                if name == b"content-length":
                    headers.append(("content-length", value.decode("latin-1")))
        query: bytes = scope.get("query_string", b"")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        url = self.upstream.url(
            provider.base_url, raw_path.decode("utf-8", "replace"), query.decode("utf-8", "replace")
        )
        idle_timeout = settings.stream_idle_timeout if stream_requested else settings.read_timeout

        task = asyncio.current_task(self.loop)
        assert task is not None
        flight = _Flight(task, receive, body_done, started, idle_timeout)
        self._flights.add(flight)
        response_started = False
        tracker: StreamUsage | None = None
        try:
            try:
                upstream = await self.upstream.send(scope["method"], url, headers, data)
                flight.progress += 1
                try:
                    out_headers = [
                        (lowered, value)
                        for name, value in upstream.raw_headers
                        if (lowered := name.lower()) not in _DROP_RESPONSE_HEADERS
                    ]
                    out_headers.extend(self.runtime.limiter.rate_limit_headers(key.id))
                    content_type = upstream.headers.get("content-type", "")
                    outcome.status = upstream.status
                    response_start: Message = {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": out_headers,
                    }
                    if content_type.startswith("text/event-stream"):
                        tracker = StreamUsage(endpoint or "other", strip_usage_chunk=strip_usage)
                        outcome.tokens = tracker.count
                        await send(response_start)
                        response_started = True
                        async for chunk in upstream.content.iter_any():
                            flight.progress += 1
                            out = tracker.feed(chunk)
                            outcome.tokens = tracker.count
                            if out:
                                await send(
                                    {"type": "http.response.body", "body": out, "more_body": True}
                                )
                        tail = tracker.flush()
                        outcome.tokens = tracker.count
                        await send({"type": "http.response.body", "body": tail, "more_body": False})
                    elif endpoint is not None:
                        content = await upstream.read()
                        out_headers.append((b"content-length", str(len(content)).encode()))
                        await send(response_start)
                        response_started = True
                        await send({"type": "http.response.body", "body": content})
                        # Read after the answer has gone: the client does not wait for it.
                        if upstream.status < 400:
                            outcome.tokens = usage_from_body(endpoint, content)
                            if not outcome.tokens.reported and endpoint != "count_tokens":
                                # No usage in the body: estimate output from its size.
                                outcome.tokens.output_tokens = len(content) // 4
                    else:
                        # Anything else (files, images, audio) streams through unread.
                        length = upstream.headers.get("content-length")
                        if length is not None:
                            out_headers.append((b"content-length", length.encode("latin-1")))
                        await send(response_start)
                        response_started = True
                        async for chunk in upstream.content.iter_any():
                            flight.progress += 1
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    upstream.release()
            except _TooLarge:
                outcome.status = 413
                if not response_started:
                    await _send_error(send, flavor, 413, "request body too large")
            except (TimeoutError, aiohttp.ServerTimeoutError):  # connecting took too long
                outcome.status = 504
                await _late(send, flavor, provider, tracker, response_started)
            except (aiohttp.ClientError, OSError) as exc:
                outcome.status = 502
                message = (
                    f"the provider {provider.name!r} could not be reached or failed mid-answer"
                )
                log.warning(
                    "%s upstream %s failed: %s", key.prefix, provider.name, type(exc).__name__
                )
                if response_started:
                    await _end_stream(send, tracker, stream_error_event(flavor, 502, message))
                else:
                    await _send_error(send, flavor, 502, message)
        except asyncio.CancelledError:
            if flight.gone:
                # The client went away: the upstream request was cancelled with this task.
                task.uncancel()
                outcome.status = 499
                if tracker is not None:
                    outcome.tokens = tracker.count
            elif flight.timed_out:
                # The upstream fell silent for longer than the timeout allows.
                task.uncancel()
                outcome.status = 504
                if tracker is not None:
                    outcome.tokens = tracker.count
                await _late(send, flavor, provider, tracker, response_started)
            else:
                raise
        finally:
            self._flights.discard(flight)
            watcher = flight.watcher
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        if flight.gone and outcome.status != 499:
            outcome.status = 499

    # -- in-flight requests --------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Watch every request in flight: one task for all, instead of timers per request.

        A request in flight for :data:`_WATCH_AFTER` gets a task that watches for its client
        leaving; one whose upstream has sent nothing for its timeout is cancelled as a 504.
        """
        while True:
            await asyncio.sleep(_SWEEP_EVERY)
            now = time.perf_counter()
            for flight in list(self._flights):
                if flight.watcher is None and now - flight.started >= _WATCH_AFTER:
                    flight.watcher = self.loop.create_task(_watch_disconnect(flight))
                uploading = flight.body_done is not None and not flight.body_done.is_set()
                if flight.progress != flight.seen or uploading:
                    flight.seen, flight.seen_at = flight.progress, now
                elif now - flight.seen_at > flight.timeout and not flight.timed_out:
                    flight.timed_out = True
                    flight.task.cancel()

    # -- /v1/models ----------------------------------------------------------------------------

    async def _models(
        self,
        key: KeyRecord,
        path: str,
        flavor: str,
        send: Send,
        refuse: Callable[[int, str], Awaitable[None]],
    ) -> None:
        models: dict[str, str] = {}
        for provider in self.runtime.providers.providers:
            for model_id in await self._provider_models(provider):
                if provider.serves(model_id) and key.allows_model(model_id):
                    models.setdefault(model_id, provider.name)
        wanted = path[len("/v1/models/") :] if path.startswith("/v1/models/") else None
        if wanted is not None:
            if wanted not in models:
                await refuse(404, f"the model {wanted!r} is not available to this API key")
                return
            models = {wanted: models[wanted]}
        if flavor == ANTHROPIC:
            items = [
                {"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
                for m in models
            ]
            document: dict[str, Any] = (
                items[0]
                if wanted
                else {
                    "data": items,
                    "has_more": False,
                    "first_id": items[0]["id"] if items else None,
                    "last_id": items[-1]["id"] if items else None,
                }
            )
        else:
            objects = [
                {"id": m, "object": "model", "created": 0, "owned_by": owner}
                for m, owner in models.items()
            ]
            document = objects[0] if wanted else {"object": "list", "data": objects}
        await send(_json_response_start(200))
        await send({"type": "http.response.body", "body": json.dumps(document).encode()})

    async def _provider_models(self, provider: Provider) -> list[str]:
        """A provider's model ids: its concrete patterns, plus its own list where it has one."""
        concrete = [p for p in provider.models if not any(ch in p for ch in "*?[")]
        if provider.models and len(concrete) == len(provider.models):
            return concrete
        cached = self._models_cache.get(provider.name)
        now = time.monotonic()
        if cached and now - cached[0] < _MODELS_CACHE_SECONDS:
            return cached[1]
        ids: list[str] = list(concrete)
        session = self.upstream.session
        assert session is not None
        headers = dict(provider.auth_headers())
        if provider.kind == ANTHROPIC:
            headers["anthropic-version"] = _ANTHROPIC_VERSION
        try:
            async with session.get(
                provider.base_url + "/v1/models",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as response:
                if response.status == 200:
                    listing = await response.json(content_type=None)
                    for item in listing.get("data", []):
                        if isinstance(item, dict) and isinstance(item.get("id"), str):
                            ids.append(item["id"])
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError):
            log.warning("could not list the models of provider %s", provider.name)
        ids = list(dict.fromkeys(ids))
        self._models_cache[provider.name] = (now, ids)
        return ids


async def _read_body(receive: Receive, limit: int) -> bytes:
    # The loop of _stream_body without an async generator: this one runs for every JSON request.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _stream_body(receive: Receive, limit: int, done: asyncio.Event) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk, straight to the upstream: never spooled."""
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                yield chunk
            if not message.get("more_body", False):
                return
    finally:
        done.set()


class _Flight:
    """A request between admission and its last byte, as the sweeper sees it."""

    __slots__ = (
        "body_done",
        "gone",
        "progress",
        "receive",
        "seen",
        "seen_at",
        "started",
        "task",
        "timed_out",
        "timeout",
        "watcher",
    )

    def __init__(
        self,
        task: asyncio.Task[Any],
        receive: Receive,
        body_done: asyncio.Event | None,
        started: float,
        timeout: float,
    ) -> None:
        self.task = task
        self.receive = receive
        self.body_done = body_done  # set once a streamed request body has been read
        self.started = started
        self.timeout = timeout
        self.progress = 0  # bumped by every arrival from the upstream
        self.seen = 0
        self.seen_at = started
        self.watcher: asyncio.Task[None] | None = None
        self.gone = False
        self.timed_out = False


async def _watch_disconnect(flight: _Flight) -> None:
    if flight.body_done is not None:
        await flight.body_done.wait()
    while True:
        message = await flight.receive()
        if message["type"] == "http.disconnect":
            flight.gone = True
            flight.task.cancel()
            return


async def _late(
    send: Send, flavor: str, provider: Provider, tracker: StreamUsage | None, started: bool
) -> None:
    message = f"the provider {provider.name!r} did not answer in time"
    if started:
        await _end_stream(send, tracker, stream_error_event(flavor, 504, message))
    else:
        await _send_error(send, flavor, 504, message)


async def _send_error(send: Send, flavor: str, status: int, message: str) -> None:
    await send(_json_response_start(status))
    await send({"type": "http.response.body", "body": error_body(flavor, status, message)})


async def _end_stream(send: Send, tracker: StreamUsage | None, event: bytes) -> None:
    """Finish a stream the upstream broke off: what is held back, then an error event."""
    held = tracker.flush() if tracker is not None else b""
    await send({"type": "http.response.body", "body": held + event, "more_body": False})
