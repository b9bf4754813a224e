"""The privacy policy as this gateway keeps it, in plain text.

``templates/privacy_policy.txt`` is the public policy with the operator's name, contact, website
and date in it, and with each sentence about the website's analytics present only when those
analytics are configured: a gateway without an analytics ID names neither Google nor Meta, and
promises no cookie banner it does not show. :func:`policy_text` renders it; the page splits it
into headings, paragraphs and lists (:func:`opulon.web.views.policy_blocks`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from jinja2 import Environment

from opulon.formatting import long_date
from opulon.site_settings import SiteSettings
from opulon.web.site import environment

__all__ = ["DEFAULT_NAME", "policy_text", "tools_named"]

#: What the pages call the service while the operator has not named it.
DEFAULT_NAME = "Opulon"


def tools_named(site: SiteSettings) -> str:
    """The configured tags in words: "Google Analytics 4 and the Meta Pixel"."""
    names = []
    if site.google:
        names.append("Google Analytics 4")
    if site.meta_pixel_id:
        names.append("the Meta Pixel")
    return " and ".join(names)


@functools.lru_cache(maxsize=16)
def policy_text(
    site: SiteSettings,
    families: Sequence[str] = (),
    mail_service: str | None = None,
    *,
    tls: bool = False,
    upstream_tls: bool = True,
) -> str:
    """The policy for ``site``; ``families`` are the stateful APIs the operator turned on at a
    provider, ``mail_service`` the service that delivers the emails (None: no email), ``tls``
    whether the gateway's public address is an https one, ``upstream_tls`` whether every
    provider is reached over https."""
    google_tools = "Google Analytics 4"
    if site.gtm_id:
        google_tools += ", managed through Google Tag Manager"
    tools = tools_named(site)
    context = {
        "name": site.name or DEFAULT_NAME,
        "website": site.website,
        "contact": site.contact,
        "updated": long_date(site.policy_date_or_default()),
        "analytics": site.analytics,
        "google": site.google,
        "gtm": bool(site.gtm_id),
        "pixel": bool(site.meta_pixel_id),
        "google_tools": google_tools,
        "tools": tools[:1].upper() + tools[1:],
        "shared_families": ", ".join(families),
        "mail_service": mail_service,
        "sign_in": _sign_in_sentence(mail_service),
        "tls": tls,
        # Over https the banner's cookie carries the __Host- prefix (see static/consent.js).
        "consent_cookie": "__Host-opulon_consent" if tls else "opulon_consent",
        "upstream_tls": upstream_tls,
    }
    return _environment().get_template("privacy_policy.txt").render(context)


def _sign_in_sentence(mail_service: str | None) -> str:
    """What signing in on /key-status by email keeps (only where the gateway sends email)."""
    if not mail_service:
        return ""
    return (
        "If you sign in on /key-status with your email address, the sign-in code is sent to "
        f"it through {mail_service}, and we keep only keyed hashes of the address, the code "
        "and your session, until they expire.\n"
    )


@functools.cache
def _environment() -> Environment:
    return environment()
