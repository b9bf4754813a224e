"""Signing in on ``/key-status`` with a code mailed to the address a key was issued to.

``POST /key-status/code`` asks for a code: the answer is the same page, after the same time
(:data:`CODE_ANSWER_SECONDS`, the mail goes out in the background), whether or not keys belong
to the address. ``POST /key-status/sign-in`` takes the code and sets the session cookie
(:data:`SESSION_COOKIE`: HttpOnly, SameSite=Strict, Secure over TLS); ``GET
/key-status/account`` shows every key of the address as the key look-up shows one, with a
button per key (``POST /key-status/account/send``) that mails the key again;
``POST /key-status/sign-out`` ends the session. Every POST passes the
:class:`~opulon.gateway.forms.FormGuard`. Code requests are counted per client in memory
(:class:`~opulon.gateway.key_status.FailureThrottle`, the address hashed), and a wrong code
counts as a failed look-up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from litestar import Request, Router, post, route
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import SkipValidation
from litestar.response import Redirect, Template

from opulon.email_settings import EmailSettings
from opulon.gateway.client_address import Network
from opulon.gateway.forms import SESSION_COOKIE, FormGuard, read_form
from opulon.gateway.key_status import (
    PAGE_PATH,
    ClientAddresses,
    FailureThrottle,
    PageForms,
    StatusSource,
)
from opulon.gateway.pages import READ
from opulon.keys import KeyRecord
from opulon.mail import Mail
from opulon.sign_in import (
    CODE_WINDOW,
    SESSION_LIFETIME,
    CodeRefusal,
    Session,
    normalize_address,
    normalize_code,
)
from opulon.web.emails import key_mail
from opulon.web.sign_in_mail import sign_in_code_mail
from opulon.web.views import tokens_chart

__all__ = ["CODE_ANSWER_SECONDS", "SESSION_COOKIE", "SignInSource", "sign_in_router"]

ACCOUNT_PATH = PAGE_PATH + "/account"
#: Every answer to "send me a code" takes this long, whatever happened behind it.
CODE_ANSWER_SECONDS = 0.5
#: Code requests per client per 15 minutes (each address has its own limit besides).
CODE_REQUESTS_PER_CLIENT = 5
_MAX_FORM_BYTES = 4096
_NOT_SET_UP = (
    "signing in by email is not set up on this gateway; look up a key with the form above, "
    "or ask your administrator"
)
_SENT_AGAIN = "Key {prefix} is on its way to your address. It can take a minute or two."
_NOT_SENT = (
    "Sorry, the key could not be sent just now. Try again in a few minutes, or ask your "
    "administrator"
)
_SHARE_USED = (
    "At most 3 codes are sent to an address in 15 minutes, and this one has had its share: "
    "use the latest code you received, or ask again later."
)


class SignInSource(StatusSource, Protocol):
    """What the sign-in handlers ask of the live gateway (the runtime)."""

    def public_url(self) -> str | None:
        """The gateway's public URL, for what the mails say."""
        ...

    async def send_sign_in_code(self, address: str, compose: Any) -> bool:
        """Issue (and, if keys belong to the address, mail) a code; False when over the limit."""
        ...

    async def sign_in(self, address: str, code: str) -> Session | CodeRefusal:
        """A session, or why the code does not sign in."""
        ...

    async def session_keys(self, token: str) -> list[KeyRecord] | None:
        """The keys of a live session's address, or None."""
        ...

    async def end_session(self, token: str) -> None:
        """Sign out."""

    async def send_key_again(self, token: str, prefix: str, compose: Any) -> bool:
        """Mail a key of the session's address to it again; False if it was not sent."""
        ...


def provide_sign_in(state: State) -> SignInSource | None:
    """The live runtime, once the gateway's lifespan has started it."""
    source: SignInSource | None = state.get("runtime")
    return source


def sign_in_router(
    trusted_proxies: Sequence[Network] = (),
    throttle: FailureThrottle | None = None,
    guard: FormGuard | None = None,
    *,
    answer_seconds: float = CODE_ANSWER_SECONDS,
) -> Router:
    """The sign-in pages under ``/key-status``, given the runtime (``source``), the forms'
    guard, the failure throttle of the key look-up, a throttle of code requests per client,
    the client's address and how long an answer to a code request takes."""
    failures = throttle or FailureThrottle()
    forms = guard or FormGuard(trusted_proxies)
    code_requests = FailureThrottle(limit=CODE_REQUESTS_PER_CLIENT, window=CODE_WINDOW)
    return Router(
        path="/",
        route_handlers=[send_code, sign_in, account, send_key_again, sign_out],
        dependencies={
            "source": Provide(provide_sign_in, sync_to_thread=False),
            "throttle": Provide(lambda: failures, sync_to_thread=False),
            "code_requests": Provide(lambda: code_requests, sync_to_thread=False),
            "guard": Provide(lambda: forms, sync_to_thread=False),
            "client": Provide(ClientAddresses(trusted_proxies), sync_to_thread=False),
            "answer_seconds": Provide(lambda: answer_seconds, sync_to_thread=False),
        },
    )


class _Form:
    """A POSTed form of the sign-in pages, read and checked, or the page that refuses it."""

    def __init__(self, forms: PageForms) -> None:
        self.forms = forms
        self.fields: dict[str, str] = {}

    async def refused(self, *, email_needed: bool = True) -> Template | None:
        forms = self.forms
        fields = await read_form(forms.request, _MAX_FORM_BYTES)
        if fields is None:
            return forms.page(413, error="the form was too large", title="Too large")
        self.fields = fields
        refusal = forms.guard.refusal(forms.request, fields)
        if refusal is not None:
            return forms.page(403, error=refusal, title="Refused")
        if forms.source is None:
            return forms.page(503, error="the gateway is starting; try again shortly")
        if email_needed and not forms.source.email_enabled():
            return forms.page(503, error=_NOT_SET_UP, title="Not available")
        return None


async def _posted(
    request: Request[Any, Any, Any],
    guard: FormGuard,
    source: SignInSource | None,
    *,
    email_needed: bool = True,
) -> tuple[PageForms, SignInSource, dict[str, str]] | Template:
    """The posted form's page helpers, the live runtime and the fields, or the refusing page."""
    forms = PageForms(request, guard, source)
    form = _Form(forms)
    refused = await form.refused(email_needed=email_needed)
    if refused is not None or source is None:
        return refused or forms.page(503)
    return forms, source, form.fields


def _code_page(
    forms: PageForms,
    address: str,
    status_code: int = 200,
    *,
    notice: str | None = None,
    error: str | None = None,
    title: str | None = None,
    retry_after: int | None = None,
) -> Template:
    context = {"address": address, "notice": notice, "error": error, "error_title": title}
    return forms.render("sign_in_code.html", context, status_code, retry_after=retry_after)


@post(PAGE_PATH + "/code", include_in_schema=False, status_code=200)
async def send_code(
    request: Request[Any, Any, Any],
    source: SkipValidation[SignInSource | None],
    guard: SkipValidation[FormGuard],
    code_requests: SkipValidation[FailureThrottle],
    client: NamedDependency[str],
    answer_seconds: NamedDependency[float],
) -> Template:
    """Send a code to an address: the same page, in the same time, whoever it belongs to."""
    started = time.monotonic()
    posted = await _posted(request, guard, source)
    if not isinstance(posted, tuple):
        return posted
    forms, source, fields = posted
    address = normalize_address(fields.get("email", ""))
    if address is None:
        return forms.page(400, error="that is not an email address", title="Not sent")
    client_id = code_requests.client_id(client)
    wait = code_requests.retry_after(client_id)
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        return forms.page(
            429,
            error=f"too many codes asked for from your connection; try again in {seconds} s",
            title="Too many codes",
            retry_after=seconds,
        )
    code_requests.failed(client_id)  # every request counts, answered or not
    gateway_url = source.public_url()

    def compose(to: str, code: str) -> Mail:
        return sign_in_code_mail(to, code, gateway_url=gateway_url)

    issued = await source.send_sign_in_code(address, compose)
    await asyncio.sleep(max(0.0, started + answer_seconds - time.monotonic()))
    return _code_page(forms, address, notice=None if issued else _SHARE_USED)


@post(PAGE_PATH + "/sign-in", include_in_schema=False, status_code=200)
async def sign_in(
    request: Request[Any, Any, Any],
    source: SkipValidation[SignInSource | None],
    guard: SkipValidation[FormGuard],
    throttle: SkipValidation[FailureThrottle],
    client: NamedDependency[str],
) -> Template | Redirect:
    """Sign in with the mailed code: the session cookie and the account page, or why not."""
    posted = await _posted(request, guard, source)
    if not isinstance(posted, tuple):
        return posted
    forms, source, fields = posted
    address = normalize_address(fields.get("email", ""))
    if address is None:
        return forms.page(400, error="that is not an email address", title="Not signed in")
    client_id = throttle.client_id(client)
    wait = throttle.retry_after(client_id)
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        message = f"too many failed attempts from your connection; try again in {seconds} s"
        return _code_page(forms, address, 429, error=message, retry_after=seconds)
    code = normalize_code(fields.get("code", ""))
    if code is None:
        return _code_page(forms, address, 400, error="the code is the 6 digits from the mail")
    # Counted before the wait, so parallel guesses cannot all slip through; taken back if right.
    delay = throttle.failed(client_id)
    result = await source.sign_in(address, code)
    if isinstance(result, CodeRefusal):
        await asyncio.sleep(delay)
        title = "Locked" if result is CodeRefusal.LOCKED else "Not signed in"
        return _code_page(forms, address, 401, error=result.value + ".", title=title)
    throttle.refund(client_id)
    earlier = request.cookies.get(SESSION_COOKIE, "")
    if earlier:  # a new session replaces the browser's earlier one, on the server too
        await source.end_session(earlier)
    response = Redirect(ACCOUNT_PATH, status_code=303, headers={"cache-control": "no-store"})
    guard.set_cookie(response, request, SESSION_COOKIE, result.token, max_age=int(SESSION_LIFETIME))
    return response


async def _account_page(
    forms: PageForms,
    source: SignInSource,
    records: list[KeyRecord],
    status_code: int = 200,
    *,
    notice: str | None = None,
    error: str | None = None,
) -> Template:
    statuses = [await source.key_status(record) for record in records]
    context = {
        "keys": [(status, tokens_chart(status.days)) for status in statuses],
        "notice": notice,
        "error": error,
    }
    return forms.render("account.html", context, status_code)


def _signed_out(request: Request[Any, Any, Any], guard: FormGuard) -> Redirect:
    response = Redirect(PAGE_PATH, status_code=303, headers={"cache-control": "no-store"})
    if SESSION_COOKIE in request.cookies:
        guard.set_cookie(response, request, SESSION_COOKIE, "", max_age=0)
    return response


@route(ACCOUNT_PATH, http_method=READ, include_in_schema=False)
async def account(
    request: Request[Any, Any, Any],
    source: SkipValidation[SignInSource | None],
    guard: SkipValidation[FormGuard],
) -> Template | Redirect:
    """Every key of the signed-in address; without a live session, back to the form."""
    token = request.cookies.get(SESSION_COOKIE, "")
    records = await source.session_keys(token) if source is not None and token else None
    if source is None or records is None:
        return _signed_out(request, guard)
    return await _account_page(PageForms(request, guard, source), source, records)


@post(ACCOUNT_PATH + "/send", include_in_schema=False, status_code=200)
async def send_key_again(
    request: Request[Any, Any, Any],
    source: SkipValidation[SignInSource | None],
    guard: SkipValidation[FormGuard],
    code_requests: SkipValidation[FailureThrottle],
    client: NamedDependency[str],
) -> Template | Redirect:
    """Mail one key of the signed-in address to it again; a plain apology if that fails.

    Each send counts as a code request of the client: no one fills an inbox from here."""
    posted = await _posted(request, guard, source, email_needed=False)
    if not isinstance(posted, tuple):
        return posted
    forms, source, fields = posted
    token = request.cookies.get(SESSION_COOKIE, "")
    records = await source.session_keys(token) if token else None
    if records is None:
        return _signed_out(request, guard)
    prefix = fields.get("prefix", "")
    client_id = code_requests.client_id(client)
    if code_requests.retry_after(client_id) is not None:
        error = "too many mails asked for from your connection; try again later."
        return await _account_page(forms, source, records, 429, error=error)
    code_requests.failed(client_id)

    def compose(record: KeyRecord, key: str, settings: EmailSettings) -> Mail:
        return key_mail(record, key, settings)

    if await source.send_key_again(token, prefix, compose):
        notice = _SENT_AGAIN.format(prefix=prefix)
        return await _account_page(forms, source, records, notice=notice)
    return await _account_page(forms, source, records, 503, error=_NOT_SENT + ".")


@post(PAGE_PATH + "/sign-out", include_in_schema=False, status_code=200)
async def sign_out(
    request: Request[Any, Any, Any],
    source: SkipValidation[SignInSource | None],
    guard: SkipValidation[FormGuard],
) -> Template | Redirect:
    """End the session, here and in the database, and go back to the form."""
    posted = await _posted(request, guard, source, email_needed=False)
    if not isinstance(posted, tuple):
        return posted
    _, source, _ = posted
    token = request.cookies.get(SESSION_COOKIE, "")
    if token:
        await source.end_session(token)
    return _signed_out(request, guard)
