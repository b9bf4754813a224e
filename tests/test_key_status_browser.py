"""The pages in a real headless Chromium (Debian's), driven by Playwright.

A person types their key into ``/key-status`` and clicks; the numbers are read off the
rendered page; screenshots go to ``artifacts/`` at desktop (1280 px) and phone (390 px)
width. The key must end up in no URL and no history entry, the pages load nothing from
elsewhere, the stylesheet comes from the gateway with a year's cache, and Chromium reports
no Content-Security-Policy violation on ``/``, ``/privacy`` or ``/key-status``.

Chromium comes from Debian (``.ci/install-browser``); without it these tests skip, except on
CI (``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import pytest
from gateway_helpers import Gateway, start_gateway

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
DAY = 86400
CACHED_FOR_A_YEAR = "public, max-age=31536000, immutable"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Every CSP violation the page sees, whatever the console says about it.
WATCH_VIOLATIONS = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', (event) => {
  window.__violations.push(`${event.effectiveDirective} ${event.blockedURI}`);
});
"""


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/install-browser)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        _missing("Chromium is not installed: run .ci/install-browser as root (it uses apt-get)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("browser"))
    yield gw
    gw.stop()
    gw.mock.stop()


class _Watched:
    """A page with everything it asked for, got, and said on the console, recorded."""

    def __init__(self, browser: Browser, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.context.add_init_script(WATCH_VIOLATIONS)
        self.page: Page = self.context.new_page()
        self.requested: list[str] = []
        self.responses: list[tuple[str, int, dict[str, str]]] = []
        self.console: list[str] = []
        self.page.on("request", lambda request: self.requested.append(request.url))
        self.page.on(
            "response",
            lambda response: self.responses.append(
                (response.url, response.status, response.headers)
            ),
        )
        self.page.on("console", lambda message: self.console.append(message.text))

    def violations(self) -> list[str]:
        """CSP violations: the page's own reports, and what Chromium said of them."""
        found: list[str] = self.page.evaluate("window.__violations")
        said = [m for m in self.console if "Content Security Policy" in m or "Refused to" in m]
        return found + said

    def close(self) -> None:
        self.context.close()


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

READ_THE_PAGE = """() => ({
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
  yLabels: [...document.querySelectorAll('.chart .y')].map(el => el.getBoundingClientRect().toJSON()),
  plot: document.querySelector('.chart svg').getBoundingClientRect().toJSON(),
  href: location.href,
  historyLength: history.length,
  html: document.documentElement.outerHTML,
  formValue: document.querySelector('#key').value,
})"""


def _send_traffic(gateway: Gateway, key: str) -> None:
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


def _submit(page: Page, key: str) -> int:
    """Type the key into the form and click the button, as a person would; the status."""
    page.locator("#key").press_sequentially(key)
    with page.expect_response(lambda r: r.request.resource_type == "document") as answer:
        page.locator("button[type=submit]").click()
    page.wait_for_load_state("load")
    status: int = answer.value.status
    return status


def test_a_person_checks_their_key_in_a_browser(gateway: Gateway, browser: Browser) -> None:
    # Windows of at most a day: the seeded history (two days ago and older) stays outside.
    key = gateway.new_key("requests:10/1m", "output_tokens:2k/1h", "tokens:1.5M/1d")
    _seed_history(gateway, key)
    _send_traffic(gateway, key)
    watched = _Watched(browser, viewport=DESKTOP)
    try:
        page = watched.page
        page.goto(gateway.url + "/key-status")
        assert page.title() == "Key status · Opulon"
        page.screenshot(path=ARTIFACTS / "key-status-form.png", full_page=True)

        # A wrong key first: the page says so, with status 401, and keeps the form.
        assert _submit(page, key[:-4] + "zzzz") == 401
        assert "not known" in page.locator("[role=alert]").text_content()

        assert _submit(page, key) == 200
        shown: dict[str, Any] = page.evaluate(READ_THE_PAGE)
        assert shown["href"] == gateway.url + "/key-status"
        assert shown["formValue"] == ""
        assert shown["bars"] == 30 and shown["chart"].startswith("Tokens per day")
        assert all(limit["progress"] == limit["used"] for limit in shown["limits"])
        # The y-axis labels sit left of the plot at its top, middle and bottom (placed by the
        # stylesheet, not by inline styles).
        plot = shown["plot"]
        centres = [(label["top"] + label["bottom"]) / 2 for label in shown["yLabels"]]
        middle = (plot["top"] + plot["bottom"]) / 2
        wanted = (plot["top"], middle, plot["bottom"])
        assert [round(c - y) for c, y in zip(centres, wanted, strict=True)] == [0, 0, 0]
        assert all(label["right"] <= plot["left"] for label in shown["yLabels"])
        history = watched.context.new_cdp_session(page).send("Page.getNavigationHistory")
        entries = history["entries"]
        assert shown["historyLength"] == len(entries)
        page.screenshot(path=ARTIFACTS / "key-status.png", full_page=True)

        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], "the page scrolls sideways on a phone"
        page.screenshot(path=ARTIFACTS / "key-status-phone-desktop-engine.png", full_page=True)

        # Nothing but the gateway itself was asked for anything: no CDN, no font, no script.
        elsewhere = [url for url in watched.requested if not url.startswith(gateway.url)]
        assert watched.requested and all(url.startswith("data:") for url in elsewhere), elsewhere
        assert watched.violations() == []
        # The wrong key's 401 is the one thing Chromium has to say.
        assert len(watched.console) == 1 and "401" in watched.console[0], watched.console
        texts = [
            shown["href"],
            shown["html"],
            *watched.requested,
            *(entry["url"] for entry in entries),
            *(entry["title"] for entry in entries),
        ]
    finally:
        watched.close()

    assert shown["status"] == "active"
    limits = {limit["metric"]: limit for limit in shown["limits"]}
    assert (limits["requests"]["used"], limits["requests"]["remaining"]) == (5, 5)
    output = sum(chunks for _, _, chunks, status in TRAFFIC if status == 200)
    assert limits["output_tokens"]["used"] == output
    assert limits["output_tokens"]["remaining"] == 2000 - output
    assert limits["requests"]["label"] == "Requests per minute"
    rows = shown["rows"]
    assert len(rows) == 20  # the newest 20 of the seeded and the proxied requests
    newest = list(reversed(TRAFFIC))
    assert [(row["model"], row["status"]) for row in rows[:5]] == [
        (model, status) for _, model, _, status in newest
    ]
    assert rows[0]["cells"][4] == f"{newest[0][2]:,}"  # tokens out, as shown
    assert rows[1]["cells"][4] == "0"  # the failed request used nothing
    for text in texts:
        assert key not in text
    assert key not in gateway.output.read_text()


def test_the_status_page_on_a_phone(gateway: Gateway, browser: Browser) -> None:
    key = gateway.new_key("requests:10/1m", "tokens:1.5M/1d")
    _seed_history(gateway, key)
    _send_traffic(gateway, key)
    watched = _Watched(
        browser, viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    try:
        page = watched.page
        page.goto(gateway.url + "/key-status")
        page.screenshot(path=ARTIFACTS / "key-status-form-phone.png", full_page=True)
        assert _submit(page, key) == 200
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        # On a phone the recent requests are cards, not a table wider than the screen.
        table = page.locator("#recent").bounding_box()
        assert table is not None and table["width"] <= PHONE["width"]
        page.screenshot(path=ARTIFACTS / "key-status-phone.png", full_page=False)
        page.screenshot(path=ARTIFACTS / "key-status-phone-full.png", full_page=True)
        for section in ("limits", "chart", "recent"):
            page.locator(f"section[aria-labelledby={section}-title]").screenshot(
                path=ARTIFACTS / f"key-status-phone-{section}.png"
            )
        assert watched.violations() == [] and watched.console == [], watched.console
    finally:
        watched.close()


@pytest.mark.parametrize(("path", "name"), [("/", "landing"), ("/privacy", "privacy")])
def test_the_pages_break_no_content_security_rule_and_load_one_cached_stylesheet(
    gateway: Gateway, browser: Browser, path: str, name: str
) -> None:
    for viewport, suffix in ((DESKTOP, ""), (PHONE, "-phone")):
        watched = _Watched(browser, viewport=viewport)
        try:
            page = watched.page
            answer = page.goto(gateway.url + path)
            assert answer is not None and answer.status == 200
            page.wait_for_load_state("load")
            assert watched.violations() == [] and watched.console == [], watched.console
            sheets = [r for r in watched.responses if r[0].endswith(".css")]
            assert len(sheets) == 1, watched.responses
            url, status, headers = sheets[0]
            assert url.startswith(gateway.url + "/static/opulon.") and status == 200
            assert headers["cache-control"] == CACHED_FOR_A_YEAR
            # The stylesheet applies: the body's margin comes from it, not from the browser.
            assert page.evaluate("getComputedStyle(document.body).margin") == "0px"
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
            assert all(r.startswith(gateway.url) for r in watched.requested), watched.requested
            page.screenshot(path=ARTIFACTS / f"{name}{suffix}.png", full_page=True)
        finally:
            watched.close()


def test_the_violation_watch_sees_inline_code(gateway: Gateway, browser: Browser) -> None:
    """The pages' policy refuses inline style and script, and the watch above reports it."""
    watched = _Watched(browser, viewport=DESKTOP)
    try:
        page = watched.page
        page.goto(gateway.url + "/privacy")
        page.evaluate(
            "document.head.insertAdjacentHTML('beforeend', '<style>body{margin:3px}</style>')"
        )
        page.wait_for_function("window.__violations.length > 0")
        assert any(v.startswith("style-src") for v in watched.violations())
        assert page.evaluate("getComputedStyle(document.body).margin") == "0px"  # refused
    finally:
        watched.close()
