"""A gateway whose email goes to the fake Resend of the mail tests, and what the sign-in tests
read of it."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
from gateway_helpers import Gateway, start_gateway
from mail_fakes import FakeEmailAPI, Reply

from opulon.email_settings import EmailSettingsStore
from opulon.keys import KeyStore
from opulon.mail import ATTEMPTS
from opulon.settings import Settings
from opulon.storage import open_store

RESEND_KEY = "re_fake_0123456789abcdef"
CODE = re.compile(r"\b(\d{6})\b")


class FakeResend(FakeEmailAPI):
    """The mail tests' fake Resend (it checks each request as Resend's API expects it), with
    what the sign-in tests read of it: the mails to an address, and the code in one."""

    def __init__(self) -> None:
        super().__init__("resend", RESEND_KEY)

    @property
    def mails(self) -> list[dict[str, Any]]:
        return list(self.sent)

    def fail_next(self, count: int = ATTEMPTS) -> None:
        """Answer the next ``count`` requests with a 500 (every attempt of one mail)."""
        self.script.extend(Reply(500, {"statusCode": 500, "name": "internal_server_error",
                                       "message": "try later"}) for _ in range(count))  # fmt: skip

    def mails_to(self, address: str) -> list[dict[str, Any]]:
        return [mail for mail in self.mails if mail["to"] == [address]]

    def wait_for(self, address: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The mails to ``address`` once there are ``count`` of them (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.mails_to(address)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{count} mails to {address} did not arrive: {self.mails}")

    def code_for(self, address: str, count: int = 1) -> str:
        """The code of the ``count``-th mail to ``address``."""
        mail = self.wait_for(address, count)[count - 1]
        found = CODE.search(mail["text"])
        assert found, mail["text"]
        return found.group(1)


def start_mail_gateway(base: Path) -> tuple[Gateway, FakeResend]:
    """A live gateway whose email goes to a fake Resend on loopback."""
    fake = FakeResend().start()
    home = base / "home"
    store = open_store(Settings(home=home))
    try:
        EmailSettingsStore(store).configure(
            provider="resend",
            sender="Opulon <keys@example.org>",
            secret=RESEND_KEY,
            base_url=fake.url,
            public_url="https://gateway.example.org",
        )
    finally:
        store.close()
    return start_gateway(base), fake


def create_owned_key(gateway: Gateway, email: str, *limits: str, name: str = "test") -> str:
    """A key issued to ``email``, once the server knows it."""
    from opulon.limits import parse_limit

    store = open_store(Settings(home=gateway.home))
    try:
        _, key = KeyStore(store).create(
            name, email=email, limits=[parse_limit(text) for text in limits]
        )
    finally:
        store.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        answer = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        if answer.status_code == 200:
            return key
        time.sleep(0.02)
    raise AssertionError("the server did not pick up a new key within 5 s")


_TOKEN = re.compile(r"name='csrf_token' value='([0-9a-f]+)'")


def form_token(client: httpx.Client, path: str = "/key-status") -> str:
    """The forms' token of a page, as a browser gets it (with its cookie, kept by the client)."""
    found = _TOKEN.search(client.get(path).text)
    assert found, "the page carries no form token"
    return found.group(1)


def look_up(client: httpx.Client, key: str) -> httpx.Response:
    """The key look-up form sent as the page sends it: with its token."""
    return client.post("/key-status", data={"key": key, "csrf_token": form_token(client)})
