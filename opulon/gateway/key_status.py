"""``/key-status`` (an HTML page with a POST form) and ``GET /v1/key-status`` (JSON).

A key holder sees their key's status, expiry, limits with what is used and left, tokens per
day and recent requests. The key travels only in a POSTed form body or a request header,
never in a URL, and is never logged or echoed back. Failed look-ups are slowed down and then
refused per client by :class:`FailureThrottle`, which keeps no address: only a keyed hash of
it, under a salt that lives in this process's memory. The form is guarded against cross-site
posts by :class:`~opulon.gateway.forms.FormGuard`, as every form of the page is; signing in
with a mailed code is :mod:`opulon.gateway.sign_in`.
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import unquote_plus

from litestar import MediaType, Request, Response, Router, get, post, route
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import SkipValidation
from litestar.response import Template

from opulon.gateway.client_address import Network, client_address
from opulon.gateway.errors import OPENAI, error_body
from opulon.gateway.forms import CSRF_COOKIE, SESSION_COOKIE, FormGuard, read_form
from opulon.gateway.pages import READ, page
from opulon.key_status_data import KeyStatus, status_json
from opulon.keys import KeyRecord, Refusal, malformed_reason
from opulon.web.views import tokens_chart

PAGE_PATH = "/key-status"
API_PATH = "/v1/key-status"

# Besides the headers of every page: a key's status is never cached, by anyone.
_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}
_API_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}
_MAX_FORM_BYTES = 4096
_KEYISH_PARAMS = frozenset({"key", "api_key", "apikey", "api-key", "token", "access_token"})
_HEADER_HINT = "send it as 'Authorization: Bearer op-ul-...' or 'x-api-key: op-ul-...'"


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

    def refund(self, client: bytes) -> None:
        """Take back the failure last counted: the attempt it was counted for succeeded."""
        times = self._failures.get(client)
        if times:
            times.pop()


class StatusSource(Protocol):
    """All the key-status handlers ask of the live gateway (the runtime)."""

    def status_record(self, raw_key: str) -> KeyRecord | Refusal:
        """The key's record if the key is genuine (disabled or expired too), else why not."""
        ...

    async def key_status(self, record: KeyRecord) -> KeyStatus:
        """What the key holder may see of their key."""
        ...

    def email_enabled(self) -> bool:
        """Whether signing in with a mailed code is offered."""
        ...

    async def session_keys(self, token: str) -> list[KeyRecord] | None:
        """The keys of a live sign-in session's address, or None."""
        ...


class ClientAddresses:
    """Tells clients apart for the throttle (the address is hashed, never kept or logged)."""

    def __init__(self, trusted_proxies: Sequence[Network] = ()) -> None:
        self.trusted_proxies = tuple(trusted_proxies)

    def __call__(self, request: Request[Any, Any, Any]) -> str:
        # uvicorn runs without proxy headers, so the scope's client is the direct peer.
        client = request.scope.get("client")
        peer = str(client[0]) if client else ""
        forwarded = request.headers.getall("x-forwarded-for", [])
        return client_address(peer, forwarded, self.trusted_proxies)


def provide_source(state: State) -> StatusSource | None:
    """The live runtime, once the gateway's lifespan has started it."""
    source: StatusSource | None = state.get("runtime")
    return source


def key_status_router(
    trusted_proxies: Sequence[Network] = (),
    throttle: FailureThrottle | None = None,
    guard: FormGuard | None = None,
) -> Router:
    """``/key-status`` and ``/v1/key-status`` with what their handlers are given: the live
    runtime (``source``), one failure throttle for both, the client's address and the forms'
    guard against cross-site posts."""
    shared = throttle or FailureThrottle()
    forms = guard or FormGuard(trusted_proxies)
    return Router(
        path="/",
        route_handlers=[key_status_form, key_status_page, key_status_json],
        dependencies={
            "source": Provide(provide_source, sync_to_thread=False),
            "throttle": Provide(lambda: shared, sync_to_thread=False),
            "client": Provide(ClientAddresses(trusted_proxies), sync_to_thread=False),
            "guard": Provide(lambda: forms, sync_to_thread=False),
        },
    )


async def look_up(
    source: StatusSource | None, throttle: FailureThrottle, address: str, raw_key: str
) -> KeyStatus | _Failure:
    """The status of the key, or why there is none. Failures are throttled per client."""
    if source is None:
        return _Failure(503, "Unavailable", "the gateway is starting; try again shortly")
    client = throttle.client_id(address)
    wait = throttle.retry_after(client)
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
    record = source.status_record(raw_key)
    if isinstance(record, Refusal):
        # Counted before the first await, so parallel guesses cannot all slip through.
        delay = throttle.failed(client)
        await asyncio.sleep(delay)
        message = malformed_reason(raw_key) if record is Refusal.MALFORMED else record.value
        return _Failure(401, "Not recognised", message)
    return await source.key_status(record)


@route(PAGE_PATH, http_method=READ, include_in_schema=False)
async def key_status_form(
    request: Request[Any, Any, Any],
    source: SkipValidation[StatusSource | None],
    guard: SkipValidation[FormGuard],
) -> Template:
    """The form; a URL that carries a key gets the form with a warning instead."""
    forms = PageForms(request, guard, source)
    token = request.cookies.get(SESSION_COOKIE, "")
    if token and source is not None:
        forms.signed_in = await source.session_keys(token) is not None
    if _query_names_a_key(request.scope.get("query_string", b"")):
        return forms.page(
            400,
            error="never put an API key in a URL: browsers keep URLs in their history. "
            "Paste the key into the form below instead, and if it was a real key, ask "
            "your administrator to rotate it.",
            title="Key in the address",
        )
    return forms.page(200)


@post(PAGE_PATH, include_in_schema=False, status_code=200)
async def key_status_page(
    request: Request[Any, Any, Any],
    source: SkipValidation[StatusSource | None],
    throttle: SkipValidation[FailureThrottle],
    guard: SkipValidation[FormGuard],
    client: NamedDependency[str],
) -> Template:
    """The key's status from the POSTed form, or the form with what went wrong."""
    forms = PageForms(request, guard, source)
    fields = await read_form(request, _MAX_FORM_BYTES)
    if fields is None:
        return forms.page(413, error="the form was too large", title="Too large")
    refusal = guard.refusal(request, fields)
    if refusal is not None:
        return forms.page(403, error=refusal, title="Refused")
    result = await look_up(source, throttle, client, fields.get("key", ""))
    if isinstance(result, _Failure):
        return forms.page(
            result.status, error=result.message, title=result.title, retry_after=result.retry_after
        )
    return forms.page(200, status=result)


@get(API_PATH, include_in_schema=False)
async def key_status_json(
    request: Request[Any, Any, Any],
    source: SkipValidation[StatusSource | None],
    throttle: SkipValidation[FailureThrottle],
    client: NamedDependency[str],
) -> Response[bytes]:
    """The key's status as JSON, the key from ``Authorization`` or ``x-api-key``."""
    if request.scope.get("query_string"):
        return _json_error(
            400,
            "this endpoint takes no query parameters, and an API key never belongs in "
            f"a URL: {_HEADER_HINT}",
        )
    raw_key = _header_key(request)
    if raw_key is None:
        return _json_error(401, f"missing API key: {_HEADER_HINT}")
    result = await look_up(source, throttle, client, raw_key)
    if isinstance(result, _Failure):
        return _json_error(result.status, result.message, retry_after=result.retry_after)
    body = json.dumps(status_json(result)).encode()
    return Response(body, status_code=200, media_type=MediaType.JSON, headers=_API_HEADERS)


class _Failure:
    __slots__ = ("message", "retry_after", "status", "title")

    def __init__(
        self, status: int, title: str, message: str, *, retry_after: int | None = None
    ) -> None:
        self.status = status
        self.title = title
        self.message = message
        self.retry_after = retry_after


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


class PageForms:
    """The pages of ``/key-status`` with their forms' token (and its cookie, when new)."""

    def __init__(
        self,
        request: Request[Any, Any, Any],
        guard: FormGuard,
        source: StatusSource | None,
    ) -> None:
        self.request = request
        self.guard = guard
        self.source = source
        self.csrf, self._fresh_cookie = guard.token(request)
        self.signed_in = False

    def render(
        self,
        template_name: str,
        context: Mapping[str, Any],
        status_code: int = 200,
        *,
        retry_after: int | None = None,
    ) -> Template:
        """A page of ``/key-status``: never cached, and its forms' token in its context."""
        headers = dict(_NO_STORE)
        if retry_after is not None:
            headers["retry-after"] = str(retry_after)
        response = page(
            self.request,
            template_name,
            {**context, "csrf": self.csrf},
            status_code=status_code,
            headers=headers,
        )
        if self._fresh_cookie is not None:
            self.guard.set_cookie(response, self.request, CSRF_COOKIE, self._fresh_cookie)
        return response

    def page(
        self,
        status_code: int,
        *,
        status: KeyStatus | None = None,
        error: str | None = None,
        title: str | None = None,
        retry_after: int | None = None,
    ) -> Template:
        """The look-up form, with a key's status or an error above it if there is one."""
        context = {
            "status": status,
            "chart": tokens_chart(status.days) if status is not None else None,
            "error": _sentence(error) if error else None,
            "error_title": title,
            "sign_in": self.source is not None and self.source.email_enabled(),
            "signed_in": self.signed_in,
        }
        return self.render("key_status.html", context, status_code, retry_after=retry_after)


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
