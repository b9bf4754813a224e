"""The mail transports against fake Resend, SendGrid and SMTP servers on loopback."""

from __future__ import annotations

import socket
import time

import pytest
from mail_fakes import (
    API_KEY,
    QUIET_AUTH_WITHOUT_TLS,
    SMTP_PASSWORD,
    Reply,
    fake_api,
    fake_smtp,
    free_port,
)

from opulon.mail import (
    ATTEMPTS,
    Mail,
    MailError,
    ResendMailer,
    SendGridMailer,
    SmtpMailer,
)

MAIL = Mail(
    to="alice@example.com",
    subject="Your key",
    text="the key: op-ul-abc\n",
    html="<p>the key: <code>op-ul-abc</code></p>\n",
)
SENDER = "Opulon <keys@example.com>"
pytestmark = QUIET_AUTH_WITHOUT_TLS


class Sleeps(list[float]):
    """Records the waits between attempts instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def http_mailer(
    kind: str, url: str, *, timeout: float = 5.0, sleep: Sleeps | None = None
) -> ResendMailer | SendGridMailer:
    cls = ResendMailer if kind == "resend" else SendGridMailer
    return cls(
        api_key=API_KEY,
        base_url=url,
        sender=SENDER,
        timeout=timeout,
        sleep=Sleeps() if sleep is None else sleep,
    )


def test_resend_gets_from_to_subject_html_and_text_with_a_bearer_token() -> None:
    with fake_api("resend") as fake:
        http_mailer("resend", fake.url).send(MAIL)
    assert fake.problems == []
    (request,) = fake.received
    assert request.path == "/emails"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.body == {
        "from": SENDER,
        "to": ["alice@example.com"],
        "subject": "Your key",
        "html": MAIL.html,
        "text": MAIL.text,
    }
    assert len(request.headers["idempotency-key"]) == 36


def test_sendgrid_gets_personalizations_from_subject_and_text_before_html() -> None:
    with fake_api("sendgrid") as fake:
        http_mailer("sendgrid", fake.url).send(MAIL)
    assert fake.problems == []
    (request,) = fake.received
    assert request.path == "/v3/mail/send"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.body == {
        "personalizations": [{"to": [{"email": "alice@example.com"}]}],
        "from": {"email": "keys@example.com", "name": "Opulon"},
        "subject": "Your key",
        "content": [
            {"type": "text/plain", "value": MAIL.text},
            {"type": "text/html", "value": MAIL.html},
        ],
    }


def test_a_base_url_with_a_path_keeps_it() -> None:
    with fake_api("resend") as fake:
        mailer = ResendMailer(api_key=API_KEY, base_url=fake.url + "/", sender=SENDER)
        mailer.send(MAIL)
    assert [r.path for r in fake.received] == ["/emails"]


@pytest.mark.parametrize("kind", ["resend", "sendgrid"])
def test_5xx_then_success_is_retried_with_backoff(kind: str) -> None:
    sleeps = Sleeps()
    with fake_api(kind) as fake:
        fake.script = [Reply(500, None), Reply(503, None)]
        http_mailer(kind, fake.url, sleep=sleeps).send(MAIL)
    assert len(fake.received) == 3
    assert sleeps == [0.5, 1.0]
    if kind == "resend":  # the same mail keeps its idempotency key on every attempt
        assert len({r.headers["idempotency-key"] for r in fake.received}) == 1


def test_429_waits_what_a_short_retry_after_asks() -> None:
    sleeps = Sleeps()
    with fake_api("resend") as fake:
        fake.script = [Reply(429, {"statusCode": 429, "name": "rate_limit_exceeded",
                                   "message": "Too many requests."}, {"retry-after": "2"})]  # fmt: skip
        http_mailer("resend", fake.url, sleep=sleeps).send(MAIL)
    assert sleeps == [2.0]
    assert len(fake.received) == 2


def test_a_long_retry_after_is_reported_not_waited_for() -> None:
    sleeps = Sleeps()
    body = {"statusCode": 429, "name": "daily_quota_exceeded", "message": "Quota reached."}
    with fake_api("resend") as fake:
        fake.script = [Reply(429, body, {"retry-after": "3600"})]
        with pytest.raises(MailError) as caught:
            http_mailer("resend", fake.url, sleep=sleeps).send(MAIL)
    assert str(caught.value) == (
        "Resend answered HTTP 429: Quota reached. (daily_quota_exceeded) (it asks to wait 3600 s)"
    )
    assert sleeps == []


def test_5xx_every_time_stops_after_the_last_attempt() -> None:
    sleeps = Sleeps()
    with fake_api("sendgrid") as fake:
        error = {"errors": [{"message": "Internal error", "field": None}]}
        fake.script = [Reply(500, error) for _ in range(ATTEMPTS + 2)]
        with pytest.raises(MailError) as caught:
            http_mailer("sendgrid", fake.url, sleep=sleeps).send(MAIL)
    assert str(caught.value) == "SendGrid answered HTTP 500: Internal error (after 3 attempts)"
    assert len(fake.received) == ATTEMPTS
    assert len(sleeps) == ATTEMPTS - 1


def test_4xx_is_not_retried_and_says_what_resend_said() -> None:
    body = {
        "statusCode": 422,
        "name": "validation_error",
        "message": "The example.com domain is not verified.",
    }
    with fake_api("resend") as fake:
        fake.script = [Reply(422, body)]
        with pytest.raises(MailError) as caught:
            http_mailer("resend", fake.url).send(MAIL)
    assert str(caught.value) == (
        "Resend answered HTTP 422: The example.com domain is not verified. (validation_error)"
    )
    assert len(fake.received) == 1


def test_4xx_says_what_sendgrid_said() -> None:
    body = {
        "errors": [
            {"message": "The from address does not match a verified Sender Identity.",
             "field": "from", "help": "http://sendgrid.com/docs"},
        ]
    }  # fmt: skip
    with fake_api("sendgrid") as fake:
        fake.script = [Reply(403, body)]
        with pytest.raises(MailError) as caught:
            http_mailer("sendgrid", fake.url).send(MAIL)
    assert str(caught.value) == (
        "SendGrid answered HTTP 403: The from address does not match a verified Sender "
        "Identity. (from)"
    )


def test_a_provider_that_echoes_the_api_key_does_not_get_it_into_the_message() -> None:
    with fake_api("resend") as fake:
        fake.script = [Reply(401, {"message": f"bad key {API_KEY}\nsee docs"})]
        with pytest.raises(MailError) as caught:
            http_mailer("resend", fake.url).send(MAIL)
    assert API_KEY not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_silent_provider_times_out_without_a_retry() -> None:
    with fake_api("sendgrid") as fake:
        fake.script = [Reply(202, delay=3.0)]
        started = time.monotonic()
        with pytest.raises(MailError) as caught:
            http_mailer("sendgrid", fake.url, timeout=0.5).send(MAIL)
        elapsed = time.monotonic() - started
    assert str(caught.value) == "SendGrid did not answer within 0.5 s"
    assert elapsed < 2.5
    assert len(fake.received) == 1


def test_a_refused_connection_names_the_host_and_port() -> None:
    port = free_port()
    with pytest.raises(MailError) as caught:
        http_mailer("resend", f"http://127.0.0.1:{port}").send(MAIL)
    assert str(caught.value) == f"cannot connect to 127.0.0.1:{port} (ConnectionRefusedError)"


def test_smtp_delivers_a_multipart_alternative_message() -> None:
    with fake_smtp() as server:
        SmtpMailer(host="127.0.0.1", port=server.port, sender=SENDER, starttls=False).send(MAIL)
    (got,) = server.received
    assert got.mail_from == "keys@example.com"
    assert got.rcpt_tos == ["alice@example.com"]
    message = got.message
    assert message["From"] == SENDER
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Your key"
    assert message.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content().replace("\r\n", "\n") == MAIL.text
    assert html.get_content().replace("\r\n", "\n") == MAIL.html


def test_smtp_logs_in_when_a_user_is_set() -> None:
    with fake_smtp(user="keys") as server:
        SmtpMailer(
            host="127.0.0.1",
            port=server.port,
            sender=SENDER,
            starttls=False,
            user="keys",
            password=SMTP_PASSWORD,
        ).send(MAIL)
    assert server.logins == [("keys", True)]
    assert len(server.received) == 1


def test_smtp_wrong_password_is_a_one_line_error_without_the_password() -> None:
    with fake_smtp(user="keys") as server:
        mailer = SmtpMailer(
            host="127.0.0.1", port=server.port, sender=SENDER, starttls=False,
            user="keys", password="wrong-password-42",
        )  # fmt: skip
        with pytest.raises(MailError) as caught:
            mailer.send(MAIL)
    message = str(caught.value)
    assert message.startswith(f"the SMTP server 127.0.0.1:{server.port} answered 535")
    assert "wrong-password-42" not in message
    assert server.received == []


def test_smtp_4xx_is_retried_and_5xx_is_not() -> None:
    sleeps = Sleeps()
    with fake_smtp() as server:
        mailer = SmtpMailer(
            host="127.0.0.1", port=server.port, sender=SENDER, starttls=False, sleep=sleeps
        )
        server.script = ["451 4.3.0 Try again later"]
        mailer.send(MAIL)
        assert (server.attempts, len(server.received), sleeps) == (2, 1, [0.5])
        server.script = ["554 5.7.1 Message refused"]
        with pytest.raises(MailError) as caught:
            mailer.send(MAIL)
    assert str(caught.value) == (
        f"the SMTP server 127.0.0.1:{server.port} answered 554: 5.7.1 Message refused"
    )
    assert server.attempts == 3


def test_smtp_asked_for_starttls_refuses_a_server_without_it() -> None:
    with fake_smtp() as server, pytest.raises(MailError) as caught:
        SmtpMailer(host="127.0.0.1", port=server.port, sender=SENDER).send(MAIL)
    assert "does not offer STARTTLS" in str(caught.value)
    assert server.received == []


def test_smtp_refused_connection_is_one_line() -> None:
    port = free_port()
    with pytest.raises(MailError) as caught:
        SmtpMailer(host="127.0.0.1", port=port, sender=SENDER, starttls=False).send(MAIL)
    assert str(caught.value) == f"cannot connect to 127.0.0.1:{port} (ConnectionRefusedError)"


def test_mailers_do_not_show_their_secret_in_repr() -> None:
    assert API_KEY not in repr(http_mailer("resend", "https://api.resend.com"))
    smtp = SmtpMailer(host="h", port=1, sender=SENDER, user="u", password=SMTP_PASSWORD)
    assert SMTP_PASSWORD not in repr(smtp)


def test_a_silent_smtp_server_times_out() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        mailer = SmtpMailer(host="127.0.0.1", port=port, sender=SENDER, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(MailError) as caught:
            mailer.send(MAIL)
    assert str(caught.value) == f"the SMTP server 127.0.0.1:{port} did not answer within 0.5 s"
    assert time.monotonic() - started < 3
