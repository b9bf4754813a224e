"""Fake email services on 127.0.0.1 for the mail tests: Resend, SendGrid and an SMTP server.

The HTTP fakes check each request as the real API expects it (path, ``Authorization``, JSON
body; anything else is answered with the API's own 400 error shape and counted as a
problem), record what was sent, and answer with scripted replies: a status, a body, headers,
or a delay before answering (for timeouts). The SMTP fake is aiosmtpd's server, without
STARTTLS, with optional login and scripted replies to DATA.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

API_KEY = "re_fake_api_key_0123456789abcdef"
SMTP_PASSWORD = "smtp-fake-password-0123456789"
MAX_DELAY = 5.0  # no scripted delay keeps a handler longer
# The fake takes a password without TLS, as a server on this machine may, and aiosmtpd warns
# about it: the test modules that log in set this as their pytestmark.
QUIET_AUTH_WITHOUT_TLS = pytest.mark.filterwarnings(
    "ignore:Requiring AUTH while not requiring TLS:UserWarning"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Reply:
    """One scripted answer: status, JSON body (or none), headers, and a delay before it."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


def _resend_problems(path: str, body: Any) -> list[str]:
    problems = [] if path == "/emails" else [f"path {path}"]
    if not isinstance(body, dict):
        return [*problems, "body is not a JSON object"]
    if set(body) != {"from", "to", "subject", "html", "text"}:
        problems.append(f"fields {sorted(body)}")
    if not (isinstance(body.get("to"), list) and all(isinstance(t, str) for t in body["to"])):
        problems.append("to is not a list of addresses")
    problems += [f"{name} is not a string" for name in ("from", "subject", "html", "text")
                 if not isinstance(body.get(name), str)]  # fmt: skip
    return problems


def _sendgrid_problems(path: str, body: Any) -> list[str]:
    problems = [] if path == "/v3/mail/send" else [f"path {path}"]
    if not isinstance(body, dict):
        return [*problems, "body is not a JSON object"]
    if set(body) != {"personalizations", "from", "subject", "content"}:
        problems.append(f"fields {sorted(body)}")
    people = body.get("personalizations")
    if not (
        isinstance(people, list)
        and len(people) == 1
        and isinstance(people[0].get("to"), list)
        and all(set(to) <= {"email", "name"} and "email" in to for to in people[0]["to"])
    ):
        problems.append(f"personalizations {people!r}")
    sender = body.get("from")
    if not (isinstance(sender, dict) and "email" in sender and set(sender) <= {"email", "name"}):
        problems.append(f"from {sender!r}")
    content = body.get("content")
    if not (
        isinstance(content, list)
        and [c.get("type") for c in content] == ["text/plain", "text/html"]
    ):
        problems.append("content is not text/plain then text/html")
    return problems


class FakeEmailAPI:
    """Resend's ``POST /emails`` or SendGrid's ``POST /v3/mail/send`` on loopback."""

    def __init__(self, kind: str, api_key: str = API_KEY) -> None:
        self.kind = kind
        self.api_key = api_key
        self.received: list[Received] = []
        self.problems: list[str] = []
        self.script: list[Reply] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def sent(self) -> list[Any]:
        """The JSON bodies of the mails the fake accepted."""
        return [r.body for r in self.received]

    def start(self) -> FakeEmailAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, path: str, headers: dict[str, str], raw: bytes) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        check = _resend_problems if self.kind == "resend" else _sendgrid_problems
        problems = check(path, body)
        if headers.get("authorization") != f"Bearer {self.api_key}":
            problems.append("authorization")
        if not headers.get("content-type", "").startswith("application/json"):
            problems.append("content-type")
        if self.kind == "resend" and not headers.get("user-agent"):
            problems.append("no user-agent (Resend refuses it)")
        with self._lock:
            self.problems += problems
            scripted = self.script.pop(0) if self.script else None
            if not problems:
                self.received.append(Received(path, headers, body))
        if problems:
            return self._bad_request("; ".join(problems))
        if scripted is not None:
            return scripted
        if self.kind == "resend":
            return Reply(200, {"id": str(uuid.uuid4())})
        return Reply(202)

    def _bad_request(self, message: str) -> Reply:
        if self.kind == "resend":
            return Reply(400, {"statusCode": 400, "name": "validation_error", "message": message})
        return Reply(400, {"errors": [{"message": message, "field": None, "help": None}]})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(min(length, 1 << 20))
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = fake._answer(self.path, headers, raw)
                time.sleep(min(reply.delay, MAX_DELAY))
                payload = b"" if reply.body is None else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if payload:
                        self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up waiting
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def fake_api(kind: str) -> Iterator[FakeEmailAPI]:
    fake = FakeEmailAPI(kind).start()
    try:
        yield fake
    finally:
        fake.stop()


@dataclass
class SmtpMessage:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes


class _Handler:
    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.fake.lock:
            self.fake.attempts += 1
            if self.fake.script:
                return self.fake.script.pop(0)
            raw = bytes(envelope.original_content or b"")
            parsed = message_from_bytes(raw, policy=policy.default)
            assert isinstance(parsed, EmailMessage)
            self.fake.received.append(
                SmtpMessage(str(envelope.mail_from), list(envelope.rcpt_tos), parsed, raw)
            )
        return "250 OK"


class FakeSmtp:
    """An SMTP server on 127.0.0.1 (aiosmtpd): plain, with login when ``user`` is given."""

    def __init__(self, *, user: str | None = None, password: str = SMTP_PASSWORD) -> None:
        self.user = user
        self.password = password
        self.received: list[SmtpMessage] = []
        self.script: list[str] = []  # replies to DATA before the next accepted mail
        self.attempts = 0
        self.logins: list[tuple[str, bool]] = []
        self.lock = threading.Lock()
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if user is not None:
            # PLAIN only: after a failed AUTH PLAIN, smtplib would go on to LOGIN, which
            # aiosmtpd answers differently from real servers.
            kwargs.update(
                authenticator=self._authenticate,
                auth_require_tls=False,
                auth_required=True,
                auth_exclude_mechanism=["LOGIN"],
            )
        self._controller = Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, **kwargs
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == self.user
            and data.password.decode() == self.password
        )
        self.logins.append((data.login.decode() if isinstance(data, LoginPassword) else "?", ok))
        return AuthResult(success=ok, handled=False)

    def start(self) -> FakeSmtp:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


@contextmanager
def fake_smtp(*, user: str | None = None) -> Iterator[FakeSmtp]:
    fake = FakeSmtp(user=user).start()
    try:
        yield fake
    finally:
        fake.stop()
