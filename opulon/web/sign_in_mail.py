"""The mail with a sign-in code, from ``templates/email/signin_code.txt`` and ``.html``."""

from __future__ import annotations

from opulon.mail import Mail
from opulon.web.emails import render

__all__ = ["SUBJECT", "sign_in_code_mail"]

SUBJECT = "Your Opulon sign-in code"


def sign_in_code_mail(to: str, code: str, *, gateway_url: str | None = None) -> Mail:
    """The mail that brings ``code`` to ``to``; ``gateway_url`` names the gateway if known."""
    context = {"code": code, "gateway_url": gateway_url.rstrip("/") if gateway_url else None}
    text, html = render("signin_code", context)
    return Mail(to=to, subject=SUBJECT, text=text, html=html)
