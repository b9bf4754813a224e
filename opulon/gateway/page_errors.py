"""What the site answers when no handler does: 404, 405, a bad request, an internal error.

Litestar's own error responses are JSON without the pages' headers; these are pages (or, under
``/v1/``, the OpenAI error shape) with the Content-Security-Policy, ``nosniff`` and
``no-store`` of every page, and an internal error is logged by its type alone: its message
could hold what a request carried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.response import Template

from opulon.gateway.errors import OPENAI, error_body
from opulon.gateway.pages import page

log = logging.getLogger("opulon.gateway")

_TITLES = {
    400: ("Bad request", "The request could not be read."),
    404: ("Not found", "There is no page here."),
    405: ("Method not allowed", "This page does not take that kind of request."),
    413: ("Too large", "The request was too large."),
}
_NO_STORE = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


def _answer(request: Request[Any, Any, Any], status: int, extra: dict[str, str]) -> Response[Any]:
    title, message = _TITLES.get(status, ("Something went wrong", "Please try again shortly."))
    headers = {**_NO_STORE, **extra}
    if request.url.path.startswith("/v1/"):
        body = error_body(OPENAI, status, message.rstrip(".").lower())
        return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)
    template: Template = page(
        request,
        "error.html",
        {"title": title, "message": message},
        status_code=status,
        headers=headers,
    )
    return template


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """A 4xx (or 5xx) a handler or Litestar's router raised."""
    extra = {}
    if exc.status_code == 405 and exc.headers and "allow" in {k.lower() for k in exc.headers}:
        extra = {k.lower(): v for k, v in exc.headers.items() if k.lower() == "allow"}
    return _answer(request, exc.status_code, extra)


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Anything a handler did not expect: a plain apology, and the error's type in the log."""
    log.error("internal error on a page: %s", type(exc).__name__)
    return _answer(request, 500, {})


#: For ``Litestar(exception_handlers=...)``.
EXCEPTION_HANDLERS: dict[
    int | type[Exception], Callable[[Request[Any, Any, Any], Any], Response[Any]]
] = {
    HTTPException: http_error,
    Exception: internal_error,
}
