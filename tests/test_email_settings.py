"""The stored email settings (opulon.email_settings) and the mailer they make (opulon.mail)."""

from __future__ import annotations

import pytest
from mail_fakes import fake_api

from opulon.email_settings import EmailSettingsStore, load_email_settings, validate_sender
from opulon.errors import ConfigError, InvalidInput, NotFound
from opulon.mail import Mail, MailError, ResendMailer, SendGridMailer, SmtpMailer, load_mailer
from opulon.storage import Store

SECRET = "re_settings_test_secret_0123456789"


def test_nothing_is_configured_at_first(store: Store) -> None:
    assert load_email_settings(store) is None
    assert load_mailer(store) is None
    with pytest.raises(ConfigError, match="email is not configured"):
        EmailSettingsStore(store).require()
    with pytest.raises(NotFound):
        EmailSettingsStore(store).remove()


def test_the_secret_is_stored_encrypted_and_bound_to_its_provider(store: Store) -> None:
    stored = EmailSettingsStore(store)
    stored.configure(provider="resend", sender="keys@example.com", secret=SECRET)
    (ciphertext,) = store.db.execute("SELECT secret_ciphertext FROM email_settings").fetchone()
    assert SECRET.encode() not in bytes(ciphertext)
    assert stored.secret() == SECRET
    # The same ciphertext under another provider's row does not decrypt: it is bound to it.
    store.db.execute("UPDATE email_settings SET provider = 'sendgrid'")
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        stored.secret()


def test_configure_replaces_the_settings_and_makes_the_matching_mailer(store: Store) -> None:
    stored = EmailSettingsStore(store)
    stored.configure(provider="resend", sender="keys@example.com", secret=SECRET)
    assert isinstance(load_mailer(store), ResendMailer)
    stored.configure(provider="sendgrid", sender="keys@example.com", secret=SECRET)
    assert isinstance(load_mailer(store), SendGridMailer)
    stored.configure(
        provider="smtp", sender="keys@example.com", secret=None, smtp_host="127.0.0.1",
        smtp_starttls=False,
    )  # fmt: skip
    assert isinstance(load_mailer(store), SmtpMailer)
    assert store.db.execute("SELECT count(*) FROM email_settings").fetchone()[0] == 1
    assert stored.secret() is None
    stored.remove()
    assert load_mailer(store) is None


def test_the_loaded_mailer_sends_with_the_stored_key(store: Store) -> None:
    with fake_api("resend") as fake:
        fake.api_key = SECRET
        EmailSettingsStore(store).configure(
            provider="resend", sender="keys@example.com", secret=SECRET, base_url=fake.url
        )
        mailer = load_mailer(store)
        assert mailer is not None
        mailer.send(Mail(to="a@example.com", subject="s", text="t", html="<p>t</p>"))
    assert fake.problems == [] and len(fake.sent) == 1


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("keys@example.com", "keys@example.com"),
        ("  Opulon <keys@example.com> ", "Opulon <keys@example.com>"),
        ('"Opulon, Inc" <keys@example.com>', '"Opulon, Inc" <keys@example.com>'),
        ("Jörg <keys@example.com>", "Jörg <keys@example.com>"),
    ],
)
def test_senders(given: str, stored: str) -> None:
    assert validate_sender(given) == stored


@pytest.mark.parametrize(
    "sender",
    [
        "", "keys", "Opulon <keys@example.com>, other@example.com", "a@b.c\nBcc: x@y.z", "<>",
        "Opulon\u2028 <keys@example.com>", "Opulon\x07 <keys@example.com>",
    ],
)  # fmt: skip
def test_bad_senders(sender: str) -> None:
    with pytest.raises(InvalidInput):
        validate_sender(sender)


@pytest.mark.parametrize(
    "to", ["a@example.com, b@example.com", "A <a@example.com>", "a@example.com\r\nBcc: b@c.d"]
)
def test_a_mail_goes_to_one_plain_address_only(to: str) -> None:
    mailer = ResendMailer(api_key="k", base_url="http://127.0.0.1:9", sender="keys@example.com")
    with pytest.raises(MailError, match="is not one email address"):
        mailer.send(Mail(to=to, subject="s", text="t", html="t"))


def test_urls_with_control_characters_or_spaces_are_refused(store: Store) -> None:
    stored = EmailSettingsStore(store)
    for url in (
        "https://a.example/x\r\nBcc: e@x.com",
        "https://a.example/\u2028x",
        "https://a b.example",
    ):
        with pytest.raises(InvalidInput, match="no spaces or control characters"):
            stored.configure(
                provider="resend", sender="keys@example.com", secret=SECRET, public_url=url
            )


def test_smtp_without_starttls_is_only_for_a_server_on_this_machine(store: Store) -> None:
    stored = EmailSettingsStore(store)
    with pytest.raises(InvalidInput, match="unencrypted"):
        stored.configure(
            provider="smtp", sender="keys@example.com", secret=None,
            smtp_host="smtp.example.com", smtp_starttls=False,
        )  # fmt: skip
    assert load_mailer(store) is None
