"""The pages' forms: reading a POSTed form within a size limit, and refusing cross-site posts.

:class:`FormGuard` protects every form of ``/key-status`` three ways. Its cookies are
``SameSite=Strict``, so a browser sends none of them with a request another site starts. Each
form carries a token, the keyed hash (under a secret of this process) of a random value in the
``HttpOnly`` cookie :data:`CSRF_COOKIE` (a signed double-submit token); a POST whose token does
not match its cookie is refused. And a POST whose ``Origin`` names another site, or whose
``Sec-Fetch-Site`` says it came from one, is refused before its token is even looked at.
(The pages' ``Referrer-Policy: no-referrer`` makes browsers send their own forms with
``Origin: null``: that says nothing, so it is left to the other checks.)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from litestar import Request, Response

from opulon.gateway.client_address import Network

__all__ = ["CSRF_COOKIE", "CSRF_FIELD", "SESSION_COOKIE", "FormGuard", "read_form"]

CSRF_COOKIE = "opulon_csrf"
#: The signed-in session's cookie (see :mod:`opulon.gateway.sign_in`).
SESSION_COOKIE = "opulon_session"
CSRF_FIELD = "csrf_token"
COOKIE_PATH = "/key-status"
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{20,64}")
_SAME_SITE_FETCHES = frozenset({"same-origin", "none"})
_MAX_FIELDS = 10


async def read_form(request: Request[Any, Any, Any], limit: int) -> dict[str, str] | None:
    """The fields of a URL-encoded form (first value of each), or None when over ``limit``
    bytes. Any other body, or one that does not parse, has no fields."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("application/x-www-form-urlencoded"):
        return {}
    try:
        fields = parse_qs(b"".join(chunks).decode("utf-8", "replace"), max_num_fields=_MAX_FIELDS)
    except ValueError:
        return {}
    return {name: values[0] for name, values in fields.items() if values}


class FormGuard:
    """Form tokens and the same-site checks of every POST of the pages."""

    def __init__(self, trusted_proxies: Sequence[Network] = ()) -> None:
        self.trusted_proxies = tuple(trusted_proxies)
        self._secret = secrets.token_bytes(32)

    def token(self, request: Request[Any, Any, Any]) -> tuple[str, str | None]:
        """The token for the forms of a page, and the cookie value to set with it (None when
        the browser holds a usable one already)."""
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if _COOKIE_VALUE.fullmatch(cookie):
            return self._sign(cookie), None
        fresh = secrets.token_urlsafe(24)
        return self._sign(fresh), fresh

    def refusal(self, request: Request[Any, Any, Any], fields: Mapping[str, str]) -> str | None:
        """Why a POST is refused as possibly cross-site, or None when it is the page's own."""
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in _SAME_SITE_FETCHES:
            return "this form was sent from another site"
        origin = request.headers.get("origin")
        if origin is not None and self._foreign_origin(request, origin):
            return "this form was sent from another site"
        cookie = request.cookies.get(CSRF_COOKIE, "")
        sent = fields.get(CSRF_FIELD, "")
        if not _COOKIE_VALUE.fullmatch(cookie) or not hmac.compare_digest(
            self._sign(cookie).encode(), sent.encode()
        ):
            return "this form has expired; reload the page and send it again"
        return None

    def set_cookie(
        self,
        response: Response[Any],
        request: Request[Any, Any, Any],
        name: str,
        value: str,
        *,
        max_age: int | None = None,
    ) -> None:
        """Set one of the pages' cookies: HttpOnly, SameSite=Strict, Secure over TLS."""
        response.set_cookie(
            name,
            value,
            path=COOKIE_PATH,
            max_age=max_age,
            httponly=True,
            samesite="strict",
            secure=self.over_tls(request),
        )

    def over_tls(self, request: Request[Any, Any, Any]) -> bool:
        """Whether the browser reached the gateway over TLS (itself, or a trusted proxy's)."""
        if request.scope.get("scheme") == "https":
            return True
        if not self._from_trusted_proxy(request):
            return False
        # The value the trusted proxy appended is the last one: any before it came from the
        # client, which can write what it likes there.
        proto = request.headers.get("x-forwarded-proto", "")
        return proto.split(",")[-1].strip().lower() == "https"

    # -- internals ---------------------------------------------------------------------------

    def _sign(self, value: str) -> str:
        return hmac.new(self._secret, value.encode(), hashlib.sha256).hexdigest()

    def _from_trusted_proxy(self, request: Request[Any, Any, Any]) -> bool:
        client = request.scope.get("client")
        if not client or not self.trusted_proxies:
            return False
        try:
            peer = ipaddress.ip_address(str(client[0]))
        except ValueError:
            return False
        return any(peer in network for network in self.trusted_proxies)

    def _foreign_origin(self, request: Request[Any, Any, Any], origin: str) -> bool:
        origin = origin.strip()
        if origin == "null":
            return False  # no origin told (see above)
        try:
            parts = urlsplit(origin)
        except ValueError:
            return True
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return True
        host = request.headers.get("host", "")
        if self._from_trusted_proxy(request):
            host = request.headers.get("x-forwarded-host", host).split(",")[-1].strip()
        return parts.netloc.lower() != host.lower()
