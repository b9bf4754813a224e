"""``/key-status`` (an HTML page with a POST form) and ``GET /v1/key-status`` (JSON).

A key holder sees their key's status, expiry, limits with what is used and left, tokens per
day and recent requests. The key travels only in a POSTed form body or a request header,
never in a URL, and is never logged or echoed back. Failed look-ups are slowed down and then
refused per client by :class:`FailureThrottle`, which keeps no address: only a keyed hash of
it, under a salt that lives in this process's memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from litestar import MediaType, Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from opulon.gateway.client_address import Network, client_address
from opulon.gateway.errors import OPENAI, error_body
from opulon.keys import Refusal, malformed_reason
from opulon.runtime import Runtime
from opulon.status_view import (
    KeyStatus,
    render_status_page,
    status_json,
)

PAGE_PATH = "/key-status"
API_PATH = "/v1/key-status"

# The page loads nothing: no script, no font, no image but data: URIs; forms post to itself.
_PAGE_HEADERS = {
    "cache-control": "no-store",
    "pragma": "no-cache",
    "referrer-policy": "no-referrer",
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}
_API_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}
_MAX_FORM_BYTES = 4096
_KEYISH_PARAMS = frozenset({"key", "api_key", "apikey", "api-key", "token", "access_token"})
_HEADER_HINT = "send it as 'Authorization: Bearer op-ul-...' or 'x-api-key: op-ul-...'"
# A disabled or expired key is still its holder's to look at; other refusals are failures.
_SHOWN_ANYWAY = (Refusal.DISABLED, Refusal.EXPIRED)


class FailureThrottle:
    """Failed look-ups per client in a sliding window, in memory only.

    A client is known by an HMAC of its address under a random per-process salt: the address
    itself is neither kept nor written anywhere, and the hashes mean nothing after a restart.
    After ``limit`` failures within ``window`` seconds the client is refused until the oldest
    of them leaves the window. At most ``max_clients`` are tracked; the least recently failing
    one is forgotten first, so the table cannot grow without bound.
    """

    def __init__(
        self,
        *,
        limit: int = 5,
        window: float = 60.0,
        max_clients: int = 10_000,
        base_delay: float = 0.2,
        max_delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._salt = secrets.token_bytes(32)
        self._failures: OrderedDict[bytes, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def client_id(self, address: str) -> bytes:
        """The opaque identity of a client address."""
        return hmac.new(self._salt, address.encode(), hashlib.sha256).digest()[:16]

    def _recent(self, client: bytes, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def retry_after(self, client: bytes) -> float | None:
        """Seconds until ``client`` may try again, or ``None`` if it may now."""
        now = self._clock()
        times = self._recent(client, now)
        if times is None or len(times) < self.limit:
            return None
        return max(0.0, times[-self.limit] + self.window - now)

    def failed(self, client: bytes) -> float:
        """Count a failure; returns how long to hold this failed attempt back, in seconds."""
        now = self._clock()
        times = self._recent(client, now)
        if times is None:
            times = self._failures[client] = deque(maxlen=self.limit)
        else:
            self._failures.move_to_end(client)
        times.append(now)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        return min(self.max_delay, self.base_delay * len(times))


class KeyStatusPages:
    """The handlers' shared state: where the runtime is, and the failure throttle."""

    def __init__(
        self,
        runtime: Callable[[], Runtime | None],
        throttle: FailureThrottle | None = None,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        self._runtime = runtime
        self.throttle = throttle or FailureThrottle()
        self.trusted_proxies = tuple(trusted_proxies)

    def address(self, request: Request[Any, Any, Any]) -> str:
        """The client, told apart for the throttle only (it is hashed, never kept or logged)."""
        # uvicorn runs without proxy headers, so the scope's client is the direct peer.
        client = request.scope.get("client")
        peer = str(client[0]) if client else ""
        forwarded = request.headers.getall("x-forwarded-for", [])
        return client_address(peer, forwarded, self.trusted_proxies)

    async def look_up(self, raw_key: str, address: str) -> KeyStatus | _Failure:
        """The status of the key, or why there is none. Failures are throttled per client."""
        runtime = self._runtime()
        if runtime is None:
            return _Failure(503, "Unavailable", "the gateway is starting; try again shortly")
        client = self.throttle.client_id(address)
        wait = self.throttle.retry_after(client)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            return _Failure(
                429,
                "Too many attempts",
                f"too many failed look-ups from your connection; try again in {seconds} s",
                retry_after=seconds,
            )
        raw_key = raw_key.strip()
        if not raw_key:
            return _Failure(401, "No key", "paste your API key, starting with op-ul-")
        record = runtime.status_record(raw_key)
        if isinstance(record, Refusal):
            # Counted before the first await, so parallel guesses cannot all slip through.
            delay = self.throttle.failed(client)
            await asyncio.sleep(delay)
            message = malformed_reason(raw_key) if record is Refusal.MALFORMED else record.value
            return _Failure(401, "Not recognised", message)
        return await runtime.key_status(record)

    def handlers(self) -> list[HTTPRouteHandler]:
        """The Litestar route handlers of ``/key-status`` and ``/v1/key-status``."""
        pages = self

        @get(PAGE_PATH, media_type=MediaType.HTML, include_in_schema=False)
        async def key_status_form(request: Request[Any, Any, Any]) -> Response[str]:
            if _query_names_a_key(request.scope.get("query_string", b"")):
                return _html(
                    400,
                    error="never put an API key in a URL: browsers keep URLs in their history. "
                    "Paste the key into the form below instead, and if it was a real key, ask "
                    "your administrator to rotate it.",
                    title="Key in the address",
                )
            return _html(200)

        @post(PAGE_PATH, media_type=MediaType.HTML, include_in_schema=False, status_code=200)
        async def key_status_page(request: Request[Any, Any, Any]) -> Response[str]:
            body = await _read_limited(request, _MAX_FORM_BYTES)
            if body is None:
                return _html(413, error="the form was too large", title="Too large")
            raw_key = _form_key(request, body)
            result = await pages.look_up(raw_key, pages.address(request))
            if isinstance(result, _Failure):
                return _html(
                    result.status,
                    error=result.message,
                    title=result.title,
                    retry_after=result.retry_after,
                )
            return Response(
                render_status_page(result),
                status_code=200,
                media_type=MediaType.HTML,
                headers=_PAGE_HEADERS,
            )

        @get(API_PATH, include_in_schema=False)
        async def key_status_json(request: Request[Any, Any, Any]) -> Response[bytes]:
            if request.scope.get("query_string"):
                return _json_error(
                    400,
                    "this endpoint takes no query parameters, and an API key never belongs in "
                    f"a URL: {_HEADER_HINT}",
                )
            raw_key = _header_key(request)
            if raw_key is None:
                return _json_error(401, f"missing API key: {_HEADER_HINT}")
            result = await pages.look_up(raw_key, pages.address(request))
            if isinstance(result, _Failure):
                return _json_error(result.status, result.message, retry_after=result.retry_after)
            body = json.dumps(status_json(result)).encode()
            return Response(body, status_code=200, media_type=MediaType.JSON, headers=_API_HEADERS)

        return [key_status_form, key_status_page, key_status_json]


class _Failure:
    __slots__ = ("message", "retry_after", "status", "title")

    def __init__(
        self, status: int, title: str, message: str, *, retry_after: int | None = None
    ) -> None:
        self.status = status
        self.title = title
        self.message = message
        self.retry_after = retry_after


def key_status_handlers(
    runtime: Callable[[], Runtime | None], trusted_proxies: Sequence[Network] = ()
) -> list[HTTPRouteHandler]:
    """Route handlers for the status page and its JSON form, reading the live runtime."""
    return KeyStatusPages(runtime, trusted_proxies=trusted_proxies).handlers()


def _sentence(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _header_key(request: Request[Any, Any, Any]) -> str | None:
    authorization = request.headers.get("authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    api_key = request.headers.get("x-api-key")
    return api_key.strip() if api_key else None


def _query_names_a_key(query: bytes) -> bool:
    if not query:
        return False
    text = unquote_plus(query.decode("latin-1"))
    if "op-ul-" in text.lower():
        return True
    names = {part.split("=", 1)[0].strip().lower() for part in text.split("&")}
    return bool(names & _KEYISH_PARAMS)


async def _read_limited(request: Request[Any, Any, Any], limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _form_key(request: Request[Any, Any, Any], body: bytes) -> str:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("application/x-www-form-urlencoded"):
        return ""
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:
        return ""
    values = fields.get("key")
    return values[0] if values else ""


def _html(
    status: int,
    *,
    error: str | None = None,
    title: str | None = None,
    retry_after: int | None = None,
) -> Response[str]:
    headers = dict(_PAGE_HEADERS)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return Response(
        render_status_page(error=_sentence(error) if error else None, error_title=title),
        status_code=status,
        media_type=MediaType.HTML,
        headers=headers,
    )


def _json_error(status: int, message: str, *, retry_after: int | None = None) -> Response[bytes]:
    headers = dict(_API_HEADERS)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return Response(
        error_body(OPENAI, status, message),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )
