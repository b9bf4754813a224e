"""Signing in with a mailed code in a real headless Chromium (Debian's), driven by Playwright.

A person asks for a code on ``/key-status``, reads it from the mail (the fake Resend's record),
signs in, sees their keys, has one sent again, and signs out; an address without keys gets
the same page; five wrong codes lock the code; a form posted from another site, or without
its token, is refused. Screenshots go to ``artifacts/``. Like the other browser tests these
skip without Chromium, except on CI, where that is a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from gateway_helpers import Gateway
from sign_in_helpers import FakeResend, create_owned_key, start_mail_gateway
from test_key_status_browser import ARTIFACTS, DESKTOP, PHONE, _Watched, browser

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

__all__ = ["browser"]  # the fixture, shared with the key look-up's browser tests

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def mail_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, FakeResend]]:
    gateway, fake = start_mail_gateway(tmp_path_factory.mktemp("sign-in-browser"))
    yield gateway, fake
    gateway.stop()
    gateway.mock.stop()
    fake.stop()


def _click(page: Page, selector: str) -> int:
    """Click a form's button as a person would; the status of the page it leads to."""
    # After a redirect (sign-in, sign-out) the page shown is the one it leads to.
    with page.expect_response(
        lambda r: r.request.resource_type == "document" and not 300 <= r.status < 400
    ) as answer:
        page.locator(selector).click()
    page.wait_for_load_state("load")
    status: int = answer.value.status
    return status


def _ask_code(page: Page, gateway: Gateway, email: str) -> int:
    page.goto(gateway.url + "/key-status")
    page.locator("#email").press_sequentially(email)
    return _click(page, "#sign-in button[type=submit]")


def _enter_code(page: Page, code: str) -> int:
    page.locator("#code").fill("")
    page.locator("#code").press_sequentially(code)
    return _click(page, "#code-form button[type=submit]")


def _main_text(page: Page) -> str:
    return " ".join(page.locator("main").inner_text().split())


def test_a_key_holder_signs_in_with_a_mailed_code(
    mail_gateway: tuple[Gateway, FakeResend], browser: Browser
) -> None:
    gateway, fake = mail_gateway
    email = "ada@example.org"
    laptop = create_owned_key(gateway, email, "requests:10/1m", name="laptop")
    ci = create_owned_key(gateway, email, "tokens:1M/1d", name="ci")
    watched = _Watched(browser, viewport=DESKTOP)
    try:
        page = watched.page
        page.goto(gateway.url + "/key-status")
        page.screenshot(path=ARTIFACTS / "sign-in-form.png", full_page=True)
        assert _ask_code(page, gateway, email) == 200
        assert page.url == gateway.url + "/key-status/code"
        code_page = _main_text(page).replace(email, "ADDRESS")
        page.screenshot(path=ARTIFACTS / "sign-in-code.png", full_page=True)
        code = fake.code_for(email)

        assert _enter_code(page, code) == 200
        assert page.url == gateway.url + "/key-status/account"
        prefixes = page.eval_on_selector_all(
            "article.account-key", "els => els.map(el => el.dataset.prefix)"
        )
        assert prefixes == [laptop[:16], ci[:16]]
        states = page.eval_on_selector_all("[data-status]", "els => els.map(e => e.dataset.status)")
        assert states == ["active", "active"]
        assert page.locator("[data-limit]").count() == 2
        page.screenshot(path=ARTIFACTS / "sign-in-account.png", full_page=True)
        cookies = {c["name"]: c for c in watched.context.cookies()}
        session = cookies["opulon_session"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert session["path"] == "/key-status" and not session["secure"]
        assert cookies["opulon_csrf"]["httpOnly"] and cookies["opulon_csrf"]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # no script can read either

        page.locator(f"article[data-prefix='{ci[:16]}'] form.send-again button").click()
        page.wait_for_load_state("load")
        assert f"Key {ci[:16]} is on its way" in page.locator("#notice").inner_text()
        key_mail = fake.wait_for(email, 2)[1]
        assert ci in key_mail["text"] and laptop not in key_mail["text"]

        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.screenshot(path=ARTIFACTS / "sign-in-account-phone.png", full_page=True)
        page.set_viewport_size(DESKTOP)

        assert _click(page, "#sign-out button") == 200
        assert page.url == gateway.url + "/key-status"
        assert "opulon_session" not in {c["name"] for c in watched.context.cookies()}
        page.goto(gateway.url + "/key-status/account")
        assert page.url == gateway.url + "/key-status"

        # An address with no keys: the same page, and no mail.
        assert _ask_code(page, gateway, "nobody@example.org") == 200
        assert _main_text(page).replace("nobody@example.org", "ADDRESS") == code_page
        assert watched.violations() == [], watched.violations()
        elsewhere = [url for url in watched.requested if not url.startswith(gateway.url)]
        assert all(url.startswith("data:") for url in elsewhere), elsewhere
        history = watched.context.new_cdp_session(page).send("Page.getNavigationHistory")
        urls = [entry["url"] for entry in history["entries"]]
    finally:
        watched.close()
    assert fake.mails_to("nobody@example.org") == []
    for text in (*urls, *watched.requested, gateway.output.read_text()):
        for secret in (code, laptop, ci, laptop[16:], ci[16:]):
            assert secret not in text


def test_forms_posted_from_another_site_or_without_their_token_are_refused(
    mail_gateway: tuple[Gateway, FakeResend], browser: Browser
) -> None:
    gateway, fake = mail_gateway
    email = "grace@example.org"
    create_owned_key(gateway, email)
    watched = _Watched(browser, viewport=DESKTOP)
    try:
        page = watched.page
        assert _ask_code(page, gateway, email) == 200
        assert _enter_code(page, fake.code_for(email)) == 200
        assert page.url == gateway.url + "/key-status/account"

        # A page of another site that posts the sign-out form to the gateway.
        attack = (
            f"<form method='post' action='{gateway.url}/key-status/sign-out'>"
            "<input type='hidden' name='csrf_token' value='guessed'>"
            "<button id='go'>Win a prize</button></form>"
        )

        def evil_site(route: Route) -> None:
            route.fulfill(status=200, content_type="text/html", body=attack)

        watched.context.route(EVIL + "/**", evil_site)
        page.goto(EVIL + "/")
        assert _click(page, "#go") == 403
        assert "another site" in page.locator("[role=alert]").inner_text()

        # The page's own form with its token taken out.
        page.goto(gateway.url + "/key-status/account")
        assert page.url == gateway.url + "/key-status/account"  # still signed in
        page.evaluate("document.querySelector('#sign-out [name=csrf_token]').remove()")
        assert _click(page, "#sign-out button") == 403
        assert "expired" in page.locator("[role=alert]").inner_text()
        page.goto(gateway.url + "/key-status/account")
        assert page.url == gateway.url + "/key-status/account"  # still signed in
    finally:
        watched.close()


def test_five_wrong_codes_lock_the_code(
    mail_gateway: tuple[Gateway, FakeResend], browser: Browser
) -> None:
    gateway, fake = mail_gateway
    email = "locked@example.org"
    create_owned_key(gateway, email)
    watched = _Watched(browser, viewport=DESKTOP)
    try:
        page = watched.page
        assert _ask_code(page, gateway, email) == 200
        code = fake.code_for(email)
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        statuses = [_enter_code(page, wrong) for _ in range(5)]
        assert statuses == [401] * 5
        assert "locked" in page.locator("[role=alert]").inner_text()
        page.screenshot(path=ARTIFACTS / "sign-in-locked.png", full_page=True)
        # The right code now: refused (this connection has also used up its tries for now).
        assert _enter_code(page, code) in (401, 429)
        assert page.url != gateway.url + "/key-status/account"
        assert "opulon_session" not in {c["name"] for c in watched.context.cookies()}
        assert watched.violations() == []
    finally:
        watched.close()
