"""What Opulon's emails say: each one plain text and HTML, from templates in ``templates/email/``.

The HTML is autoescaped, the plain text is not (it is no markup). Rendering stores nothing:
a mail lives in memory until it is handed to the :class:`~opulon.mail.Mailer`.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from opulon.email_settings import EmailSettings
from opulon.errors import ConfigError
from opulon.formatting import MINUTE, grouped, utc, window_text
from opulon.keys import KeyRecord
from opulon.limits import Limit
from opulon.mail import Mail

__all__ = ["key_mail", "limit_lines", "render", "settings_test_mail"]

_METRIC_WORDS = {
    "requests": "requests",
    "tokens": "tokens (input and output)",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
}


@cache
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("opulon", "web/templates/email"),
        autoescape=select_autoescape(enabled_extensions=("html",), default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, context: dict[str, Any]) -> tuple[str, str]:
    """(plain text, HTML) of an email: ``templates/email/<template>.txt`` and ``.html``."""
    env = _environment()
    return (
        env.get_template(f"{template}.txt").render(context),
        env.get_template(f"{template}.html").render(context),
    )


def _limit_line(limit: Limit) -> str:
    amount = f"{grouped(limit.amount)} {_METRIC_WORDS.get(limit.metric, limit.metric)}"
    if limit.window_seconds is None:
        return f"{amount} in all (the key's lifetime budget)"
    window = window_text(limit.window_seconds).removeprefix("1 ")
    return f"{amount} per {window}, rolling (what the last {window} used counts)"


def limit_lines(record: KeyRecord) -> list[str]:
    """The key's limits in words, one a line; empty when it has none."""
    lines = [_limit_line(limit) for limit in record.limits if not limit.is_budget]
    lines += [_limit_line(limit) for limit in record.limits if limit.is_budget]
    if record.concurrency:
        lines.append(f"{record.concurrency} requests at a time")
    return lines


def public_url_of(settings: EmailSettings) -> str:
    """The gateway's public URL; ConfigError saying how to set it when there is none."""
    if not settings.public_url:
        raise ConfigError(
            "the emails need the gateway's public URL: run opulon site configure "
            "--public-url https://..."
        )
    return settings.public_url


def key_mail(
    record: KeyRecord, full_key: str, settings: EmailSettings, *, now: float | None = None
) -> Mail:
    """The email that delivers ``full_key`` to the key's owner (``record.email``).

    It names the gateway (its public URL), gives the key, its limits, allowed models and
    expiry, and shows how to use it with the OpenAI and Anthropic SDKs.
    """
    if not record.email:
        raise ConfigError(f"the key {record.prefix} has no email address")
    gateway = public_url_of(settings)
    when = time.time() if now is None else now
    context: dict[str, Any] = {
        "gateway": gateway,
        "openai_base_url": gateway + "/v1",
        "status_url": gateway + "/key-status",
        "name": record.name,
        "prefix": record.prefix,
        "key": full_key,
        "limits": limit_lines(record),
        "models": list(record.models),
        "expires": utc(record.expires_at, MINUTE) + " UTC" if record.expires_at else None,
        "expired": record.expires_at is not None and record.expires_at <= when,
    }
    text, html = render("key", context)
    return Mail(
        to=record.email,
        subject=f"Your API key for {gateway.split('://', 1)[1]}",
        text=text,
        html=html,
    )


def settings_test_mail(to: str, settings: EmailSettings) -> Mail:
    """A short email that shows the settings work (``opulon email test``); it holds no key."""
    context: dict[str, Any] = {
        "gateway": settings.public_url,
        "provider": settings.provider_name,
        "sender": settings.sender,
    }
    text, html = render("test", context)
    return Mail(to=to, subject="Opulon test email", text=text, html=html)
