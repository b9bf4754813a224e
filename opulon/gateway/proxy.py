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
from urllib.parse import unquote

import aiohttp
import msgspec

from opulon.gateway import routes
from opulon.gateway.errors import ANTHROPIC, OPENAI, error_body, stream_error_event
from opulon.gateway.headers import request_headers, response_headers
from opulon.gateway.multipart_model import MultipartRefusal, form_model
from opulon.gateway.request_log import RequestLog
from opulon.gateway.routes import PathRefusal, Route
from opulon.gateway.stored_state import check_references, check_stored_state
from opulon.gateway.upstream import UpstreamClient
from opulon.keys import KeyRecord, Refusal, malformed_reason
from opulon.limiter import Refusal as LimitRefusal
from opulon.limiter import Usage
from opulon.providers import Provider
from opulon.runtime import Runtime
from opulon.usage import UsageRow
from opulon.usage_extract import (
    CHOICE_FIELDS,
    OUTPUT_CAP_FIELDS,
    StreamUsage,
    TokenCount,
    estimate_input_tokens,
    requested_choices,
    requested_output_tokens,
    usage_from_body,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("opulon.gateway")

_json = msgspec.json.Decoder()
_BOM = b"\xef\xbb\xbf"
_NO_MODEL = "-"
_MAX_MODEL_LENGTH = 256
_ANTHROPIC_VERSION = "2023-06-01"
_MODELS_CACHE_SECONDS = 60.0
_WATCH_AFTER = 0.05  # seconds a request is in flight before a disconnect watcher starts
_SWEEP_EVERY = 0.025  # seconds between two looks at the requests in flight
_RECHECK_EVERY = 0.01  # an unknown key looks for new keys in the store at most this often
# Where the gateway caps a generating request's output, for each API.
_OUTPUT_CAP_FIELDS: dict[str, str] = {
    "chat": "max_completion_tokens",
    "completions": "max_tokens",
    "responses": "max_output_tokens",
}
# Every output cap field of any API: malformed ones get 400 wherever they are sent.
_OUTPUT_LIMIT_FIELDS = tuple(dict.fromkeys(f for fs in OUTPUT_CAP_FIELDS.values() for f in fs))
_MAX_CHOICES = 128
_CREDENTIALS_REFUSED = "the gateway's credentials for this provider were refused"


@dataclass(frozen=True, slots=True)
class _Refused:
    """A request the gateway answers itself with an error, in the called API's shape."""

    status: int
    message: str
    code: str | None = None
    headers: list[tuple[bytes, bytes]] | None = None


class _ClientGone(Exception):
    """The client disconnected before the response was complete."""


class _TooLarge(Exception):
    """The request body is larger than the configured limit."""


@dataclass(slots=True)
class _Outcome:
    """What happened to one forwarded request, for the usage row and the settlement."""

    status: int = 0
    tokens: TokenCount | None = None
    answered: bool = False  # the upstream began a successful answer
    sent: bool = False  # the request went to the upstream


class _Hop:
    """One admitted request on its way to the provider."""

    __slots__ = ("flavor", "key", "path", "provider", "receive", "route", "scope", "send",
                 "started")  # fmt: skip

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        key: KeyRecord,
        provider: Provider,
        route: Route,
        path: str,  # the canonical path the upstream receives
        flavor: str,
        started: float,
    ) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.key, self.provider, self.route = key, provider, route
        self.path, self.flavor, self.started = path, flavor, started


def _model_refusal(model: object) -> _Refused | None:
    if not isinstance(model, str) or not model:
        return _Refused(400, "'model' must be a non-empty string")
    if len(model) > _MAX_MODEL_LENGTH:
        return _Refused(400, f"'model' is longer than {_MAX_MODEL_LENGTH} characters")
    if not model.isprintable():
        return _Refused(400, "'model' contains control characters")
    return None


async def _read_request(
    route: Route, receive: Receive, content_type: bytes, limit: int
) -> tuple[bytes | None, dict[str, Any] | None, str | None] | _Refused | None:
    """The body the route reads, its JSON object, and the model it names.

    None when the client went away. Bodies the gateway does not read (file uploads on a
    stateful route) are left to stream through.
    """
    if route.body == "none":
        return None, None, None
    try:
        body = await _read_body(receive, limit)
    except _TooLarge:
        return _Refused(413, f"request body too large: at most {limit} bytes")
    except _ClientGone:
        return None
    payload: dict[str, Any] | None = None
    if route.body == "multipart":
        try:
            model: object = form_model(content_type, body)
        except MultipartRefusal as exc:
            return _Refused(400, str(exc))
    else:
        try:
            parsed = _json.decode(body[3:] if body.startswith(_BOM) else body)
        except (ValueError, RecursionError):  # msgspec's errors and UnicodeDecodeError
            return _Refused(400, "the request body is not valid JSON")
        if not isinstance(parsed, dict):
            return _Refused(400, "the request body must be a JSON object")
        payload = parsed
        model = parsed.get("model")
    if model is None:
        if route.needs_model:
            return _Refused(400, "the request names no 'model'")
        return body, payload, None
    refusal = _model_refusal(model)
    if refusal is not None:
        return refusal
    assert isinstance(model, str)
    return body, payload, model


def _prepare_payload(
    route: Route, payload: dict[str, Any], body: bytes, provider: Provider
) -> tuple[bytes, bool] | _Refused:
    """The body as it goes upstream, and whether the usage chunk is to be taken out again.

    On the stateless routes that is always msgspec's encoding of the payload the gateway
    checked, never the client's bytes: duplicate keys, escapes and byte order marks read
    one way here and another at the provider are gone.
    """
    stateless = route.family is None
    if stateless:
        refusal, _ = check_stored_state(route.endpoint, payload, provider)
        if refusal is not None:
            return _Refused(400, refusal)
    for field in _OUTPUT_LIMIT_FIELDS:
        value = payload.get(field)
        if value is not None and (type(value) is not int or value < 1):
            return _Refused(400, f"'{field}' must be a positive integer")
    for field in CHOICE_FIELDS.get(route.endpoint, ()):
        value = payload.get(field)
        if value is not None and (type(value) is not int or not 1 <= value <= _MAX_CHOICES):
            return _Refused(400, f"'{field}' must be an integer from 1 to {_MAX_CHOICES}")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return _Refused(400, "'stream' must be true or false")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return _Refused(400, "'stream_options' must be an object")
    strip_usage = False
    if (
        stream
        and route.endpoint in ("chat", "completions")
        and not (options and options.get("include_usage") is True)
    ):
        # Ask the upstream for its usage chunk, and take it out again on the way back.
        payload["stream_options"] = {**(options or {}), "include_usage": True}
        strip_usage = True
    if stateless:
        body = msgspec.json.encode(payload)
        refusal = check_references(body, payload, provider)
        if refusal is not None:
            return _Refused(400, refusal)
    elif strip_usage:
        body = msgspec.json.encode(payload)
    return body, strip_usage


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
        self._recheck: asyncio.Task[None] | None = None
        self._rechecked_at = 0.0
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
        raw_path: bytes = scope.get("raw_path") or path.encode()
        anthropic_client = raw_path.startswith(b"/v1/messages")
        raw_key: bytes | None = None
        content_length: int | None = None
        content_type = b""
        content_types = 0
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
                content_type = value.lower()
                content_types += 1
            elif name == b"anthropic-version":
                anthropic_client = True
        flavor = ANTHROPIC if anthropic_client else OPENAI

        # Known so far, for the log line of a refusal: never the key itself, and the path only
        # once it is a route of the table (a client's own path could carry anything).
        prefix = "-"
        model = _NO_MODEL
        log_path = "-"

        async def refuse(refusal: _Refused) -> None:
            await _send_error(send, flavor, refusal)
            if self.request_log is not None:
                latency_ms = (time.perf_counter() - started) * 1000
                self.request_log.add(prefix, log_path, model, refusal.status, latency_ms, 0, 0)

        key = await self._authenticate(raw_key)
        if isinstance(key, _Refused):
            await refuse(key)
            return
        prefix = key.prefix
        if content_types > 1:
            # The gateway and the provider could read the body by different ones.
            await refuse(_Refused(400, "the request has more than one Content-Type header"))
            return
        wants_json = method in ("POST", "PUT", "PATCH") and content_type.startswith(
            b"application/json"
        )
        found = routes.match(method, raw_path, "json" if wants_json else "none")
        if isinstance(found, PathRefusal):
            code = "unknown_url" if found.status == 404 else None
            await refuse(_Refused(found.status, found.message, code))
            return
        route = found.route
        # A stateful family's path holds the client's object ids: the log names the family.
        log_path = found.path if route.family is None else f"/v1/({route.family})"
        if route.api != "either":
            flavor = route.api
        limit = self.runtime.gateway.max_body_bytes
        if content_length is not None and content_length > limit:
            await refuse(_Refused(413, f"request body too large: at most {limit} bytes"))
            return
        if route is routes.MODELS_ROUTE or route is routes.MODEL_ROUTE:
            await self._models(key, found.path, flavor, send, refuse)
            return

        request = await _read_request(route, receive, content_type, limit)
        if request is None:  # the client went away
            return
        if isinstance(request, _Refused):
            await refuse(request)
            return
        body, payload, named = request
        if named is not None:
            model = named
        kind = flavor if route.api == "either" else route.api
        provider = self._choose_provider(key, route, found.path, model, kind)
        if isinstance(provider, _Refused):
            await refuse(provider)
            return
        expected_in = (
            estimate_input_tokens(body)
            if body and route.body == "json" and route.endpoint != "count_tokens"
            else 0
        )
        if payload is not None and body is not None:
            prepared = _prepare_payload(route, payload, body, provider)
            if isinstance(prepared, _Refused):
                await refuse(prepared)
                return
            body, strip_usage = prepared
        else:
            strip_usage = False
        cap_field = None
        expected_out = 0
        choices = 1
        if route.generates and payload is not None:
            # Each of several answers (n, best_of) may use the whole output cap.
            choices = requested_choices(route.endpoint, payload)
            asked = requested_output_tokens(route.endpoint, payload)
            if asked is None:
                expected_out = self.runtime.gateway.default_output_tokens * choices
                cap_field = _OUTPUT_CAP_FIELDS.get(route.endpoint)
            else:
                expected_out = asked * choices
        ticket = self.runtime.limiter.admit(
            key.id, Usage(1, expected_in, expected_out), flexible_output=cap_field is not None
        )
        if isinstance(ticket, LimitRefusal):
            await refuse(self._limit_refusal(key, ticket, anthropic=route.api == ANTHROPIC))
            return
        if cap_field is not None and ticket.reserved.output_tokens < expected_out:
            # Less room than a default reservation: the answer may use what remains, no more.
            assert payload is not None
            payload[cap_field] = max(1, ticket.reserved.output_tokens // choices)
            body = msgspec.json.encode(payload)

        outcome = _Outcome()
        stream_requested = bool(payload and payload.get("stream") is True)
        try:
            await self._forward(
                _Hop(scope, receive, send, key, provider, route, found.path, flavor, started),
                body,
                stream_requested,
                strip_usage,
                outcome,
            )
        finally:
            tokens = outcome.tokens or TokenCount()
            if not tokens.reported:
                if outcome.status == 499 and outcome.sent:
                    # The client left after the provider had the request: it may bill all of
                    # it (hidden reasoning included), so the reservation is charged whole.
                    tokens.input_tokens = max(tokens.input_tokens, expected_in)
                    tokens.output_tokens = max(tokens.output_tokens, ticket.reserved.output_tokens)
                elif outcome.answered:
                    # A stream the upstream cut short, or an answer without usage (speech,
                    # images): charge at least the input that was reserved.
                    tokens.input_tokens = max(tokens.input_tokens, expected_in)
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
                    log_path,
                    model,
                    outcome.status,
                    latency_ms,
                    tokens.input_tokens,
                    tokens.output_tokens,
                )

    def _limit_refusal(self, key: KeyRecord, refusal: LimitRefusal, *, anthropic: bool) -> _Refused:
        if refusal.too_large:
            # Waiting never helps, so not 429: the SDKs would retry it.
            return _Refused(400, refusal.message, "request_exceeds_limit")
        extra = self.runtime.limiter.rate_limit_headers(key.id, fresh=True, anthropic=anthropic)
        if refusal.retry_after is not None:
            seconds = max(1, int(refusal.retry_after + 0.999))
            extra = [*extra, (b"retry-after", str(seconds).encode())]
        return _Refused(429, refusal.message, headers=extra)

    async def _authenticate(self, raw_key: bytes | None) -> KeyRecord | _Refused:
        if not raw_key:
            return _Refused(
                401, "missing API key: send it as 'Authorization: Bearer op-ul-...' or 'x-api-key'"
            )
        text = raw_key.decode("latin-1")
        key = self.runtime.authenticate(text)
        if key is Refusal.UNKNOWN:
            # Perhaps created a moment ago: look at the store's change counter once.
            await self._recheck_store()
            key = self.runtime.authenticate(text)
        if key is Refusal.MALFORMED:
            return _Refused(401, malformed_reason(text))
        if isinstance(key, Refusal):
            return _Refused(401, key.value)
        return key

    async def _recheck_store(self) -> None:
        """Wait for one look at the store's change counter made after this call.

        Requests with unknown keys share the look, and looks are at least
        :data:`_RECHECK_EVERY` apart: a flood of unknown keys costs at most a hundred cheap
        queries a second, and each of its requests waits a few milliseconds.
        """
        task = self._recheck
        if task is None:
            task = self._recheck = self.loop.create_task(self._recheck_once())
        await asyncio.shield(task)

    async def _recheck_once(self) -> None:
        try:
            wait = self._rechecked_at + _RECHECK_EVERY - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                self.runtime.reload()
            except Exception as exc:
                log.error("reloading the configuration failed: %s", type(exc).__name__)
        finally:
            self._rechecked_at = time.monotonic()
            self._recheck = None

    def _choose_provider(
        self, key: KeyRecord, route: Route, path: str, model: str, kind: str
    ) -> Provider | _Refused:
        named = model != _NO_MODEL
        if named and not key.allows_model(model):
            return _Refused(403, f"this API key may not use the model {model!r}")
        if route.family is not None:
            provider = next(
                (
                    p
                    for p in self.runtime.providers.providers
                    if p.kind == kind and p.allows(route.family) and (not named or p.serves(model))
                ),
                None,
            )
            if provider is None:
                return _Refused(404, f"{path} is not offered by this gateway", "unknown_url")
            return provider
        if not named:
            return _Refused(400, "the request names no 'model'")
        provider = self.runtime.providers.route(model, kind)
        if provider is None:
            return _Refused(404, f"the model {model!r} is not served by this gateway")
        return provider

    async def _forward(
        self,
        hop: _Hop,
        body: bytes | None,
        stream_requested: bool,
        strip_usage: bool,
        outcome: _Outcome,
    ) -> None:
        settings = self.runtime.gateway
        scope, provider, flavor = hop.scope, hop.provider, hop.flavor
        route = hop.route
        headers = request_headers(scope["headers"])
        if route.body == "json" and route.family is None:
            # The body is the gateway's own encoding of what it checked.
            headers = [(n, v) for n, v in headers if n != "content-type"]
            headers.append(("content-type", "application/json"))
        headers.extend(provider.auth_headers())
        headers.append(("accept-encoding", "identity"))
        if provider.kind == ANTHROPIC and not any(n == "anthropic-version" for n, _ in headers):
            headers.append(("anthropic-version", _ANTHROPIC_VERSION))

        data: bytes | AsyncIterator[bytes] | None
        body_done: asyncio.Event | None = None
        if body is not None:
            data = body
        else:
            body_done = asyncio.Event()
            data = _stream_body(hop.receive, settings.max_body_bytes, body_done)
            for name, value in scope["headers"]:
                if name == b"content-length":
                    headers.append(("content-length", value.decode("latin-1")))
        query: bytes = scope.get("query_string", b"")
        if query and route.family is None:
            query = _stateless_query(query)
        url = self.upstream.url(provider.url_for(hop.path), query.decode("latin-1"))
        idle_timeout = settings.stream_idle_timeout if stream_requested else settings.read_timeout

        task = asyncio.current_task(self.loop)
        assert task is not None
        flight = _Flight(task, hop.receive, body_done, hop.started, idle_timeout)
        self._flights.add(flight)
        send = hop.send
        response_started = False
        tracker: StreamUsage | None = None
        try:
            try:
                outcome.sent = True  # from here on the provider may be working on it
                upstream = await self.upstream.send(scope["method"], url, headers, data)
                flight.progress += 1
                try:
                    if upstream.status == 429 or upstream.status >= 500:
                        # The provider's own words name the operator's organisation, project
                        # and account limits: the key holder gets the status and the gateway's.
                        outcome.status = upstream.status
                        log.warning(
                            "%s provider %s answered HTTP %d",
                            hop.key.prefix,
                            provider.name,
                            upstream.status,
                        )
                        extra = response_headers(upstream.raw_headers)
                        extra = [(n, v) for n, v in extra if n != b"content-type"]
                        extra.extend(self.runtime.limiter.rate_limit_headers(hop.key.id))
                        await _send_error(
                            send, flavor, _upstream_failure(provider, upstream.status, extra)
                        )
                        return
                    if upstream.status in (401, 403):
                        # The upstream refused the operator's provider key, not the key
                        # holder's: nothing of its answer (which may echo the provider key's
                        # prefix) is passed on.
                        outcome.status = 502
                        log.warning(
                            "%s provider %s refused the gateway's credentials (HTTP %d)",
                            hop.key.prefix,
                            provider.name,
                            upstream.status,
                        )
                        await _send_error(
                            send,
                            flavor,
                            _Refused(502, _CREDENTIALS_REFUSED, "provider_credentials_refused"),
                        )
                        return
                    out_headers = response_headers(upstream.raw_headers)
                    out_headers.extend(
                        self.runtime.limiter.rate_limit_headers(
                            hop.key.id, anthropic=hop.route.api == ANTHROPIC
                        )
                    )
                    content_type = upstream.headers.get("content-type", "")
                    outcome.status = upstream.status
                    outcome.answered = 200 <= upstream.status < 300
                    response_start: Message = {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": out_headers,
                    }
                    endpoint = hop.route.endpoint
                    if content_type.startswith("text/event-stream"):
                        tracker = StreamUsage(endpoint, strip_usage_chunk=strip_usage)
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
                    elif hop.route.relay == "json":
                        content = await upstream.read()
                        out_headers.append((b"content-length", str(len(content)).encode()))
                        await send(response_start)
                        response_started = True
                        await send({"type": "http.response.body", "body": content})
                        # Read after the answer has gone: the client does not wait for it.
                        if upstream.status < 400:
                            outcome.tokens = usage_from_body(endpoint, content)
                            if not outcome.tokens.reported and hop.route.generates:
                                # No usage in the body: estimate output from its size.
                                outcome.tokens.output_tokens = len(content) // 4
                    else:
                        # Audio and file contents stream through unread.
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
                    await _send_error(send, flavor, _Refused(413, "request body too large"))
            except (TimeoutError, aiohttp.ServerTimeoutError):  # connecting took too long
                outcome.status = 504
                await _late(send, flavor, provider, tracker, response_started)
            except (aiohttp.ClientError, OSError) as exc:
                outcome.status = 502
                message = (
                    f"the provider {provider.name!r} could not be reached or failed mid-answer"
                )
                log.warning(
                    "%s upstream %s failed: %s", hop.key.prefix, provider.name, type(exc).__name__
                )
                if response_started:
                    await _end_stream(send, tracker, stream_error_event(flavor, 502, message))
                else:
                    await _send_error(send, flavor, _Refused(502, message))
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
        refuse: Callable[[_Refused], Awaitable[None]],
    ) -> None:
        # Each API lists its own kind of provider: Anthropic clients (anthropic-version) the
        # anthropic providers, every other client the OpenAI-compatible ones.
        models: dict[str, str] = {}
        wanted = unquote(path[len("/v1/models/") :]) if path.startswith("/v1/models/") else None
        if wanted is not None:
            provider = None
            if _model_refusal(wanted) is None and key.allows_model(wanted):
                provider = self.runtime.providers.route(wanted, flavor)
            if provider is None:
                await refuse(
                    _Refused(404, f"the model {wanted!r} is not available to this API key")
                )
                return
            models[wanted] = provider.name
        else:
            for provider in self.runtime.providers.providers:
                if provider.kind != flavor:
                    continue
                for model_id in await self._provider_models(provider):
                    if provider.serves(model_id) and key.allows_model(model_id):
                        models.setdefault(model_id, provider.name)
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
                provider.url_for("/v1/models"),
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


def _upstream_failure(
    provider: Provider, status: int, headers: list[tuple[bytes, bytes]]
) -> _Refused:
    if status == 429:
        message = (
            f"the provider {provider.name!r} is limiting this gateway's requests; retry shortly"
        )
        return _Refused(429, message, "provider_rate_limited", headers)
    return _Refused(status, f"the provider {provider.name!r} failed (HTTP {status})", None, headers)


_QUERY_KEEP = frozenset({b"beta"})  # the Anthropic SDK's ?beta=true on beta endpoints


def _stateless_query(query: bytes) -> bytes:
    """The query parameters a stateless route forwards: the few an API reads, no others."""
    return b"&".join(part for part in query.split(b"&") if part.partition(b"=")[0] in _QUERY_KEEP)


async def _late(
    send: Send, flavor: str, provider: Provider, tracker: StreamUsage | None, started: bool
) -> None:
    message = f"the provider {provider.name!r} did not answer in time"
    if started:
        await _end_stream(send, tracker, stream_error_event(flavor, 504, message))
    else:
        await _send_error(send, flavor, _Refused(504, message))


async def _send_error(send: Send, flavor: str, refusal: _Refused) -> None:
    await send(_json_response_start(refusal.status, refusal.headers))
    await send(
        {
            "type": "http.response.body",
            "body": error_body(flavor, refusal.status, refusal.message, code=refusal.code),
        }
    )


async def _end_stream(send: Send, tracker: StreamUsage | None, event: bytes) -> None:
    """Finish a stream the upstream broke off: what is held back, then an error event."""
    held = tracker.flush() if tracker is not None else b""
    await send({"type": "http.response.body", "body": held + event, "more_body": False})
