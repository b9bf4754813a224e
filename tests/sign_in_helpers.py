"""A fake Resend on loopback that records every mail, and a gateway whose email goes to it."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from gateway_helpers import Gateway, start_gateway

from opulon.email_settings import EmailSettingsStore
from opulon.keys import KeyStore
from opulon.settings import Settings
from opulon.storage import open_store

RESEND_KEY = "re_fake_0123456789abcdef"
CODE = re.compile(r"\b(\d{6})\b")


@dataclass
class FakeResend:
    """``POST /emails`` as Resend answers it; ``fail`` makes it answer 500 instead."""

    mails: list[dict[str, Any]] = field(default_factory=list)
    fail: bool = False
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeResend:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("content-length", "0")), 1_000_000)
                body = json.loads(self.rfile.read(length) or b"{}")
                authorised = self.headers.get("authorization") == f"Bearer {RESEND_KEY}"
                if self.path != "/emails" or not authorised:
                    self._answer(401, {"message": "unauthorised"})
                elif fake.fail:
                    self._answer(500, {"message": "internal error"})
                else:
                    fake.mails.append(body)
                    self._answer(200, {"id": f"mail-{len(fake.mails)}"})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

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
