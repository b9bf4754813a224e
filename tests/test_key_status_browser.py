"""``/key-status`` in a real headless Chromium, driven over the DevTools protocol.

The key is typed into the form and submitted with a click, as a person would; the numbers are
read off the rendered page; screenshots go to ``artifacts/`` (desktop and phone width). The key
must end up in no URL and no history entry, and the page must load nothing from elsewhere.

Chromium comes from Debian (``.ci/install-browser``); without it these tests are skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from gateway_helpers import Gateway, start_gateway

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed: run .ci/install-browser as root (it uses apt-get)",
)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "status page"}]}
DAY = 86400


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._event_seen = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)
                self._event_seen.set()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 15)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def wait_for(self, method: str, since: int, timeout: float = 15) -> dict[str, Any]:
        """The first event ``method`` after the first ``since`` events."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[since:]:
                if event["method"] == method:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {method} event within {timeout} s")
            self._event_seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_seen.wait(), remaining)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    async def navigate(self, url: str) -> None:
        mark = len(self.events)
        await self.send("Page.navigate", url=url)
        await self.wait_for("Page.loadEventFired", mark)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def screenshot(self, path: Path, *, full_page: bool) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": math.ceil(size["width"]),
                "height": math.ceil(size["height"]),
                "scale": 1,
            }
        data = await self.send("Page.captureScreenshot", **params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[int]:
    """A headless Chromium with a DevTools port; yields the port."""
    assert CHROMIUM is not None
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        yield int(port_file.read_text().split()[0])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def open_page(port: int) -> AsyncIterator[DevTools]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        target = next(t for t in targets if t["type"] == "page")
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        tools = DevTools(ws)
        try:
            await tools.send("Page.enable")
            await tools.send("Network.enable")
            yield tools
        finally:
            await tools.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("browser"))
    yield gw
    gw.stop()
    gw.mock.stop()


def _seed_history(gateway: Gateway, key: str) -> None:
    """Earlier days of use, as the proxy would have stored them, so the chart has a shape."""
    with sqlite3.connect(gateway.home / "opulon.db") as conn:
        (key_id,) = conn.execute(
            "SELECT key_id FROM credentials WHERE prefix = ?", [key[:16]]
        ).fetchone()
        rng = random.Random(7)
        now = time.time()
        rows = []
        for days_ago in range(2, 30):
            if days_ago % 9 == 4:
                continue  # a few quiet days
            weekday_factor = 0.35 if days_ago % 7 in (0, 1) else 1.0
            for _ in range(int(rng.randint(4, 12) * weekday_factor) + 1):
                ts = now - days_ago * DAY + rng.uniform(-3600, 3600)
                rows.append(
                    (key_id, key[:16], ts, "gpt-4o-mini", 200, rng.uniform(200, 1800),
                     rng.randint(800, 6000), rng.randint(200, 2500))
                )  # fmt: skip
        conn.executemany(
            "INSERT INTO usage (key_id, key_prefix, ts, model, status, latency_ms, "
            "input_tokens, output_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


# (endpoint, model, output tokens, upstream status) of the requests sent before the look-up.
TRAFFIC = (
    ("/v1/chat/completions", "gpt-4o-mini", 300, 200),
    ("/v1/chat/completions", "gpt-4o", 420, 200),
    ("/v1/messages", "claude-3-5-haiku", 260, 200),
    ("/v1/chat/completions", "gpt-4o", 1, 500),
    ("/v1/chat/completions", "gpt-4o-mini", 510, 200),
)


def test_a_person_checks_their_key_in_a_browser(gateway: Gateway, tmp_path: Path) -> None:
    # Windows of at most a day: the seeded history (two days ago and older) stays outside.
    key = gateway.new_key("requests:10/1m", "output_tokens:2k/1h", "tokens:1.5M/1d")
    _seed_history(gateway, key)
    prompt = "Summarise the status of my key, please. " * 50
    with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=10) as client:
        for path, model, chunks, status in TRAFFIC:
            body = {
                "model": model,
                "max_tokens": 600,
                "messages": [{"role": "user", "content": prompt}],
                "mock": {"chunks": chunks, "status": status if status != 200 else None},
            }
            headers = {"anthropic-version": "2023-06-01"}
            response = client.post(gateway.url + path, json=body, headers=headers)
            assert response.status_code == status, response.text
    with chromium(tmp_path / "profile") as port:
        page = asyncio.run(_check_in_browser(gateway, key, port))
    assert page["status"] == "active"
    limits = {limit["metric"]: limit for limit in page["limits"]}
    assert (limits["requests"]["used"], limits["requests"]["remaining"]) == (5, 5)
    output = sum(chunks for _, _, chunks, status in TRAFFIC if status == 200)
    assert limits["output_tokens"]["used"] == output
    assert limits["output_tokens"]["remaining"] == 2000 - output
    assert limits["requests"]["label"] == "Requests per minute"
    rows = page["rows"]
    assert len(rows) == 20  # the newest 20 of the seeded and the proxied requests
    newest = list(reversed(TRAFFIC))
    assert [(row["model"], row["status"]) for row in rows[:5]] == [
        (model, status) for _, model, _, status in newest
    ]
    assert rows[0]["cells"][4] == f"{newest[0][2]:,}"  # tokens out, as shown
    assert rows[1]["cells"][4] == "0"  # the failed request used nothing
    for text in page["texts"]:
        assert key not in text
    assert key not in gateway.output.read_text()


async def _check_in_browser(gateway: Gateway, key: str, port: int) -> dict[str, Any]:
    async with open_page(port) as tools:
        await tools.send(
            "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
            mobile=False,
        )  # fmt: skip
        await tools.navigate(gateway.url + "/key-status")
        assert await tools.evaluate("document.title") == "Key status · Opulon"
        await tools.screenshot(ARTIFACTS / "key-status-form.png", full_page=True)

        # A wrong key first: the page says so, with status 401, and keeps the form.
        await tools.send("DOM.getDocument")
        await tools.evaluate("document.querySelector('#key').focus()")
        await tools.send("Input.insertText", text=key[:-4] + "zzzz")
        mark = len(tools.events)
        await tools.click("button[type=submit]")
        await tools.wait_for("Page.loadEventFired", mark)
        response = next(
            e["params"]["response"]
            for e in tools.events[mark:]
            if e["method"] == "Network.responseReceived" and e["params"]["type"] == "Document"
        )
        assert response["status"] == 401
        error = await tools.evaluate("document.querySelector('[role=alert]').textContent")
        assert "not known" in error

        # The real key, typed and submitted like a person would.
        await tools.evaluate("document.querySelector('#key').focus()")
        await tools.send("Input.insertText", text=key)
        mark = len(tools.events)
        await tools.click("button[type=submit]")
        await tools.wait_for("Page.loadEventFired", mark)
        page: dict[str, Any] = await tools.evaluate(
            """(() => ({
              status: document.querySelector('#status').dataset.status,
              limits: [...document.querySelectorAll('[data-limit]')].map(el => ({
                metric: el.dataset.metric, used: +el.dataset.used,
                remaining: +el.dataset.remaining, amount: +el.dataset.amount,
                progress: +el.querySelector('progress').value,
                label: el.querySelector('label').textContent,
              })),
              rows: [...document.querySelectorAll('#recent tbody tr')].map(tr => ({
                model: tr.dataset.model, status: +tr.dataset.status,
                cells: [...tr.cells].map(td => td.textContent),
              })),
              chart: document.querySelector('svg[role=img]').getAttribute('aria-label'),
              bars: document.querySelectorAll('svg g[data-day]').length,
              href: location.href,
              historyLength: history.length,
              html: document.documentElement.outerHTML,
              formValue: document.querySelector('#key').value,
            }))()"""
        )
        assert page["href"] == gateway.url + "/key-status"
        assert page["formValue"] == ""
        assert page["bars"] == 30 and page["chart"].startswith("Tokens per day")
        assert all(limit["progress"] == limit["used"] for limit in page["limits"])
        history = await tools.send("Page.getNavigationHistory")
        entries = history["entries"]
        assert page["historyLength"] == len(entries)
        requested = [
            e["params"]["request"]["url"]
            for e in tools.events
            if e["method"] == "Network.requestWillBeSent"
        ]
        # Nothing but the gateway itself was asked for anything: no CDN, no font, no script.
        assert requested and all(url.startswith(gateway.url) for url in requested), requested
        page["texts"] = [
            page["href"],
            page["html"],
            *requested,
            *(entry["url"] for entry in entries),
            *(entry["title"] for entry in entries),
        ]

        await tools.screenshot(ARTIFACTS / "key-status.png", full_page=True)
        await tools.send(
            "Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
            mobile=True,
        )  # fmt: skip
        await asyncio.sleep(0.2)
        width = await tools.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, "the page scrolls sideways on a phone"
        await tools.screenshot(ARTIFACTS / "key-status-phone.png", full_page=False)
        await tools.screenshot(ARTIFACTS / "key-status-phone-full.png", full_page=True)
        return page
