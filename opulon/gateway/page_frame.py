"""What every page carries around its content: its security headers and the cookie banner.

A :class:`PageFrame` is made per page response (:func:`frame_for`). Without an analytics ID the
pages run no script at all, and the Content-Security-Policy admits nothing from another host.
With one, the pages load one small script of this gateway's own (``/static/consent.<hash>.js``)
that shows the cookie banner and, only after the visitor accepts, adds the configured tags;
the policy then admits those tags' hosts and nothing else, and carries a fresh nonce that the
script hands on to the tags it adds (Tag Manager passes it to the scripts it injects). A
browser that sends ``Sec-GPC: 1`` or ``DNT: 1`` has refused already: its pages' policy
admits no analytics host at all, whatever the script would do.

The pages of ``/key-status`` (a key's usage, sign-in, the account) never carry analytics,
whatever is configured: what a key holder sees and types there is no tag's business.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

from litestar import Request

from opulon.site_settings import SiteSettings
from opulon.web.policy import DEFAULT_NAME

__all__ = ["PageFrame", "Purpose", "content_security_policy", "frame_for"]

# The hosts each tag needs, as Google's and Meta's guides for a Content-Security-Policy list
# them: the tag's own script, and where it sends its measurements.
_GOOGLE = {
    "script-src": ("https://www.googletagmanager.com",),
    "img-src": ("https://*.google-analytics.com", "https://*.googletagmanager.com"),
    "connect-src": (
        "https://*.google-analytics.com",
        "https://*.analytics.google.com",
        "https://*.googletagmanager.com",
    ),
}
_META = {
    "script-src": ("https://connect.facebook.net",),
    "img-src": ("https://www.facebook.com",),
    "connect-src": ("https://www.facebook.com", "https://connect.facebook.net"),
}
#: Powerful features no page of the site uses, turned off for it and anything it embeds.
PERMISSIONS_POLICY = (
    "accelerometer=(), browsing-topics=(), camera=(), display-capture=(), geolocation=(), "
    "gyroscope=(), magnetometer=(), microphone=(), payment=(), usb=()"
)
HSTS = "max-age=31536000"
#: The paths whose pages never load analytics: a key's status, signing in, the account.
PRIVATE_PATHS = ("/key-status",)


def content_security_policy(
    site: SiteSettings, nonce: str | None = None, *, refused: bool = False
) -> str:
    """The pages' policy: nothing but this server's stylesheet (and, with analytics, the
    script carrying ``nonce``, and the configured tags' hosts unless the browser ``refused``)."""
    sources: dict[str, list[str]] = {
        "default-src": ["'none'"],
        "script-src": [],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": [],
        "form-action": ["'self'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
    if site.analytics and nonce:
        # The nonce alone admits the banner's script: not 'self', so that no other answer of
        # this origin (an upstream's, say) could ever run as a script here.
        sources["script-src"].append(f"'nonce-{nonce}'")
        tags = ([_GOOGLE] if site.google else []) + ([_META] if site.meta_pixel_id else [])
        for tag in [] if refused else tags:
            for directive, hosts in tag.items():
                sources[directive] += hosts
    return "; ".join(
        f"{directive} {' '.join(values)}" for directive, values in sources.items() if values
    )


@dataclass(frozen=True, slots=True)
class Purpose:
    """One choice in the cookie banner: what a visitor allows, and which tags that loads."""

    key: str  # analytics | marketing (the script's names)
    label: str
    tools: str


@dataclass(frozen=True, slots=True)
class PageFrame:
    """The site's settings and this response's nonce and browser signals, for one page."""

    site: SiteSettings
    nonce: str | None = None  # fresh per response, only where the pages run a script
    refused: str | None = None  # "gpc" or "dnt": the browser sent a refusal with its request
    over_tls: bool = False

    @property
    def name(self) -> str:
        return self.site.name or DEFAULT_NAME

    @property
    def analytics(self) -> bool:
        return self.site.analytics

    @property
    def refusal_signal(self) -> str:
        return "Do Not Track" if self.refused == "dnt" else "Global Privacy Control"

    @property
    def purposes(self) -> tuple[Purpose, ...]:
        found = []
        if self.site.google:
            tools = "Google Analytics 4" + (
                " through Google Tag Manager" if self.site.gtm_id else ""
            )
            found.append(Purpose("analytics", "Analytics", tools))
        if self.site.meta_pixel_id:
            found.append(Purpose("marketing", "Marketing measurement", "the Meta Pixel"))
        return tuple(found)

    def headers(self) -> dict[str, str]:
        """The headers of a page in this frame."""
        headers = {
            "content-security-policy": content_security_policy(
                self.site, self.nonce, refused=self.refused is not None
            ),
            "referrer-policy": "no-referrer",
            "x-content-type-options": "nosniff",
            "x-frame-options": "DENY",
            "permissions-policy": PERMISSIONS_POLICY,
            "cross-origin-opener-policy": "same-origin",
        }
        if self.over_tls:
            headers["strict-transport-security"] = HSTS
        if self.site.analytics:
            # The page differs by the browser's refusal, and its nonce must not be reused.
            headers["vary"] = "Sec-GPC, DNT"
            headers["cache-control"] = "no-store"
        return headers


def _refusal(request: Request[Any, Any, Any]) -> str | None:
    if request.headers.get("sec-gpc", "").strip() == "1":
        return "gpc"
    if request.headers.get("dnt", "").strip() == "1":
        return "dnt"
    return None


def _private(path: str) -> bool:
    return any(path == base or path.startswith(base + "/") for base in PRIVATE_PATHS)


def frame_for(request: Request[Any, Any, Any]) -> PageFrame:
    """The frame of a page answering ``request``: the running gateway's site settings (the
    defaults while it starts; without the analytics IDs on the private paths), a nonce where
    the page runs its script, the browser's refusal."""
    state = request.app.state
    runtime = state.get("runtime")
    site = getattr(runtime, "site", None) or SiteSettings()
    if site.analytics and _private(request.url.path):
        site = replace(site, gtm_id=None, ga4_id=None, meta_pixel_id=None)
    guard = state.get("form_guard")
    if guard is not None:
        over_tls = bool(guard.over_tls(request))
    else:
        over_tls = request.scope.get("scheme") == "https"
    if not site.analytics:
        return PageFrame(site, over_tls=over_tls)
    return PageFrame(site, secrets.token_urlsafe(18), _refusal(request), over_tls)
