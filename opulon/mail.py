"""Sending an email: one :class:`Mail`, through the configured service.

A :class:`Mailer` sends a mail or raises :class:`MailError` with one line that says what
happened. Three transports: Resend (``POST /emails``) and SendGrid (``POST /v3/mail/send``)
over their HTTP APIs with httpx, and any SMTP server with the standard library. Each tries a
mail at most :data:`ATTEMPTS` times: again after a 429, a 5xx (or an SMTP 4xx, which SMTP
means as "try again later"), waiting 0.5 s, then 1 s, or what a short ``Retry-After`` asks;
never after another 4xx, a timeout or a refused connection. What the emails say is not
decided here: :mod:`opulon.web.emails` renders them.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from opulon import __version__
from opulon.email_settings import EmailSettings, EmailSettingsStore, validate_address
from opulon.errors import InvalidInput, OpulonError
from opulon.storage import Store

__all__ = [
    "ATTEMPTS",
    "Mail",
    "MailError",
    "Mailer",
    "ResendMailer",
    "SendGridMailer",
    "SmtpMailer",
    "load_mailer",
    "mailer_for",
]

ATTEMPTS = 3
BACKOFF_SECONDS = (0.5, 1.0)  # before the second and the third attempt
MAX_RETRY_AFTER = 5.0  # a longer Retry-After is reported, not waited for
_MESSAGE_CHARS = 300
USER_AGENT = f"opulon/{__version__}"


@dataclass(frozen=True, slots=True)
class Mail:
    """One email to one address: a subject, a plain-text body and the same as HTML."""

    to: str
    subject: str
    text: str
    html: str


class MailError(OpulonError):
    """A mail was not sent; the message is one line saying what happened."""


class Mailer(Protocol):
    """Sends mails through one email service."""

    def send(self, mail: Mail) -> None:
        """Send ``mail`` (retrying 429 and 5xx a few times), or raise :class:`MailError`."""
        ...


Sleep = Callable[[float], None]


def _one_line(text: str, secret: str | None = None) -> str:
    line = " ".join(text.split())
    if secret:
        line = line.replace(secret, "[redacted]")
    return line if len(line) <= _MESSAGE_CHARS else line[: _MESSAGE_CHARS - 1] + "…"


def _check_recipient(mail: Mail) -> None:
    """One plain address: nothing that a header or an API would read as a second recipient."""
    try:
        validate_address(mail.to)
    except InvalidInput:
        raise MailError(f"not sent: {mail.to!r} is not one email address") from None


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` in seconds (the HTTP-date form is treated as absent)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _os_reason(exc: BaseException) -> str:
    """The OS-level cause inside an httpx/httpcore error: ConnectionRefusedError, gaierror, ..."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError):
            return type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return _one_line(str(exc)) or type(exc).__name__


class _HttpMailer:
    """What Resend and SendGrid share: a JSON POST with a bearer token, and its retries."""

    name = ""
    path = ""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        sender: str,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        sleep: Sleep = time.sleep,
    ) -> None:
        self._api_key = api_key
        self._url = base_url.rstrip("/") + self.path
        self._sender = sender
        self._timeout = timeout
        self._client = client
        self._sleep = sleep

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self._url!r})"

    def _body(self, mail: Mail) -> dict[str, Any]:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self._api_key}",
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }

    def _error_text(self, response: httpx.Response) -> str:
        raise NotImplementedError

    def send(self, mail: Mail) -> None:
        _check_recipient(mail)
        body = json.dumps(self._body(mail), ensure_ascii=False).encode()
        headers = self._headers()
        if self._client is not None:
            self._attempts(self._client, body, headers)
            return
        with httpx.Client(trust_env=False, timeout=self._timeout, follow_redirects=False) as http:
            self._attempts(http, body, headers)

    def _attempts(self, http: httpx.Client, body: bytes, headers: dict[str, str]) -> None:
        for attempt in range(ATTEMPTS):
            response = self._post(http, body, headers)
            if response.is_success:
                return
            delay = self._retry_delay(response, attempt)
            if delay is None:
                raise MailError(self._failure(response))
            self._sleep(delay)

    def _post(self, http: httpx.Client, body: bytes, headers: dict[str, str]) -> httpx.Response:
        parts = urlsplit(self._url)
        where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        try:
            response = http.post(self._url, content=body, headers=headers, timeout=self._timeout)
            response.read()
            return response
        except httpx.TimeoutException:
            raise MailError(f"{self.name} did not answer within {self._timeout:g} s") from None
        except httpx.ConnectError as exc:
            raise MailError(f"cannot connect to {where} ({_os_reason(exc)})") from None
        except httpx.HTTPError as exc:
            raise MailError(
                f"{self.name}: the request to {where} failed ({type(exc).__name__}: "
                f"{_one_line(str(exc), self._api_key)})"
            ) from None

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """How long to wait before trying again, or None not to."""
        status = response.status_code
        if not (status == 429 or status >= 500) or attempt + 1 >= ATTEMPTS:
            return None
        asked = _retry_after(response.headers.get("retry-after"))
        if asked is not None and asked > MAX_RETRY_AFTER:
            return None
        return max(BACKOFF_SECONDS[attempt], asked or 0.0)

    def _failure(self, response: httpx.Response) -> str:
        status = response.status_code
        text = self._error_text(response) or response.reason_phrase or "no message"
        line = f"{self.name} answered HTTP {status}: {_one_line(text, self._api_key)}"
        if status == 429 or status >= 500:
            asked = _retry_after(response.headers.get("retry-after"))
            if asked is not None and asked > MAX_RETRY_AFTER:
                line += f" (it asks to wait {asked:g} s)"
            else:
                line += f" (after {ATTEMPTS} attempts)"
        return line


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class ResendMailer(_HttpMailer):
    """Resend: ``POST {base}/emails`` with ``from``, ``to``, ``subject``, ``html``, ``text``.

    An ``Idempotency-Key``, the same on every attempt of one mail, lets Resend drop a retry
    of a mail it had accepted before failing to answer.
    """

    name = "Resend"
    path = "/emails"

    def _body(self, mail: Mail) -> dict[str, Any]:
        return {
            "from": self._sender,
            "to": [mail.to],
            "subject": mail.subject,
            "html": mail.html,
            "text": mail.text,
        }

    def _headers(self) -> dict[str, str]:
        # Called once per mail: every attempt of the mail carries the same key.
        return {**super()._headers(), "idempotency-key": str(uuid.uuid4())}

    def _error_text(self, response: httpx.Response) -> str:
        # Resend's errors: {"statusCode": 422, "name": "validation_error", "message": "..."}
        data = _json(response)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            name = data.get("name")
            return f"{data['message']} ({name})" if isinstance(name, str) else data["message"]
        return response.text[:_MESSAGE_CHARS]


class SendGridMailer(_HttpMailer):
    """SendGrid: ``POST {base}/v3/mail/send`` with ``personalizations``, ``from``, ``subject``
    and ``content`` (text/plain first, as SendGrid requires); 202 when accepted."""

    name = "SendGrid"
    path = "/v3/mail/send"

    def _body(self, mail: Mail) -> dict[str, Any]:
        sender_name, sender_address = parseaddr(self._sender)
        sender: dict[str, str] = {"email": sender_address}
        if sender_name:
            sender["name"] = sender_name
        return {
            "personalizations": [{"to": [{"email": mail.to}]}],
            "from": sender,
            "subject": mail.subject,
            "content": [
                {"type": "text/plain", "value": mail.text},
                {"type": "text/html", "value": mail.html},
            ],
        }

    def _error_text(self, response: httpx.Response) -> str:
        # SendGrid's errors: {"errors": [{"message": "...", "field": "...", "help": ...}]}
        data = _json(response)
        errors = data.get("errors") if isinstance(data, dict) else None
        if isinstance(errors, list):
            messages = []
            for error in errors[:3]:
                if isinstance(error, dict) and isinstance(error.get("message"), str):
                    field = error.get("field")
                    suffix = f" ({field})" if isinstance(field, str) and field else ""
                    messages.append(error["message"] + suffix)
            if messages:
                return "; ".join(messages)
        return response.text[:_MESSAGE_CHARS]


class SmtpMailer:
    """Any SMTP server: STARTTLS (certificate checked) when asked, login when a user is set."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        starttls: bool = True,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        sleep: Sleep = time.sleep,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._sender = sender
        self._starttls = starttls
        self._user = user
        self._password = password
        self._timeout = timeout
        self._sleep = sleep
        self._tls_context = tls_context

    def __repr__(self) -> str:  # never the password
        return f"SmtpMailer({self._host!r}, {self._port})"

    @property
    def _where(self) -> str:
        return f"{self._host}:{self._port}"

    def message(self, mail: Mail) -> EmailMessage:
        """The multipart/alternative message: the plain text, then the HTML."""
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = mail.to
        message["Subject"] = mail.subject
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["Message-ID"] = make_msgid(domain=self._sender.rpartition("@")[2].rstrip(">"))
        message.set_content(mail.text)
        message.add_alternative(mail.html, subtype="html")
        return message

    def send(self, mail: Mail) -> None:
        _check_recipient(mail)
        try:
            message = self.message(mail)
        except ValueError as exc:  # a header the email package refuses (a line break, say)
            raise MailError(f"the mail could not be written: {exc}") from None
        for attempt in range(ATTEMPTS):
            transient = self._attempt(message)
            if transient is None:
                return
            if attempt + 1 >= ATTEMPTS:
                raise MailError(f"{transient} (after {ATTEMPTS} attempts)")
            self._sleep(BACKOFF_SECONDS[attempt])

    def _attempt(self, message: EmailMessage) -> str | None:
        """Send once: None when sent, the reply of a transient (4xx) refusal to retry after."""
        try:
            self._deliver(message)
        except smtplib.SMTPRecipientsRefused as exc:
            replies = list(exc.recipients.values())
            code, text = replies[0] if replies else (550, b"recipient refused")
            return self._refusal(code, text)
        except smtplib.SMTPResponseException as exc:
            return self._refusal(exc.smtp_code, exc.smtp_error)
        except smtplib.SMTPNotSupportedError:
            raise MailError(
                f"the SMTP server {self._where} does not offer STARTTLS "
                "(configure --no-smtp-starttls only for a server on this machine)"
            ) from None
        except smtplib.SMTPServerDisconnected as exc:
            if "timed out" in str(exc):  # smtplib's word for a reply that did not come
                raise MailError(
                    f"the SMTP server {self._where} did not answer within {self._timeout:g} s"
                ) from None
            raise MailError(
                f"the SMTP server {self._where} closed the connection ({_one_line(str(exc))})"
            ) from None
        except smtplib.SMTPException as exc:
            raise MailError(f"the SMTP server {self._where}: {_one_line(str(exc))}") from None
        except ssl.SSLError as exc:
            raise MailError(
                f"TLS with the SMTP server {self._where} failed ({exc.reason or exc})"
            ) from None
        except TimeoutError:
            raise MailError(
                f"the SMTP server {self._where} did not answer within {self._timeout:g} s"
            ) from None
        except OSError as exc:
            raise MailError(f"cannot connect to {self._where} ({type(exc).__name__})") from None
        return None

    def _refusal(self, code: int, text: bytes | str) -> str:
        reply = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        line = f"the SMTP server {self._where} answered {code}: {_one_line(reply, self._password)}"
        if 400 <= code < 500:
            return line
        raise MailError(line)

    def _deliver(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self._host, self._port, timeout=self._timeout) as smtp:
            if self._starttls:
                smtp.starttls(context=self._tls_context or ssl.create_default_context())
            if self._user is not None:
                smtp.login(self._user, self._password or "")
            smtp.send_message(message, to_addrs=[str(message["To"])])


def mailer_for(settings: EmailSettings, secret: str | None, *, sleep: Sleep = time.sleep) -> Mailer:
    """The mailer of these settings, with their secret (the API key or SMTP password)."""
    if settings.provider == "smtp":
        return SmtpMailer(
            host=settings.smtp_host or "",
            port=settings.smtp_port or 587,
            sender=settings.sender,
            starttls=settings.smtp_starttls,
            user=settings.smtp_user,
            password=secret,
            timeout=settings.timeout,
            sleep=sleep,
        )
    kind = ResendMailer if settings.provider == "resend" else SendGridMailer
    return kind(
        api_key=secret or "",
        base_url=settings.base_url or "",
        sender=settings.sender,
        timeout=settings.timeout,
        sleep=sleep,
    )


def load_mailer(store: Store) -> Mailer | None:
    """The mailer of the stored email settings; None when email is not configured."""
    stored = EmailSettingsStore(store)
    settings = stored.get()
    if settings is None:
        return None
    return mailer_for(settings, stored.secret())
