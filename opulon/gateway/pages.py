"""The site's pages through Litestar's template engine: ``/``, ``/privacy`` and the stylesheet.

Every page is a Jinja template of ``opulon/web/templates`` (see :mod:`opulon.web.site`)
answered as a :class:`~litestar.response.Template` with :data:`PAGE_HEADERS`. The pages load
nothing but the stylesheet, from this server, under its content-hashed name
(``/static/opulon.<hash>.css``, cached for a year); there is no inline style or script, so
the Content-Security-Policy allows neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from litestar import HttpMethod, Response, route
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import SkipValidation
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.template.config import TemplateConfig

from opulon.providers import FAMILIES, Provider
from opulon.web.site import StaticFile, environment
from opulon.web.views import policy_blocks

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "PAGE_HEADERS",
    "READ",
    "STYLESHEET",
    "landing",
    "page",
    "privacy",
    "privacy_text",
    "provide_providers",
    "static_file",
    "template_config",
]

STYLESHEET = "opulon.css"
#: The methods of a page: HEAD too, for monitors and link checkers (the server sends no body).
READ = [HttpMethod.GET, HttpMethod.HEAD]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
#: Headers of every page.
PAGE_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}
_STATIC_HEADERS = {
    "cache-control": "public, max-age=31536000, immutable",
    "x-content-type-options": "nosniff",
}


def template_config(stylesheet: StaticFile) -> TemplateConfig[JinjaTemplateEngine]:
    """Litestar's template engine over the site's Jinja environment, which links
    ``stylesheet`` from every page."""
    engine = JinjaTemplateEngine.from_environment(environment(stylesheet=stylesheet.url))
    return TemplateConfig(instance=engine)


def page(
    template_name: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Template:
    """A page rendered from ``template_name`` with the headers every page carries."""
    return Template(
        template_name=template_name,
        context=dict(context or {}),
        status_code=status_code,
        headers={**PAGE_HEADERS, **(headers or {})},
    )


# -- the pages ------------------------------------------------------------------------------


@route("/", http_method=READ, include_in_schema=False)
async def landing() -> Template:
    return page("landing.html")


_NO_RECORDS_AT_PROVIDER = "read a stored object at the provider."


def privacy_text(providers: Sequence[Provider] = ()) -> str:
    """The policy as this gateway keeps it: it names the stateful APIs an operator turned on."""
    text = resources.files("opulon").joinpath("web/privacy-policy.txt").read_text()
    shared = sorted({family for provider in providers for family in provider.allow})
    if shared:
        text = text.replace(
            _NO_RECORDS_AT_PROVIDER,
            _NO_RECORDS_AT_PROVIDER
            + " Exception: the operator of this gateway has turned on "
            + ", ".join(FAMILIES[family] for family in shared)
            + " at a provider; what requests keep there stays under the operator's account at "
            "that provider, where the other keys of this gateway can reach it.",
        )
    return text


def provide_providers(state: State) -> Sequence[Provider]:
    """The providers of the running gateway (none while it starts), for ``/privacy``."""
    runtime = state.get("runtime")
    return () if runtime is None else tuple(runtime.providers)


@route("/privacy", http_method=READ, include_in_schema=False)
async def privacy(providers: SkipValidation[Sequence[Provider]]) -> Template:
    return page("privacy.html", {"policy": policy_blocks(privacy_text(providers))})


@route("/static/{name:str}", http_method=READ, include_in_schema=False)
async def static_file(
    name: str, static_files: SkipValidation[Mapping[str, StaticFile]]
) -> Response[bytes]:
    """A static file by its content-hashed name; any other name, an old one too, is 404."""
    file = static_files.get(name)
    if file is None:
        raise NotFoundException()
    return Response(file.body, media_type=file.media_type, headers=_STATIC_HEADERS)
