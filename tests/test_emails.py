"""What the key email says, in plain text and HTML (opulon.web.emails)."""

from __future__ import annotations

import html
from datetime import UTC, datetime

import pytest

from opulon.email_settings import EmailSettings
from opulon.errors import ConfigError
from opulon.keys import KeyStore
from opulon.limits import parse_budget, parse_limit
from opulon.storage import Store
from opulon.web.emails import key_mail, settings_test_mail

SETTINGS = EmailSettings(
    provider="resend",
    sender="Opulon <keys@example.com>",
    base_url="https://api.resend.com",
    public_url="https://api.example.com",
    has_secret=True,
)
EXPIRES = datetime(2027, 1, 31, 12, 0, tzinfo=UTC).timestamp()


def test_the_key_email_names_the_gateway_the_key_its_limits_and_the_sdks(store: Store) -> None:
    record, full_key = KeyStore(store).create(
        "alice",
        email="alice@example.com",
        limits=[parse_limit("requests:60/1m"), parse_limit("tokens:1.5M/5h"),
                parse_budget("tokens:100M")],
        concurrency=4,
        models=["gpt-4o*", "claude-*"],
        expires_at=EXPIRES,
    )  # fmt: skip
    mail = key_mail(record, full_key, SETTINGS)
    assert mail.to == "alice@example.com"
    assert mail.subject == "Your API key for api.example.com"
    for body in (mail.text, mail.html):
        assert full_key in body
        assert body.count(full_key) == 1  # the snippets read it from the environment
        assert "https://api.example.com" in body
        assert "60 requests per minute" in body
        assert "1,500,000 tokens (input and output) per 5 hours" in body
        assert "100,000,000 tokens (input and output) in all" in body
        assert "4 requests at a time" in body
        assert "gpt-4o*, claude-*" in body
        assert "2027-01-31 12:00 UTC" in body
        assert "https://api.example.com/key-status" in body
    sdk_lines = (
        "from openai import OpenAI",
        'OpenAI(base_url="https://api.example.com/v1", api_key=os.environ["OPULON_API_KEY"])',
        "from anthropic import Anthropic",
        'Anthropic(base_url="https://api.example.com", api_key=os.environ["OPULON_API_KEY"])',
    )
    for line in sdk_lines:
        assert line in mail.text
        assert line in html.unescape(mail.html)


def test_a_key_without_limits_or_expiry_says_so(store: Store) -> None:
    record, full_key = KeyStore(store).create("bob", email="bob@example.com")
    mail = key_mail(record, full_key, SETTINGS)
    assert "none set by your administrator" in mail.text
    assert "Expires: never" in mail.text
    assert "every model the gateway serves" in mail.text


def test_the_html_escapes_what_an_admin_typed(store: Store) -> None:
    record, full_key = KeyStore(store).create(
        "<script>alert(1)</script>", email="carol@example.com"
    )
    mail = key_mail(record, full_key, SETTINGS)
    assert "<script>" not in mail.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in mail.html
    assert '"<script>alert(1)</script>"' in mail.text  # plain text is not markup


def test_a_key_email_needs_the_gateways_public_url(store: Store) -> None:
    record, full_key = KeyStore(store).create("dave", email="dave@example.com")
    without = EmailSettings(provider="resend", sender="keys@example.com")
    with pytest.raises(ConfigError, match="--public-url"):
        key_mail(record, full_key, without)


def test_the_test_email_holds_no_key() -> None:
    mail = settings_test_mail("admin@example.com", SETTINGS)
    assert mail.to == "admin@example.com"
    assert "op-ul-" not in mail.text + mail.html
    assert "Resend" in mail.text and "https://api.example.com" in mail.html
