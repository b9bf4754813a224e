"""The email settings: which service sends Opulon's emails, from whom, and for which gateway.

One row in ``email_settings`` (migration m006): the provider (``resend``, ``sendgrid`` or
``smtp``), the sender, the provider's API root or the SMTP server, and the gateway's public
URL that the emails name. The provider's API key or the SMTP password is stored only
encrypted under the master key (AES-256-GCM, bound to the row by its context), like a
provider key; :class:`EmailSettings` never holds it.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, replace
from email.headerregistry import Address
from email.utils import getaddresses, parseaddr
from typing import Any
from urllib.parse import urlsplit

from opulon.crypto import DecryptionError
from opulon.errors import ConfigError, InvalidInput, NotFound
from opulon.providers import is_loopback
from opulon.storage import Store

PROVIDERS = ("resend", "sendgrid", "smtp")
HTTP_PROVIDERS = ("resend", "sendgrid")
#: The public API root of each HTTP provider, used when no ``--base-url`` is given.
DEFAULT_BASE_URLS = {"resend": "https://api.resend.com", "sendgrid": "https://api.sendgrid.com"}
PROVIDER_NAMES = {"resend": "Resend", "sendgrid": "SendGrid", "smtp": "SMTP"}
DEFAULT_SMTP_PORT = 587
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 120.0
_ADDRESS_RE = re.compile(r"[^@\s<>\"(),;:\[\]]+@[^@\s<>\"(),;:\[\]]+\.[^@\s<>\"(),;:\[\]]+")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]+")

_COLUMNS = (
    "provider, sender, base_url, public_url, smtp_host, smtp_port, smtp_starttls, smtp_user, "
    "timeout, secret_ciphertext"
)


@dataclass(frozen=True, slots=True)
class EmailSettings:
    """The stored email settings, without their secret."""

    provider: str  # resend | sendgrid | smtp
    sender: str  # the From as given, e.g. "Opulon <keys@example.com>"
    base_url: str | None = None  # HTTP providers: the API root, e.g. https://api.resend.com
    public_url: str | None = None  # the gateway's public URL, e.g. https://api.example.com
    smtp_host: str | None = None
    smtp_port: int | None = None
    smtp_starttls: bool = True
    smtp_user: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds to wait for the provider, per attempt
    has_secret: bool = False

    @property
    def provider_name(self) -> str:
        """How people write the provider's name: Resend, SendGrid, SMTP."""
        return PROVIDER_NAMES[self.provider]

    @property
    def sender_name(self) -> str:
        return parseaddr(self.sender)[0]

    @property
    def sender_address(self) -> str:
        return parseaddr(self.sender)[1]

    def to_json(self) -> dict[str, Any]:
        """What ``opulon email show --json`` prints: every setting, and whether a secret is set."""
        data: dict[str, Any] = {
            "provider": self.provider,
            "from": self.sender,
            "public_url": self.public_url,
            "timeout": self.timeout,
        }
        if self.provider == "smtp":
            data.update(
                smtp_host=self.smtp_host,
                smtp_port=self.smtp_port,
                smtp_starttls=self.smtp_starttls,
                smtp_user=self.smtp_user,
                password="set" if self.has_secret else None,
            )
        else:
            data.update(base_url=self.base_url, api_key="set" if self.has_secret else None)
        return data


def validate_provider(provider: str) -> str:
    cleaned = provider.strip().lower()
    if cleaned not in PROVIDERS:
        raise InvalidInput(f"invalid --provider {provider!r}: use resend, sendgrid or smtp")
    return cleaned


def validate_address(address: str, *, what: str = "email address") -> str:
    """A bare address (``name@example.com``), or InvalidInput; no line breaks can pass."""
    cleaned = address.strip()
    if not _ADDRESS_RE.fullmatch(cleaned):
        raise InvalidInput(f"invalid {what} {address!r}: expected name@example.com")
    return cleaned


def validate_sender(sender: str) -> str:
    """``keys@example.com`` or ``Opulon <keys@example.com>``, normalised; InvalidInput otherwise."""
    if _has_control(sender):
        raise InvalidInput("invalid --from: no line breaks or control characters")
    name, address = parseaddr(sender.strip())
    if not address or "<" in name or ">" in name or len(getaddresses([sender])) != 1:
        raise InvalidInput(
            f'invalid --from {sender!r}: expected keys@example.com or "Opulon <keys@example.com>"'
        )
    validate_address(address, what="--from address")
    # Address quotes a name that needs it and keeps it readable (no RFC 2047 encoding here:
    # each transport encodes what it sends).
    return str(Address(display_name=name.strip(), addr_spec=address)) if name.strip() else address


def _has_control(text: str) -> bool:
    """Line breaks, control or format characters, or separators other than the space."""
    return any(unicodedata.category(ch)[0] == "C" or (ch != " " and ch.isspace()) for ch in text)


_PUBLIC_URL_RE = re.compile(
    r"https?://(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
    r"(?:/[A-Za-z0-9._~/-]*)?"
)


def _http_url(url: str, *, what: str, example: str) -> str:
    cleaned = url.strip().rstrip("/")
    if _has_control(cleaned) or " " in cleaned:
        raise InvalidInput(f"invalid {what} {url!r}: no spaces or control characters")
    parts = urlsplit(cleaned)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"invalid {what} {url!r}: expected {example}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidInput(f"invalid {what} {url!r}: no query, fragment or user name")
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise InvalidInput(
            f"invalid {what} {url!r}: use https; plain http is only for this machine "
            "(127.0.0.1, localhost)"
        )
    return cleaned


def validate_base_url(url: str) -> str:
    """An HTTP provider's API root: https anywhere, http only to this machine."""
    return _http_url(url, what="--base-url", example="https://host[:port][/path]")


def validate_public_url(url: str) -> str:
    """The gateway's public URL, without a trailing ``/v1`` (the emails add it where due)."""
    cleaned = _http_url(url, what="--public-url", example="https://api.example.com")
    # The pages and emails print it inside code examples and links: a host, a port and a
    # plain path, nothing a reader could mistake for more code.
    if not _PUBLIC_URL_RE.fullmatch(cleaned):
        raise InvalidInput(
            f"invalid --public-url {url!r}: a host name or address, a port and a path of "
            "letters, digits and . _ ~ / - only"
        )
    return cleaned[: -len("/v1")] if cleaned.endswith("/v1") else cleaned


def validate_timeout(seconds: float) -> float:
    if not 0 < seconds <= MAX_TIMEOUT:
        raise InvalidInput(
            f"invalid --timeout {seconds:g}: seconds, more than 0 and at most {MAX_TIMEOUT:g}"
        )
    return float(seconds)


def _validate_smtp(host: str | None, port: int | None, starttls: bool, user: str | None) -> None:
    if not host or not _HOST_RE.fullmatch(host):
        raise InvalidInput(
            f"invalid --smtp-host {host!r}: expected a host name, e.g. smtp.example.com"
        )
    if port is None or not 0 < port < 65536:
        raise InvalidInput(f"invalid --smtp-port {port!r}: 1 to 65535, e.g. 587")
    if user is not None and (not user.strip() or any(ch in user for ch in "\r\n\0")):
        raise InvalidInput("invalid --smtp-user: empty or with a line break")
    if not starttls and not is_loopback(host.strip("[]")):
        # Key mails carry whole API keys, and sign-in mails their codes.
        raise InvalidInput(
            "keys and sign-in codes would cross the network unencrypted: keep --smtp-starttls, "
            "or use an SMTP server on this machine (127.0.0.1, localhost)"
        )


def _validate_secret(secret: str | None, *, provider: str, smtp_user: str | None) -> None:
    if provider in HTTP_PROVIDERS:
        if secret is None:
            raise InvalidInput(f"{PROVIDER_NAMES[provider]} needs its API key")
        if not secret.strip() or any(ch.isspace() for ch in secret.strip()):
            raise InvalidInput("the API key is empty or contains spaces")
    elif secret is not None and smtp_user is None:
        raise InvalidInput("an SMTP password needs --smtp-user")
    elif smtp_user is not None and not secret:
        raise InvalidInput(
            "--smtp-user needs the SMTP password (--password-env or --password-stdin)"
        )
    if secret is not None and any(ch in secret for ch in "\r\n\0"):
        raise InvalidInput("the secret contains a line break")


def _context(provider: str) -> bytes:
    # Binds the ciphertext to the email settings of this provider: it cannot stand in for a
    # provider key or a key's secret, nor move between email providers.
    return f"email-settings:{provider}".encode()


class EmailSettingsStore:
    """The email settings in the database: at most one row."""

    def __init__(self, store: Store) -> None:
        self._db = store.db
        self._master = store.master_key

    def configure(
        self,
        *,
        provider: str,
        sender: str,
        secret: str | None,
        base_url: str | None = None,
        public_url: str | None = None,
        smtp_host: str | None = None,
        smtp_port: int | None = None,
        smtp_starttls: bool = True,
        smtp_user: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> EmailSettings:
        """Validate and store new settings in place of any there were."""
        provider = validate_provider(provider)
        settings = EmailSettings(
            provider=provider,
            sender=validate_sender(sender),
            public_url=validate_public_url(public_url) if public_url is not None else None,
            timeout=validate_timeout(timeout),
            has_secret=bool(secret),
        )
        if provider in HTTP_PROVIDERS:
            if smtp_host is not None or smtp_user is not None or smtp_port is not None:
                raise InvalidInput(
                    "--smtp-host, --smtp-port and --smtp-user are for --provider smtp"
                )
            url = validate_base_url(base_url or DEFAULT_BASE_URLS[provider])
            settings = replace(settings, base_url=url)
        else:
            if base_url is not None:
                raise InvalidInput("--base-url is for resend and sendgrid; SMTP takes --smtp-host")
            port = DEFAULT_SMTP_PORT if smtp_port is None else smtp_port
            _validate_smtp(smtp_host, port, smtp_starttls, smtp_user)
            settings = replace(
                settings,
                smtp_host=(smtp_host or "").strip(),
                smtp_port=port,
                smtp_starttls=smtp_starttls,
                smtp_user=smtp_user.strip() if smtp_user else None,
            )
        _validate_secret(secret, provider=provider, smtp_user=settings.smtp_user)
        ciphertext = (
            self._master.encrypt(secret.strip().encode(), context=_context(provider))
            if secret
            else None
        )
        with self._db.atomic():
            self._db.execute("DELETE FROM email_settings")
            self._db.execute(
                f"INSERT INTO email_settings (id, {_COLUMNS}, updated_at) "
                "VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    settings.provider,
                    settings.sender,
                    settings.base_url,
                    settings.public_url,
                    settings.smtp_host,
                    settings.smtp_port,
                    int(settings.smtp_starttls),
                    settings.smtp_user,
                    settings.timeout,
                    ciphertext,
                    time.time(),
                ],
            )
        return settings

    def _row(self) -> tuple[Any, ...] | None:
        # Without a public URL of their own, the emails name the site's (opulon site configure).
        columns = _COLUMNS.replace(
            "public_url",
            "COALESCE(public_url, (SELECT public_url FROM site_settings WHERE id = 1))",
        )
        row: tuple[Any, ...] | None = self._db.execute(
            f"SELECT {columns} FROM email_settings WHERE id = 1"
        ).fetchone()
        return row

    def get(self) -> EmailSettings | None:
        """The settings, or None when email is not configured."""
        row = self._row()
        if row is None:
            return None
        provider, sender, base_url, public_url, host, port, starttls, user, timeout, secret = row
        return EmailSettings(
            provider=provider,
            sender=sender,
            base_url=base_url,
            public_url=public_url,
            smtp_host=host,
            smtp_port=port,
            smtp_starttls=bool(starttls),
            smtp_user=user,
            timeout=float(timeout),
            has_secret=secret is not None,
        )

    def require(self) -> EmailSettings:
        """The settings; ConfigError naming the command that sets them when there are none."""
        settings = self.get()
        if settings is None:
            raise ConfigError(
                "email is not configured: run opulon email configure --provider ... --from ..."
            )
        return settings

    def secret(self) -> str | None:
        """The decrypted API key or SMTP password (in memory only), or None."""
        row = self._row()
        if row is None or row[-1] is None:
            return None
        try:
            return self._master.decrypt(bytes(row[-1]), context=_context(row[0])).decode()
        except DecryptionError:
            raise ConfigError(
                "the stored email secret cannot be decrypted with this master key: "
                "run opulon email configure again"
            ) from None

    def remove(self) -> EmailSettings:
        """Delete the settings and their secret; NotFound when there are none."""
        settings = self.get()
        if settings is None:
            raise NotFound("email is not configured; nothing to remove")
        self._db.execute("DELETE FROM email_settings")
        return settings


def load_email_settings(store: Store) -> EmailSettings | None:
    """The stored email settings, or None when email is not configured."""
    return EmailSettingsStore(store).get()
