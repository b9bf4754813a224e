"""``opulon email ...`` and key delivery (``keys create/rotate --send``, ``keys send``), run as
a user runs them, against fake Resend, SendGrid and SMTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import run, run_error, run_json, run_ok
from mail_fakes import (
    API_KEY,
    QUIET_AUTH_WITHOUT_TLS,
    SMTP_PASSWORD,
    FakeEmailAPI,
    FakeSmtp,
    Reply,
    fake_api,
    fake_smtp,
    free_port,
)

from opulon.settings import Settings
from opulon.storage import open_store

pytestmark = [QUIET_AUTH_WITHOUT_TLS, pytest.mark.usefixtures("database_from_env")]

PUBLIC_URL = "https://api.example.com"
SENDER = "Opulon <keys@example.com>"


@pytest.fixture(autouse=True)
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAIL_API_KEY", API_KEY)
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)


@pytest.fixture
def resend() -> Iterator[FakeEmailAPI]:
    with fake_api("resend") as fake:
        yield fake


@pytest.fixture
def sendgrid() -> Iterator[FakeEmailAPI]:
    with fake_api("sendgrid") as fake:
        yield fake


@pytest.fixture
def smtp() -> Iterator[FakeSmtp]:
    with fake_smtp(user="keys") as fake:
        yield fake


def configure_http(kind: str, url: str, *extra: str) -> str:
    return run_ok(
        "email", "configure", "--provider", kind, "--from", SENDER, "--base-url", url,
        "--api-key-env", "EMAIL_API_KEY", "--public-url", PUBLIC_URL, *extra,
    ).output  # fmt: skip


def configure_smtp(port: int, *extra: str) -> str:
    return run_ok(
        "email", "configure", "--provider", "smtp", "--from", SENDER,
        "--smtp-host", "127.0.0.1", "--smtp-port", str(port), "--no-smtp-starttls",
        "--smtp-user", "keys", "--password-env", "SMTP_PASSWORD", "--public-url", PUBLIC_URL,
        *extra,
    ).output  # fmt: skip


def create_sent(*extra: str) -> dict[str, object]:
    created: dict[str, object] = run_json(
        "keys", "create", "--name", "alice", "--email", "alice@example.com",
        "--limit", "requests:60/1m", "--limit", "tokens:1M/1d", "--send", *extra,
    )  # fmt: skip
    return created


# -- configure, show, remove ------------------------------------------------------------------


def test_configure_resend_with_the_default_base_url_and_show_it_without_the_key() -> None:
    out = run_ok(
        "email", "configure", "--provider", "resend", "--from", SENDER,
        "--api-key-env", "EMAIL_API_KEY", "--public-url", PUBLIC_URL + "/",
    ).output  # fmt: skip
    assert "Resend (https://api.resend.com)" in out
    shown = run_ok("email", "show").output
    assert "https://api.resend.com" in shown and "set" in shown
    assert run_json("email", "show") == {
        "provider": "resend",
        "from": SENDER,
        "public_url": PUBLIC_URL,
        "timeout": 10.0,
        "base_url": "https://api.resend.com",
        "api_key": "set",
    }
    assert API_KEY not in out + shown


def test_configure_sendgrid_from_stdin() -> None:
    run_ok(
        "email", "configure", "--provider", "sendgrid", "--from", "keys@example.com",
        "--api-key-stdin", input=API_KEY + "\n",
    )  # fmt: skip
    shown = run_json("email", "show")
    assert shown["base_url"] == "https://api.sendgrid.com"
    assert shown["api_key"] == "set"
    assert shown["public_url"] is None


def test_without_a_public_url_of_its_own_email_uses_the_sites(resend: FakeEmailAPI) -> None:
    run_ok(
        "email", "configure", "--provider", "resend", "--from", SENDER, "--base-url", resend.url,
        "--api-key-env", "EMAIL_API_KEY",
    )  # fmt: skip
    steps = {c["name"]: (c["status"], c["detail"]) for c in run_json("doctor")["checks"]}
    assert steps["email"] == (
        "todo",
        "Resend, no public URL: keys cannot be sent (opulon site configure --public-url URL)",
    )
    run_ok("site", "configure", "--public-url", PUBLIC_URL)
    assert run_json("email", "show")["public_url"] == PUBLIC_URL
    steps = {c["name"]: (c["status"], c["detail"]) for c in run_json("doctor")["checks"]}
    assert steps["email"] == ("ok", f"Resend, for {PUBLIC_URL}")
    created = create_sent()  # the key's email names the site's URL
    assert created["sent"] is True
    assert PUBLIC_URL in json.dumps(resend.sent[0])
    # Email's own public URL comes first.
    run_ok(
        "email", "configure", "--provider", "resend", "--from", SENDER, "--base-url", resend.url,
        "--api-key-env", "EMAIL_API_KEY", "--public-url", "https://keys.example.com",
    )  # fmt: skip
    assert run_json("email", "show")["public_url"] == "https://keys.example.com"


def test_configure_smtp_and_show_it_without_the_password() -> None:
    out = run_ok(
        "email", "configure", "--provider", "smtp", "--from", SENDER,
        "--smtp-host", "smtp.example.com", "--smtp-user", "keys", "--password-stdin",
        input=SMTP_PASSWORD + "\n",
    ).output  # fmt: skip
    assert "smtp.example.com:587 (STARTTLS, as keys)" in out
    assert run_json("email", "show") == {
        "provider": "smtp",
        "from": SENDER,
        "public_url": None,
        "timeout": 10.0,
        "smtp_host": "smtp.example.com",
        "smtp_port": 587,
        "smtp_starttls": True,
        "smtp_user": "keys",
        "password": "set",
    }
    assert SMTP_PASSWORD not in out + run_ok("email", "show").output


def test_show_and_remove_without_settings() -> None:
    assert "not configured" in run_ok("email", "show").output
    assert run_json("email", "show") is None
    assert "not configured" in run_error("email", "remove", "--yes")


def test_remove_asks_first_and_then_forgets_the_secret() -> None:
    configure_http("resend", "https://api.resend.com")
    assert "not confirmed" in run_error("email", "remove", input="n\n")
    assert run_json("email", "show") is not None
    run_ok("email", "remove", "--yes")
    assert run_json("email", "show") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--provider", "mailgun", "--api-key-env", "EMAIL_API_KEY"), "invalid --provider"),
        (("--provider", "resend"), "give the API key with --api-key-env VAR or --api-key-stdin"),
        (("--provider", "resend", "--api-key-env", "NOT_SET_ANYWHERE"), "NOT_SET_ANYWHERE is not set"),
        (("--provider", "resend", "--api-key-env", "EMAIL_API_KEY", "--api-key-stdin"), "not both"),
        (("--provider", "resend", "--api-key-env", "EMAIL_API_KEY", "--base-url",
          "http://mail.example.com"), "use https; plain http is only for this machine"),
        (("--provider", "resend", "--api-key-env", "EMAIL_API_KEY", "--base-url", "ftp://x"),
         "invalid --base-url"),
        (("--provider", "resend", "--api-key-env", "EMAIL_API_KEY", "--public-url",
          "http://api.example.com"), "invalid --public-url"),
        (("--provider", "resend", "--api-key-env", "EMAIL_API_KEY", "--smtp-host", "h"),
         "are for --provider smtp"),
        (("--provider", "resend", "--api-key-env", "EMAIL_API_KEY", "--no-smtp-starttls"),
         "--smtp-starttls is for --provider smtp"),
        (("--provider", "resend", "--password-env", "SMTP_PASSWORD"), "are for --provider smtp"),
        (("--provider", "smtp", "--api-key-env", "EMAIL_API_KEY", "--smtp-host", "h"),
         "are for resend and sendgrid"),
        (("--provider", "smtp"), "invalid --smtp-host"),
        (("--provider", "smtp", "--smtp-host", "h", "--smtp-port", "70000"), "invalid --smtp-port"),
        (("--provider", "smtp", "--smtp-host", "h", "--smtp-user", "u"), "needs the SMTP password"),
        (("--provider", "smtp", "--smtp-host", "h", "--password-env", "SMTP_PASSWORD"),
         "needs --smtp-user"),
        (("--provider", "smtp", "--smtp-host", "smtp.example.com", "--no-smtp-starttls",
          "--smtp-user", "u", "--password-env", "SMTP_PASSWORD"), "would cross the network unencrypted"),
        (("--provider", "smtp", "--smtp-host", "h", "--timeout", "0"), "invalid --timeout"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(args: tuple[str, ...], message: str) -> None:
    line = run_error("email", "configure", "--from", SENDER, *args)
    assert message in line
    assert API_KEY not in line and SMTP_PASSWORD not in line
    assert run_json("email", "show") is None


@pytest.mark.parametrize(
    "sender", ["not-an-address", "Opulon <keys@example.com>\r\nBcc: x@evil.example", "a@b"]
)
def test_a_bad_sender_is_refused(sender: str) -> None:
    line = run_error(
        "email", "configure", "--provider", "resend", "--from", sender,
        "--api-key-env", "EMAIL_API_KEY",
    )  # fmt: skip
    assert "invalid --from" in line


# -- sending --------------------------------------------------------------------------------


def test_email_test_through_resend(resend: FakeEmailAPI) -> None:
    configure_http("resend", resend.url)
    out = run_ok("email", "test", "--to", "admin@example.com").output
    assert "Sent a test email to admin@example.com" in out
    assert resend.problems == []
    (body,) = resend.sent
    assert body["to"] == ["admin@example.com"] and body["from"] == SENDER
    assert "test email" in body["text"] and "op-ul-" not in body["text"]


def test_email_test_refuses_a_bad_address_and_unconfigured_email(resend: FakeEmailAPI) -> None:
    assert "email is not configured" in run_error("email", "test", "--to", "a@example.com")
    configure_http("resend", resend.url)
    assert "invalid --to address" in run_error("email", "test", "--to", "a@example.com\nBcc: b@c.d")
    assert resend.received == []


@pytest.mark.parametrize("kind", ["resend", "sendgrid"])
def test_keys_create_send_emails_the_key_through_the_http_providers(kind: str) -> None:
    with fake_api(kind) as fake:
        configure_http(kind, fake.url)
        created = create_sent()
    assert created["sent"] is True
    assert fake.problems == []
    (body,) = fake.sent
    if kind == "resend":
        assert body["to"] == ["alice@example.com"]
        text, html = body["text"], body["html"]
    else:
        assert body["personalizations"] == [{"to": [{"email": "alice@example.com"}]}]
        text, html = (part["value"] for part in body["content"])
    for content in (text, html):
        assert created["key"] in content
        assert PUBLIC_URL in content and PUBLIC_URL + "/v1" in content
        assert "60 requests per minute" in content
        assert "1,000,000 tokens (input and output) per day" in content
        assert (
            "from openai import OpenAI" in content and "from anthropic import Anthropic" in content
        )


def test_keys_create_send_through_smtp_logs_in_and_delivers(smtp: FakeSmtp) -> None:
    configure_smtp(smtp.port)
    result = run_ok(
        "keys", "create", "--name", "bob", "--email", "bob@example.com", "--send",
        "--expires", "2027-01-31",
    )  # fmt: skip
    assert "Sent op-ul-" in result.output and "bob@example.com through SMTP" in result.output
    assert smtp.logins == [("keys", True)]
    (got,) = smtp.received
    assert got.rcpt_tos == ["bob@example.com"]
    plain = got.message.get_body(("plain",))
    assert plain is not None
    text = plain.get_content()
    key = next(
        word for word in result.stdout.split() if word.startswith("op-ul-") and len(word) > 20
    )
    assert key in text and PUBLIC_URL in text and "2027-01-31 00:00 UTC" in text


def test_the_key_is_printed_once_unless_no_show(resend: FakeEmailAPI) -> None:
    configure_http("resend", resend.url)
    shown = run_ok("keys", "create", "--name", "a", "--email", "a@example.com", "--send")
    key = resend.sent[0]["text"].split("    ", 1)[1].split()[0]
    assert key in shown.stdout
    hidden = run_ok(
        "keys", "create", "--name", "b", "--email", "b@example.com", "--send", "--no-show"
    )
    second = resend.sent[1]["text"].split("    ", 1)[1].split()[0]
    assert second.startswith("op-ul-") and second not in hidden.output
    assert "emailed to its owner, not shown" in " ".join(hidden.stdout.split())
    as_json = create_sent("--no-show")
    assert "key" not in as_json and as_json["sent"] is True
    assert "--no-show needs --send" in run_error("keys", "create", "--name", "c", "--no-show")


def test_keys_rotate_send_and_keys_send(resend: FakeEmailAPI) -> None:
    configure_http("resend", resend.url)
    created = run_json("keys", "create", "--name", "alice", "--email", "alice@example.com")
    assert resend.received == []
    rotated = run_json("keys", "rotate", str(created["prefix"]), "--send")
    assert rotated["sent"] is True and rotated["key"] in resend.sent[-1]["text"]
    out = run_ok("keys", "send", str(rotated["prefix"])).output
    assert f"Sent {rotated['prefix']} to alice@example.com through Resend." in out
    assert rotated["key"] not in out  # sent, not printed
    assert rotated["key"] in resend.sent[-1]["text"]
    assert len(resend.sent) == 2
    assert "it was rotated" in run_error("keys", "send", str(created["prefix"]))


def test_sending_refuses_before_the_key_changes_when_it_cannot_be_sent(
    resend: FakeEmailAPI,
) -> None:
    line = run_error("keys", "create", "--name", "a", "--email", "a@example.com", "--send")
    assert "email is not configured: run opulon email configure" in line
    assert run_json("keys", "list") == []
    run_ok(
        "email", "configure", "--provider", "resend", "--from", SENDER, "--base-url", resend.url,
        "--api-key-env", "EMAIL_API_KEY",
    )  # fmt: skip
    line = run_error("keys", "create", "--name", "a", "--email", "a@example.com", "--send")
    assert "--public-url" in line
    configure_http("resend", resend.url)
    assert "--send needs the owner's address" in run_error(
        "keys", "create", "--name", "a", "--send"
    )
    assert run_json("keys", "list") == []
    nobody = run_json("keys", "create", "--name", "nobody")
    for args in (("rotate", nobody["prefix"], "--send"), ("send", nobody["prefix"])):
        line = run_error("keys", *map(str, args))
        assert "has no owner address to send to: set one with opulon keys update" in line
    assert run_json("keys", "show", str(nobody["prefix"]))["prefix"] == nobody["prefix"]
    assert resend.received == []


# -- failures -------------------------------------------------------------------------------


def _create_failing(*extra: str) -> tuple[str, str | None, str]:
    """keys create --send that fails: (its error line, the printed key or None, its prefix)."""
    result = run(
        "keys", "create", "--name", "alice", "--email", "alice@example.com", "--send", *extra
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    key = next((w for w in result.stdout.split() if w.startswith("op-ul-") and len(w) > 20), None)
    prefix = line.removeprefix("error: created ")[:16]
    assert key is None or key.startswith(prefix)
    assert line.startswith(f"error: created {prefix}, but the email failed: ")
    assert line.endswith(f"; send it later with: opulon keys send {prefix}")
    assert [k["prefix"] for k in run_json("keys", "list")] == [prefix]  # the key stays
    return line, key, prefix


def test_a_4xx_is_reported_the_key_stays_and_can_be_sent_later(resend: FakeEmailAPI) -> None:
    configure_http("resend", resend.url)
    resend.script = [Reply(403, {"statusCode": 403, "name": "validation_error",
                                 "message": "The example.com domain is not verified."})]  # fmt: skip
    line, key, prefix = _create_failing()
    assert "Resend answered HTTP 403: The example.com domain is not verified." in line
    assert len(resend.received) == 1  # not retried
    run_ok("keys", "send", prefix)
    assert key in resend.sent[-1]["text"]


def test_a_sendgrid_4xx_says_what_sendgrid_said(sendgrid: FakeEmailAPI) -> None:
    configure_http("sendgrid", sendgrid.url)
    sendgrid.script = [
        Reply(401, {"errors": [{"message": "The provided authorization grant is invalid, "
                                "expired, or revoked", "field": None, "help": None}]})
    ]  # fmt: skip
    line, _, _ = _create_failing()
    assert "SendGrid answered HTTP 401: The provided authorization grant is invalid" in line


def test_5xx_then_success_is_retried_and_sent(sendgrid: FakeEmailAPI) -> None:
    configure_http("sendgrid", sendgrid.url)
    sendgrid.script = [Reply(500), Reply(503, headers={"retry-after": "1"})]
    started = time.monotonic()
    created = create_sent()
    assert created["sent"] is True
    assert len(sendgrid.received) == 3
    assert 1.4 < time.monotonic() - started < 10  # 0.5 s, then 1 s as asked


def test_5xx_every_time_fails_after_three_attempts(resend: FakeEmailAPI) -> None:
    configure_http("resend", resend.url)
    resend.script = [Reply(502, {"message": "Bad gateway"}) for _ in range(5)]
    line, _, _ = _create_failing("--no-show")
    assert "Resend answered HTTP 502: Bad gateway (after 3 attempts)" in line
    assert len(resend.received) == 3


def test_a_provider_that_does_not_answer_times_out(resend: FakeEmailAPI) -> None:
    configure_http("resend", resend.url, "--timeout", "1")
    resend.script = [Reply(200, {"id": "late"}, delay=3.0)]
    started = time.monotonic()
    line, _, _ = _create_failing()
    assert "Resend did not answer within 1 s" in line
    assert time.monotonic() - started < 3


def test_a_refused_connection_is_reported() -> None:
    port = free_port()
    configure_http("sendgrid", f"http://127.0.0.1:{port}")
    line, _, _ = _create_failing()
    assert f"cannot connect to 127.0.0.1:{port} (ConnectionRefusedError)" in line


def test_smtp_failures_through_the_cli(smtp: FakeSmtp) -> None:
    configure_smtp(smtp.port)
    smtp.script = ["451 4.3.0 Mailbox busy"]
    run_ok("email", "test", "--to", "admin@example.com")  # retried once, then delivered
    assert (smtp.attempts, len(smtp.received)) == (2, 1)
    smtp.script = ["550 5.1.1 No such user"]
    line = run_error("email", "test", "--to", "nobody@example.com")
    assert line == f"error: the SMTP server 127.0.0.1:{smtp.port} answered 550: 5.1.1 No such user"
    port = free_port()
    configure_smtp(port)
    line = run_error("email", "test", "--to", "admin@example.com")
    assert line == f"error: cannot connect to 127.0.0.1:{port} (ConnectionRefusedError)"


def test_a_wrong_smtp_password_is_reported_without_it(
    smtp: FakeSmtp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "not-the-password-77")
    configure_smtp(smtp.port)
    line = run_error("email", "test", "--to", "admin@example.com")
    assert f"127.0.0.1:{smtp.port} answered 535" in line
    assert "not-the-password-77" not in line


def test_a_keys_send_failure_is_one_line(resend: FakeEmailAPI) -> None:
    configure_http("resend", resend.url)
    created = run_json("keys", "create", "--name", "a", "--email", "a@example.com")
    resend.script = [
        Reply(
            422, {"statusCode": 422, "name": "validation_error", "message": "Invalid `to` field."}
        )
    ]
    line = run_error("keys", "send", str(created["prefix"]))
    assert line == (
        f"error: did not send {created['prefix']}: Resend answered HTTP 422: Invalid `to` field. "
        f"(validation_error); send it later with: opulon keys send {created['prefix']}"
    )


# -- secrets at rest and in output -------------------------------------------------------------


def _stored_bytes(home: Path) -> bytes:
    """Every byte the installation keeps: the data dir's files, and a PostgreSQL store's rows."""
    stored = b"".join(path.read_bytes() for path in sorted(home.iterdir()) if path.is_file())
    url = os.environ.get("OPULON_DATABASE_URL")
    if url:
        store = open_store(Settings(home=home, database_url=url))
        try:
            for table in store.db.table_names():
                stored += repr(store.db.execute(f"SELECT * FROM {table}").fetchall()).encode()
        finally:
            store.close()
    return stored


def test_the_email_secrets_are_stored_only_encrypted(isolated_home: Path, smtp: FakeSmtp) -> None:
    with fake_api("resend") as resend:
        outputs = [configure_http("resend", resend.url)]
        outputs.append(run_ok("email", "show").output)
        outputs.append(json.dumps(run_json("email", "show")))
        outputs.append(run_ok("email", "test", "--to", "admin@example.com").output)
    outputs.append(configure_smtp(smtp.port))
    outputs.append(run_ok("email", "show").output)
    outputs.append(run_ok("email", "test", "--to", "admin@example.com").output)
    for output in outputs:
        assert API_KEY not in output and SMTP_PASSWORD not in output
    stored = _stored_bytes(isolated_home)  # the database, its WAL, the master key file
    assert API_KEY.encode() not in stored
    assert SMTP_PASSWORD.encode() not in stored
    for mail in smtp.received:  # nor does a mail carry the provider's secret
        assert SMTP_PASSWORD.encode() not in mail.raw and API_KEY.encode() not in mail.raw


def test_nothing_of_a_sent_email_is_stored_but_the_owners_address(
    isolated_home: Path, resend: FakeEmailAPI
) -> None:
    configure_http("resend", resend.url)
    created = create_sent()
    run_ok("keys", "send", str(created["prefix"]))
    stored = _stored_bytes(isolated_home)
    assert str(created["key"]).encode() not in stored  # the key only encrypted, as always
    for phrase in ("from openai import OpenAI", "Your API key for", "60 requests per minute"):
        assert phrase.encode() not in stored
    assert b"alice@example.com" in stored
