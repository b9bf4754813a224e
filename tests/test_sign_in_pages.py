"""Signing in on ``/key-status`` with a mailed code, against a live gateway whose email goes to
a fake Resend on loopback: the whole flow, the same answer for an address without keys, the
locked code, the session cookie, cross-site posts refused, and no input that makes a 500."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_helpers import Gateway
from litestar import Litestar, Request
from litestar.testing import TestClient
from sign_in_helpers import FakeResend, create_owned_key, form_token, start_mail_gateway

from opulon.gateway.forms import FormGuard
from opulon.gateway.key_status import key_status_router
from opulon.gateway.pages import template_config
from opulon.web.site import StaticFile

_addresses = iter(range(2, 250))


@pytest.fixture(scope="module")
def mail_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, FakeResend]]:
    gateway, fake = start_mail_gateway(tmp_path_factory.mktemp("sign-in"))
    yield gateway, fake
    gateway.stop()
    gateway.mock.stop()
    fake.stop()


@pytest.fixture
def gateway(mail_gateway: tuple[Gateway, FakeResend]) -> Gateway:
    return mail_gateway[0]


@pytest.fixture
def fake(mail_gateway: tuple[Gateway, FakeResend]) -> Iterator[FakeResend]:
    yield mail_gateway[1]
    mail_gateway[1].script.clear()
    assert mail_gateway[1].problems == []  # every request as Resend's API expects it


def _client(gateway: Gateway) -> httpx.Client:
    """A browser-like client with a loopback address of its own (its own throttle counts)."""
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
    return httpx.Client(
        base_url=gateway.url, transport=transport, timeout=15, follow_redirects=True
    )


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with _client(gateway) as http:
        yield http


def _ask_code(client: httpx.Client, email: str) -> httpx.Response:
    return client.post("/key-status/code", data={"email": email, "csrf_token": form_token(client)})


def _sign_in(client: httpx.Client, email: str, code: str) -> httpx.Response:
    data = {"email": email, "code": code, "csrf_token": form_token(client)}
    return client.post("/key-status/sign-in", data=data)


def _wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def _cookie(response: httpx.Response, name: str) -> str:
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(name + "=")]
    return header


def test_the_page_offers_sign_in_by_email(gateway: Gateway, client: httpx.Client) -> None:
    response = client.get("/key-status")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    actions = re.findall(r"<form[^>]* action='([^']+)'", response.text)
    assert actions == ["/key-status", "/key-status/code"]
    assert response.text.count("name='csrf_token'") == 2
    cookie = _cookie(response, "opulon_csrf")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/key-status" in cookie
    assert "Secure" not in cookie  # plain http here: a Secure cookie would never come back


def test_a_key_holder_signs_in_sees_their_keys_gets_one_again_and_signs_out(
    gateway: Gateway, fake: FakeResend, client: httpx.Client
) -> None:
    email = "Grace.Hopper@Example.org"
    first = create_owned_key(gateway, email, "requests:10/1m", name="laptop")
    second = create_owned_key(gateway, email.lower(), "tokens:1M/1d", name="ci")
    other = create_owned_key(gateway, "someone@example.org", name="not hers")
    answer = _ask_code(client, " grace.hopper@example.ORG ")
    assert answer.status_code == 200 and "Enter the code" in answer.text
    mail = fake.wait_for(email, 1)[0]
    assert mail["subject"] == "Your Opulon sign-in code" and "gateway.example.org" in mail["text"]
    code = fake.code_for(email)

    signed_in = _sign_in(client, "grace.hopper@example.org", code)
    assert [r.status_code for r in signed_in.history] == [303]
    session = _cookie(signed_in.history[0], "opulon_session")
    for attribute in ("HttpOnly", "SameSite=strict", "Max-Age=1800", "Path=/key-status"):
        assert attribute in session
    assert signed_in.status_code == 200 and signed_in.url.path == "/key-status/account"
    assert signed_in.headers["cache-control"] == "no-store"
    prefixes = re.findall(r"<article class='account-key' data-prefix='([^']+)'", signed_in.text)
    assert prefixes == [first[:16], second[:16]]
    assert other[:16] not in signed_in.text
    assert "Requests per minute" in signed_in.text and "Tokens per day" in signed_in.text
    assert first not in signed_in.text and second not in signed_in.text
    assert code not in str(signed_in.url) and first not in str(signed_in.url)

    token = form_token(client, "/key-status/account")
    again = client.post(
        "/key-status/account/send", data={"prefix": second[:16], "csrf_token": token}
    )
    assert again.status_code == 200 and f"Key {second[:16]} is on its way" in again.text
    key_mail = fake.wait_for(email.lower(), 1)[0]
    assert second in key_mail["text"] and second in key_mail["html"]
    assert second not in again.text

    # Another address's key is not this session's to send.
    refused = client.post(
        "/key-status/account/send", data={"prefix": other[:16], "csrf_token": token}
    )
    assert refused.status_code == 503 and "sorry" in refused.text.lower()
    assert fake.mails_to("someone@example.org") == []

    look_up_page = client.get("/key-status")
    assert (
        "href='/key-status/account'" in look_up_page.text
        and "Send me a code" not in look_up_page.text
    )
    out = client.post("/key-status/sign-out", data={"csrf_token": token})
    assert out.url.path == "/key-status" and "Send me a code" in out.text
    assert client.get("/key-status/account").url.path == "/key-status"
    # The old cookie value is dead on the server too, not only forgotten by the browser.
    with _client(gateway) as replaying:
        replaying.cookies.set("opulon_session", _value(session))
        assert replaying.get("/key-status/account").url.path == "/key-status"
    assert _sign_in(client, "grace.hopper@example.org", code).status_code == 401  # single use


def _value(set_cookie: str) -> str:
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


def test_an_address_without_keys_gets_the_same_page_in_the_same_time(
    gateway: Gateway, fake: FakeResend
) -> None:
    create_owned_key(gateway, "owner@example.org")
    pages, times = [], []
    with _client(gateway) as client:
        token = form_token(client)
        for email in ("owner@example.org", "nobody@example.org"):
            started = time.monotonic()
            answer = client.post("/key-status/code", data={"email": email, "csrf_token": token})
            times.append(time.monotonic() - started)
            pages.append((answer.status_code, answer.text.replace(email, "ADDRESS")))
    assert pages[0] == pages[1] and pages[0][0] == 200
    assert all(t >= 0.5 for t in times) and abs(times[0] - times[1]) < 0.2, times
    fake.wait_for("owner@example.org", 1)
    time.sleep(0.3)
    assert fake.mails_to("nobody@example.org") == []


def test_five_wrong_codes_lock_the_code(gateway: Gateway, fake: FakeResend) -> None:
    email = "locked@example.org"
    create_owned_key(gateway, email)
    with _client(gateway) as client:
        assert _ask_code(client, email).status_code == 200
        code = fake.code_for(email)
        answers = [_sign_in(client, email, _wrong(code)) for _ in range(5)]
    assert [a.status_code for a in answers] == [401] * 5
    assert all("not right" in a.text for a in answers[:4])
    assert "locked" in answers[4].text
    with _client(gateway) as elsewhere:  # the code itself is locked, not only the client
        late = _sign_in(elsewhere, email, code)
    assert (
        late.status_code == 401 and "locked" in late.text and late.url.path != "/key-status/account"
    )


def test_at_most_three_codes_per_address_in_fifteen_minutes(
    gateway: Gateway, fake: FakeResend
) -> None:
    for email in ("thrice@example.org", "nokeys@example.org"):
        if email.startswith("thrice"):
            create_owned_key(gateway, email)
        with _client(gateway) as client:
            answers = [_ask_code(client, email) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4
        assert ["had its share" in a.text for a in answers] == [False, False, False, True]
    assert len(fake.wait_for("thrice@example.org", 3)) == 3


def test_code_requests_are_throttled_per_client(gateway: Gateway) -> None:
    with _client(gateway) as client:
        answers = [_ask_code(client, f"n{i}@example.org").status_code for i in range(6)]
    assert answers == [200] * 5 + [429]


def test_a_failed_send_shows_an_apology_and_leaks_nothing(
    gateway: Gateway, fake: FakeResend, client: httpx.Client
) -> None:
    email = "unlucky@example.org"
    key = create_owned_key(gateway, email)
    _ask_code(client, email)
    assert _sign_in(client, email, fake.code_for(email)).url.path == "/key-status/account"
    fake.fail_next()
    token = form_token(client, "/key-status/account")
    answer = client.post("/key-status/account/send", data={"prefix": key[:16], "csrf_token": token})
    assert answer.status_code == 503
    assert "Sorry, the key could not be sent just now." in answer.text
    assert key not in answer.text and key[16:] not in answer.text
    # Nothing of the provider's answer ("Resend answered HTTP 500: ...") reaches the page.
    for leaked in ("HTTP 500", "Resend", "internal_server_error", "try later"):
        assert leaked not in answer.text, leaked
    assert key[16:] not in gateway.output.read_text()


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/key-status", {"key": "op-ul-0123456789" + "a" * 40}),
        ("/key-status/code", {"email": "someone@example.org"}),
        ("/key-status/sign-in", {"email": "someone@example.org", "code": "123456"}),
        ("/key-status/account/send", {"prefix": "op-ul-0123456789"}),
        ("/key-status/sign-out", {}),
    ],
)
def test_cross_site_posts_are_refused(
    gateway: Gateway, client: httpx.Client, path: str, fields: dict[str, str]
) -> None:
    token = form_token(client)
    refusals = [
        client.post(path, data=fields),  # no token
        client.post(path, data={**fields, "csrf_token": "0" * 64}),  # a made-up one
        client.post(
            path, data={**fields, "csrf_token": token}, headers={"origin": "https://evil.example"}
        ),
        client.post(path, data={**fields, "csrf_token": token}, headers={"origin": "ftp://x"}),
        client.post(
            path, data={**fields, "csrf_token": token}, headers={"sec-fetch-site": "cross-site"}
        ),
        client.post(
            path, data={**fields, "csrf_token": token}, headers={"sec-fetch-site": "same-site"}
        ),
    ]
    with _client(gateway) as stranger:  # a token from another browser's page
        refusals.append(stranger.post(path, data={**fields, "csrf_token": token}))
    assert [r.status_code for r in refusals] == [403] * len(refusals)
    assert all("role='alert'" in r.text for r in refusals)
    # The page's own form, as browsers send it: Origin null under the pages' no-referrer policy.
    for origin in (gateway.url, "null"):
        own = client.post(
            path,
            data={**fields, "csrf_token": token},
            headers={"origin": origin, "sec-fetch-site": "same-origin"},
        )
        assert own.status_code != 403


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("/key-status/code", {"data": {"email": "x" * 300 + "@example.org"}}),
        ("/key-status/code", {"data": {"email": "<script>@example.org"}}),
        ("/key-status/code", {"content": b"email=\xff\xfe%00", "headers": {
            "content-type": "application/x-www-form-urlencoded"}}),
        ("/key-status/code", {"json": {"email": "a@example.org"}}),
        ("/key-status/sign-in", {"data": {"email": "a@example.org", "code": "\u0661" * 6}}),
        ("/key-status/sign-in", {"data": {"email": "a@example.org", "code": "1" * 5000}}),
        ("/key-status/sign-in", {"data": {"code": "123456"}}),
        ("/key-status/account/send", {"data": {"prefix": "'\"<>"}}),
        ("/key-status/sign-out", {"content": b"&".join([b"a=b"] * 50), "headers": {
            "content-type": "application/x-www-form-urlencoded"}}),
    ],
)  # fmt: skip
def test_no_input_makes_a_sign_in_page_fail(
    gateway: Gateway, client: httpx.Client, path: str, options: dict[str, object]
) -> None:
    token = form_token(client)
    data = options.get("data")
    if isinstance(data, dict):
        options = {**options, "data": {**data, "csrf_token": token}}
    client.cookies.set("opulon_session", "x" * 4000)
    response = client.post(path, **options)  # type: ignore[arg-type]
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text and "<script>@" not in response.text
    account = client.get("/key-status/account")
    assert account.status_code == 200 and account.url.path == "/key-status"


def test_cookies_are_secure_over_tls() -> None:
    stylesheet = StaticFile.load("opulon.css")
    app = Litestar(
        route_handlers=[key_status_router(guard=FormGuard())],
        template_config=template_config(stylesheet, StaticFile.load("consent.js")),
        openapi_config=None,
        logging_config=None,
    )
    with TestClient(app, base_url="https://gateway.example.org") as tls:
        cookie = _cookie(tls.get("/key-status"), "opulon_csrf")
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    # Behind a trusted TLS-terminating proxy, its X-Forwarded-Proto says so; nobody else's does.
    guard = FormGuard([ipaddress.ip_network("10.0.0.0/8")])
    # Of a list, the proxy's own value is the last: what a client wrote before it is not it.
    for peer, proto, secure in (("10.1.2.3", b"https", True), ("10.1.2.3", b"http", False),
                                ("192.0.2.7", b"https", False),
                                ("10.1.2.3", b"https, http", False),
                                ("10.1.2.3", b"http, https", True)):  # fmt: skip
        scope = {"type": "http", "scheme": "http", "client": (peer, 5000),
                 "headers": [(b"x-forwarded-proto", proto)]}  # fmt: skip
        assert guard.over_tls(Request(scope)) is secure  # type: ignore[arg-type]


def test_the_code_mail_says_what_it_is(tmp_path: Path) -> None:
    from opulon.web.sign_in_mail import sign_in_code_mail

    mail = sign_in_code_mail("a@example.org", "012345", gateway_url="https://g.example/")
    assert mail.to == "a@example.org" and "012345" in mail.text and "012345" in mail.html
    assert "https://g.example/key-status" in mail.html and "10 minutes" in mail.text
    hostile = sign_in_code_mail("a@example.org", "<b>", gateway_url="https://g.example/<i>")
    assert "<b>" not in hostile.html and "&lt;b&gt;" in hostile.html


def test_keys_sent_again_count_as_mails_asked_for(gateway: Gateway, fake: FakeResend) -> None:
    email = "eager@example.org"
    key = create_owned_key(gateway, email)
    with _client(gateway) as client:
        _ask_code(client, email)
        assert _sign_in(client, email, fake.code_for(email)).url.path == "/key-status/account"
        token = form_token(client, "/key-status/account")
        data = {"prefix": key[:16], "csrf_token": token}
        answers = [client.post("/key-status/account/send", data=data) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 4 + [429]
    assert "too many mails" in answers[4].text
    assert len(fake.wait_for(email, 5)) == 5  # the code and four keys


class _NoEmail:
    """A runtime whose gateway has no email set up."""

    def email_enabled(self) -> bool:
        return False

    async def session_keys(self, token: str) -> None:
        return None


@pytest.mark.parametrize(("runtime", "status"), [(None, 503), (_NoEmail(), 503)])
def test_without_email_there_is_no_sign_in(runtime: object, status: int) -> None:
    from litestar.datastructures import State

    from opulon.gateway.sign_in import sign_in_router

    guard = FormGuard()
    app = Litestar(
        route_handlers=[key_status_router(guard=guard), sign_in_router(guard=guard)],
        template_config=template_config(
            StaticFile.load("opulon.css"), StaticFile.load("consent.js")
        ),
        openapi_config=None,
        logging_config=None,
        state=State({"runtime": runtime}),
    )
    with TestClient(app) as client:
        page = client.get("/key-status")
        assert "Send me a code" not in page.text
        token = re.search(r"name='csrf_token' value='([0-9a-f]+)'", page.text)
        assert token is not None
        data = {"email": "a@example.org", "code": "123456", "csrf_token": token.group(1)}
        for path in ("/key-status/code", "/key-status/sign-in"):
            answer = client.post(path, data=data)
            assert answer.status_code == status and "role='alert'" in answer.text
        assert client.get("/key-status/account", follow_redirects=False).status_code == 303
