"""The site's pages through Litestar's template engine: ``/``, ``/privacy`` and static files.

Every page is a Jinja template of ``opulon/web/templates`` (see :mod:`opulon.web.site`)
answered as a :class:`~litestar.response.Template` in its :class:`PageFrame`, which gives its
headers and the cookie banner's settings. The pages load nothing but the stylesheet, and with
analytics configured the banner's script, from this server, under their content-hashed names
(``/static/opulon.<hash>.css``, cached for a year); there is no inline style or script, so
the Content-Security-Policy allows neither.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from litestar import HttpMethod, Request, Response, route
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import SkipValidation
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.template.config import TemplateConfig

from opulon.gateway.page_frame import PageFrame, frame_for
from opulon.providers import FAMILIES, Provider
from opulon.web.policy import policy_text
from opulon.web.site import StaticFile, environment
from opulon.web.views import policy_blocks, served_apis

__all__ = [
    "CONSENT_SCRIPT",
    "READ",
    "STYLESHEET",
    "landing",
    "page",
    "privacy",
    "provide_providers",
    "static_file",
    "template_config",
]

STYLESHEET = "opulon.css"
CONSENT_SCRIPT = "consent.js"
#: The methods of a page: HEAD too, for monitors and link checkers (the server sends no body).
READ = [HttpMethod.GET, HttpMethod.HEAD]

_STATIC_HEADERS = {
    "cache-control": "public, max-age=31536000, immutable",
    "x-content-type-options": "nosniff",
}
# A Host header fit to print as the gateway's address: a name or an IP literal, and a port.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def template_config(
    stylesheet: StaticFile, script: StaticFile
) -> TemplateConfig[JinjaTemplateEngine]:
    """Litestar's template engine over the site's Jinja environment, which links
    ``stylesheet`` from every page and ``script`` from the pages that show a cookie banner."""
    env = environment(stylesheet=stylesheet.url, consent_script=script.url)
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(env))


def page(
    request: Request[Any, Any, Any],
    template_name: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    frame: PageFrame | None = None,
) -> Template:
    """A page rendered from ``template_name`` in its frame: the headers every page carries,
    and ``frame`` in its context for the base template."""
    frame = frame or frame_for(request)
    merged = frame.headers()
    for name, value in (headers or {}).items():
        if name == "vary" and "vary" in merged:
            value = f"{value}, {merged['vary']}"
        merged[name] = value
    return Template(
        template_name=template_name,
        context={**(context or {}), "frame": frame},
        status_code=status_code,
        headers=merged,
    )


# -- the pages ------------------------------------------------------------------------------


def _base_url(request: Request[Any, Any, Any], frame: PageFrame) -> str:
    """The gateway's address for SDKs: the configured public URL, else the one the browser
    used (its Host, if it is a plain host name or address)."""
    if frame.site.public_url:
        return frame.site.public_url
    scheme = "https" if frame.over_tls else "http"
    host = request.headers.get("host", "")
    if not _HOST_RE.fullmatch(host):
        server = request.scope.get("server") or ("127.0.0.1", 8000)
        host = f"{server[0]}:{server[1]}"
    return f"{scheme}://{host}"


@route("/", http_method=READ, include_in_schema=False)
async def landing(
    request: Request[Any, Any, Any], providers: SkipValidation[Sequence[Provider]]
) -> Template:
    frame = frame_for(request)
    context = {"base_url": _base_url(request, frame), "apis": served_apis(providers)}
    # Without a public URL the page prints the Host it was asked for: no cache may hand it on
    # to a browser that asked another.
    headers = {} if frame.site.public_url else {"vary": "Host", "cache-control": "no-store"}
    return page(request, "landing.html", context, headers=headers, frame=frame)


def provide_providers(state: State) -> Sequence[Provider]:
    """The providers of the running gateway (none while it starts), for ``/`` and ``/privacy``."""
    runtime = state.get("runtime")
    return () if runtime is None else tuple(runtime.providers)


@route("/privacy", http_method=READ, include_in_schema=False)
async def privacy(
    request: Request[Any, Any, Any], providers: SkipValidation[Sequence[Provider]]
) -> Template:
    frame = frame_for(request)
    runtime = request.app.state.get("runtime")
    families = tuple(FAMILIES[family] for family in sorted({f for p in providers for f in p.allow}))
    mail_service = getattr(runtime, "mail_service", None)
    public_url = frame.site.public_url or (runtime.public_url() if runtime else None)
    text = policy_text(
        frame.site,
        families,
        mail_service,
        tls=(public_url or "").startswith("https://"),
        upstream_tls=all(p.base_url.startswith("https://") for p in providers),
    )
    return page(request, "privacy.html", {"policy": policy_blocks(text)}, frame=frame)


@route("/static/{name:str}", http_method=READ, include_in_schema=False)
async def static_file(
    name: str, static_files: SkipValidation[Mapping[str, StaticFile]]
) -> Response[bytes]:
    """A static file by its content-hashed name; any other name, an old one too, is 404."""
    file = static_files.get(name)
    if file is None:
        raise NotFoundException()
    return Response(file.body, media_type=file.media_type, headers=_STATIC_HEADERS)
