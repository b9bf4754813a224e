"""``/key-status`` and ``GET /v1/key-status`` against a live gateway: the numbers a key holder
sees, the refusals, the throttling of failed look-ups, and what is never logged or stored."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_helpers import Gateway, cli, start_gateway
from sign_in_helpers import look_up

from opulon.formatting import compact, grouped, window_text
from opulon.gateway.key_status import FailureThrottle
from opulon.gateway.page_frame import PageFrame
from opulon.key_status_data import DayUsage, RecentRequest, build_status, read_usage, status_json
from opulon.keys import KeyRecord, KeyStore
from opulon.limit_use import LimitState
from opulon.limits import parse_limit
from opulon.settings import Settings
from opulon.site_settings import SiteSettings
from opulon.storage import Store, open_store
from opulon.usage import UsageRow, UsageWriter
from opulon.web.site import environment
from opulon.web.views import tokens_chart

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "How much is left?"}]}
# IPv4, and IPv6 written with "::" or with five or more groups (so clock times don't match).
IP_ADDRESS = re.compile(
    r"\b(?:\d{1,3}\.){3}\d{1,3}\b|[0-9a-f]*::[0-9a-f:]*|\b(?:[0-9a-f]{1,4}:){4,7}[0-9a-f]{1,4}\b",
    re.I,
)
_addresses = iter(range(2, 250))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("key-status"))
    yield gw
    gw.stop()
    gw.mock.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    """A client with a loopback address of its own, so each test has its own failure count."""
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
    with httpx.Client(base_url=gateway.url, transport=transport, timeout=15) as http:
        yield http


def _chat(client: httpx.Client, key: str, **extra: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/chat/completions", json={**CHAT, **extra}, headers={"authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


def _status(client: httpx.Client, key: str) -> dict[str, Any]:
    response = client.get("/v1/key-status", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


class _Elements(HTMLParser):
    """Every start tag of a document with its attributes, and the document's text."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, attribute: str) -> list[dict[str, str]]:
        return [attrs for _, attrs in self.tags if attribute in attrs]


def _create_key(gateway: Gateway, *limits: str, name: str = "status test", **options: Any) -> str:
    """A key made in the database, once the running server knows it."""
    store = open_store(Settings(home=gateway.home))
    try:
        _, key = KeyStore(store).create(name, limits=[parse_limit(t) for t in limits], **options)
    finally:
        store.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        response = httpx.get(gateway.url + "/v1/key-status", headers={"x-api-key": key})
        if response.status_code == 200:
            return key
        time.sleep(0.05)
    raise AssertionError("the server did not pick up the new key")


# -- the page ---------------------------------------------------------------------------------


def test_the_form_page_loads_nothing_from_elsewhere_and_is_never_cached(
    client: httpx.Client,
) -> None:
    response = client.get("/key-status")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp
    page = _Elements(response.text)
    forms = [attrs for tag, attrs in page.tags if tag == "form"]
    assert forms == [
        {"class": "key", "method": "post", "action": "/key-status", "autocomplete": "off"}
    ]
    field = next(attrs for tag, attrs in page.tags if tag == "input")
    assert field["name"] == "key" and field["type"] == "password"
    assert any(tag == "label" and attrs.get("for") == field["id"] for tag, attrs in page.tags)
    assert ("html", {"lang": "en"}) in page.tags and any(tag == "main" for tag, _ in page.tags)
    assert not any(tag == "script" for tag, _ in page.tags)
    for _, attrs in page.tags:
        for name in ("src", "href", "action"):
            assert not attrs.get(name, "").startswith(("http:", "https:", "//")), attrs


def test_posting_the_key_shows_its_status_limits_and_recent_requests(
    gateway: Gateway, client: httpx.Client
) -> None:
    key = gateway.new_key("requests:100/1m", "tokens:1.5M/1d", "output_tokens:2k/5h")
    usages = [_chat(client, key, model=model) for model in ("gpt-4o-mini", "gpt-4o", "gpt-4o")]
    tokens = sum(u["total_tokens"] for u in usages)
    output = sum(u["completion_tokens"] for u in usages)

    response = look_up(client, key)
    assert response.status_code == 200
    assert "no-store" in response.headers["cache-control"]
    assert response.headers["referrer-policy"] == "no-referrer"
    assert key not in response.text  # never echoed back
    page = _Elements(response.text)
    (status,) = page.having("data-status")[:1]
    assert status["data-status"] == "active"
    limits = {attrs["data-limit"]: attrs for attrs in page.having("data-limit")}
    assert set(limits) == {"requests:100/1m", "tokens:1.5M/1d", "output_tokens:2k/5h"}
    assert (
        limits["requests:100/1m"]["data-used"],
        limits["requests:100/1m"]["data-remaining"],
    ) == ("3", "97")
    assert limits["tokens:1.5M/1d"]["data-used"] == str(tokens)
    assert limits["tokens:1.5M/1d"]["data-remaining"] == str(1_500_000 - tokens)
    assert limits["output_tokens:2k/5h"]["data-remaining"] == str(2000 - output)
    text = " ".join(" ".join(page.text).split())
    assert f"{1_500_000 - tokens:,} left of 1,500,000" in text  # thousands separators
    assert "of 1.5M used" in text
    progress = [attrs for tag, attrs in page.tags if tag == "progress"]
    assert [p["value"] for p in progress] == ["3", str(tokens), str(output)]
    rows = [attrs for tag, attrs in page.tags if tag == "tr" and "data-model" in attrs]
    assert [(r["data-model"], r["data-status"]) for r in rows] == [
        ("gpt-4o", "200"), ("gpt-4o", "200"), ("gpt-4o-mini", "200"),
    ]  # fmt: skip
    assert [int(r["data-output-tokens"]) for r in rows] == [
        u["completion_tokens"] for u in reversed(usages)
    ]
    (chart,) = [attrs for tag, attrs in page.tags if tag == "svg"]
    assert chart["role"] == "img" and f"{tokens:,} in total" in chart["aria-label"]
    assert len(page.having("data-day")) == 30


def test_the_json_form_gives_the_same_numbers(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("requests:10/1m", "tokens:100k/1d")
    usages = [_chat(client, key), _chat(client, key, model="gpt-4o")]
    tokens = sum(u["total_tokens"] for u in usages)
    data = _status(client, key)
    assert data["key"]["prefix"] == key[:16] and data["key"]["status"] == "active"
    assert data["key"]["expires_at"] is None
    requests, token_limit = data["limits"]
    assert (requests["limit"], requests["used"], requests["remaining"]) == ("requests:10/1m", 2, 8)
    assert 0 < requests["reset_seconds"] <= 60
    assert (token_limit["used"], token_limit["remaining"]) == (tokens, 100_000 - tokens)
    today = datetime.now(UTC).date().isoformat()
    assert len(data["daily"]) == 30 and data["daily"][-1]["date"] == today
    assert data["daily"][-1]["tokens"] == tokens and data["daily"][-1]["requests"] == 2
    assert sum(day["tokens"] for day in data["daily"]) == tokens
    recent = data["recent"]
    assert [(r["model"], r["status"]) for r in recent] == [("gpt-4o", 200), ("gpt-4o-mini", 200)]
    assert recent[0]["input_tokens"] == usages[1]["prompt_tokens"]
    assert recent[0]["output_tokens"] == usages[1]["completion_tokens"]
    assert recent[0]["latency_ms"] > 0 and recent[0]["time"].endswith("Z")
    by_header = client.get("/v1/key-status", headers={"x-api-key": key})
    assert by_header.status_code == 200
    assert [(lim["used"], lim["remaining"]) for lim in by_header.json()["limits"]] == [
        (lim["used"], lim["remaining"]) for lim in data["limits"]
    ]
    assert by_header.headers["cache-control"] == "no-store"


def test_requests_in_flight_count_against_the_limits(
    gateway: Gateway, client: httpx.Client
) -> None:
    key = gateway.new_key("requests:5/1m")
    worker = threading.Thread(
        target=lambda: httpx.post(
            gateway.url + "/v1/chat/completions",
            json={**CHAT, "mock": {"latency-ms": 1500}},
            headers={"authorization": f"Bearer {key}"},
            timeout=15,
        )
    )
    worker.start()
    try:
        deadline = time.monotonic() + 1.2
        while True:
            data = _status(client, key)
            if data["limits"][0]["used"] == 1:
                break
            assert time.monotonic() < deadline, "the request in flight was not counted"
            time.sleep(0.02)
        assert data["limits"][0]["remaining"] == 4
        assert data["recent"] == []  # not finished, so not recorded yet
    finally:
        worker.join()
    # The row is written just after the answer has gone, so it may take a moment to show.
    deadline = time.monotonic() + 2
    while not (data := _status(client, key))["recent"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert data["limits"][0]["used"] == 1 and len(data["recent"]) == 1


def test_a_disabled_or_expired_key_still_sees_its_status(
    gateway: Gateway, client: httpx.Client
) -> None:
    key = gateway.new_key("requests:10/1m")
    _chat(client, key)
    cli(gateway.home, "keys", "disable", key[:16])
    deadline = time.monotonic() + 2
    while (data := _status(client, key))["key"]["status"] != "disabled":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert data["limits"][0]["used"] == 1
    page = look_up(client, key)
    assert page.status_code == 200 and "data-status='disabled'" in page.text

    expiring = _create_key(gateway, "requests:10/1m", expires_at=time.time() + 1.0)
    time.sleep(1.1)
    data = _status(client, expiring)
    assert data["key"]["status"] == "expired" and data["key"]["expires_at"].endswith("Z")
    assert look_up(client, expiring).text.count("Expired") >= 1


# -- refusals ---------------------------------------------------------------------------------


def test_unknown_keys_get_401_in_openai_shape_and_a_page_that_says_so(
    gateway: Gateway, client: httpx.Client
) -> None:
    key = gateway.new_key()
    wrong = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
    response = client.get("/v1/key-status", headers={"authorization": f"Bearer {wrong}"})
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key" and "not known" in error["message"]
    missing = client.get("/v1/key-status")
    assert (
        missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    )
    malformed = client.get("/v1/key-status", headers={"x-api-key": "sk-not-ours"})
    assert malformed.status_code == 401 and "op-ul-" in malformed.json()["error"]["message"]

    page = look_up(client, wrong)
    assert page.status_code == 401
    assert "role='alert'" in page.text and "The API key is not known to this gateway." in page.text
    assert "<form" in page.text and wrong not in page.text
    assert page.headers["cache-control"] == "no-store"


def test_a_key_in_the_query_string_is_refused_and_never_logged(
    gateway: Gateway, client: httpx.Client
) -> None:
    key = gateway.new_key()
    for query in (f"?api_key={key}", f"?key={key}", f"?{key}"):
        response = client.get("/v1/key-status" + query)
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "Authorization: Bearer" in message and "URL" in message
        page = client.get("/key-status" + query)
        assert page.status_code == 400 and "Never put an API key in a URL" in page.text
        assert key not in page.text
    # Even with the right header, a query string is refused rather than ignored.
    both = client.get(f"/v1/key-status?key={key}", headers={"authorization": f"Bearer {key}"})
    assert both.status_code == 400
    assert client.get("/key-status?utm_source=mail").status_code == 200
    assert key not in gateway.output.read_text()


def test_repeated_failures_are_slowed_then_refused_per_client_and_nothing_is_logged(
    gateway: Gateway, client: httpx.Client
) -> None:
    key = gateway.new_key()
    guesses = [key[:16] + f"{n:02d}" + key[18:] for n in range(10, 17)]
    started = time.monotonic()
    for guess in guesses[:3]:
        assert look_up(client, guess).status_code == 401
    for guess in guesses[3:5]:
        response = client.get("/v1/key-status", headers={"authorization": f"Bearer {guess}"})
        assert response.status_code == 401
    assert time.monotonic() - started >= 0.2 + 0.4 + 0.6 + 0.8 + 1.0 - 0.05  # growing delays

    refused = look_up(client, guesses[5])
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "Too many attempts" in refused.text and "try again in" in refused.text
    # The right key is refused too while the client is held back, without a lookup.
    as_json = client.get("/v1/key-status", headers={"x-api-key": key})
    assert as_json.status_code == 429 and "retry-after" in as_json.headers
    error = as_json.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "try again in" in error["message"]

    # Another client is not affected.
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
    with httpx.Client(base_url=gateway.url, transport=transport, timeout=15) as other:
        assert other.get("/v1/key-status", headers={"x-api-key": key}).status_code == 200

    output = gateway.output.read_text()
    assert key not in output and key[16:] not in output
    for guess in guesses:
        assert guess[16:] not in output
    assert not IP_ADDRESS.search(output), IP_ADDRESS.search(output)


def test_status_look_ups_are_not_recorded_as_usage(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("requests:10/1m")
    _chat(client, key)
    _chat(client, key)
    assert len(gateway.rows(key, wait_for=2)) == 2
    for _ in range(3):
        _status(client, key)
        assert look_up(client, key).status_code == 200
    time.sleep(1.0)  # twice the flush interval
    assert len(gateway.rows(key)) == 2
    assert _status(client, key)["limits"][0]["used"] == 2


# -- the parts --------------------------------------------------------------------------------


def test_the_throttle_slides_its_window_and_holds_no_address() -> None:
    now = [1000.0]
    throttle = FailureThrottle(limit=3, window=60, clock=lambda: now[0])
    client = throttle.client_id("203.0.113.9")
    assert b"203.0.113.9" not in client and len(client) == 16
    assert client == throttle.client_id("203.0.113.9")
    assert FailureThrottle().client_id("203.0.113.9") != client  # a salt of its own
    delays = [throttle.failed(client) for _ in range(3)]
    assert delays == pytest.approx([0.2, 0.4, 0.6])
    assert throttle.retry_after(client) == pytest.approx(60)
    now[0] += 30
    assert throttle.retry_after(client) == pytest.approx(30)
    now[0] += 30
    assert throttle.retry_after(client) is None  # the first failure left the window
    assert throttle.retry_after(throttle.client_id("198.51.100.1")) is None
    assert "203.0.113.9" not in repr(vars(throttle))


def test_an_attempt_counted_before_it_is_checked_is_taken_back_when_it_succeeds() -> None:
    throttle = FailureThrottle(limit=2, window=60, clock=lambda: 5.0)
    client = throttle.client_id("203.0.113.9")
    throttle.failed(client)  # counted up front: parallel attempts all see it
    throttle.refund(client)  # it was right after all
    throttle.failed(client)
    assert throttle.retry_after(client) is None
    throttle.failed(client)
    assert throttle.retry_after(client) == pytest.approx(60)
    throttle.refund(throttle.client_id("198.51.100.1"))  # nothing to take back: no error


def test_the_throttle_forgets_the_oldest_clients_beyond_its_size() -> None:
    throttle = FailureThrottle(limit=2, max_clients=100, clock=lambda: 5.0)
    first = throttle.client_id("client-0")
    throttle.failed(first)
    throttle.failed(first)
    assert throttle.retry_after(first) is not None
    for n in range(1, 500):
        throttle.failed(throttle.client_id(f"client-{n}"))
        assert len(throttle) <= 100
    assert throttle.retry_after(first) is None
    assert throttle.failed(throttle.client_id("client-499")) == pytest.approx(0.4)


def test_numbers_are_grouped_and_compacted() -> None:
    assert grouped(1234567) == "1,234,567"
    assert [compact(n) for n in (0, 999, 1000, 1234, 99_960, 250_000, 999_999, 1_500_000)] == [
        "0", "999", "1k", "1.2k", "100k", "250k", "1M", "1.5M",
    ]  # fmt: skip
    assert compact(3_000_000_000) == "3B"
    assert [window_text(s) for s in (30, 60, 18000, 86400, 90)] == [
        "30 seconds", "1 minute", "5 hours", "1 day", "90 seconds",
    ]  # fmt: skip


def _record(key_id: int, name: str = "laptop") -> KeyRecord:
    return KeyRecord(
        id=key_id, prefix="op-ul-abcdefghij", name=name, email=None, created_at=0.0,
        expires_at=None, status="active", models=(), limits=(), concurrency=None,
    )  # fmt: skip


def test_usage_is_read_per_utc_day_with_the_newest_requests_first(store: Store) -> None:
    key_store = KeyStore(store)
    record, _ = key_store.create("reader")
    now = datetime(2026, 3, 22, 12, 0, tzinfo=UTC).timestamp()
    writer = UsageWriter(store.settings.db_path)
    rows = [
        UsageRow(record.id, record.prefix, now - 3600, "gpt-4o", 200, 12.5, 10, 5),
        UsageRow(
            record.id, record.prefix, now - 13 * 3600, "gpt-4o", 200, 9.0, 7, 3
        ),  # the day before
        UsageRow(record.id, record.prefix, now - 31 * 86400, "old", 200, 1.0, 100, 100),  # too old
        UsageRow(record.id, record.prefix, now - 60, "gpt-4o-mini", 429, 0.4, 0, 0),
    ]
    writer.write(rows)
    writer.close()
    days, recent = read_usage(store.settings.db_path, record.id, now, recent=3)
    assert (
        len(days) == 30 and days[-1].day == date(2026, 3, 22) and days[0].day == date(2026, 2, 21)
    )
    assert (days[-1].requests, days[-1].tokens) == (2, 15)
    assert (days[-2].requests, days[-2].input_tokens, days[-2].output_tokens) == (1, 7, 3)
    assert sum(day.requests for day in days) == 3
    assert [(r.model, r.status) for r in recent] == [
        ("gpt-4o-mini", 429),
        ("gpt-4o", 200),
        ("gpt-4o", 200),
    ]


def test_everything_on_the_page_is_escaped() -> None:
    hostile = "<script>alert(1)</script>'\""
    limit = parse_limit("requests:10/1m")
    status = build_status(
        _record(1, name=hostile),
        [LimitState(limit, 3, 7, 12.0)],
        0,
        [DayUsage(date(2026, 3, 22), 1, 5, 5)],
        [RecentRequest(time.time(), hostile, 200, 5, 5, 3.0)],
        time.time(),
    )
    # The environment the gateway renders its pages with.
    env = environment(stylesheet="/static/opulon.css", consent_script="/static/consent.js")
    template = env.get_template("key_status.html")
    document = template.render(
        status=status, chart=tokens_chart(status.days), error=hostile, error_title=hostile,
        frame=PageFrame(SiteSettings(name=hostile)),
    )  # fmt: skip
    assert hostile not in document and "&lt;script&gt;" in document
    assert "<script" not in document
    # A hostile site name, with the banner and its script on the page, is text too.
    banner = template.render(
        status=status, chart=tokens_chart(status.days), error=None, error_title=None,
        frame=PageFrame(SiteSettings(name=hostile, gtm_id="GTM-ABCD"), nonce="n0nce"),
    )  # fmt: skip
    assert hostile not in banner and banner.count("<script") == 1
    page = _Elements(document)
    assert [attrs["data-model"] for attrs in page.having("data-model")] == [hostile]
    assert hostile in " ".join(page.text)  # shown as text, never as markup
    assert json.loads(json.dumps(status_json(status)))["recent"][0]["model"] == hostile


def test_a_hostile_key_name_is_shown_as_text(gateway: Gateway, client: httpx.Client) -> None:
    hostile = "<img src=x onerror=alert(1)>'<b>"
    key = _create_key(gateway, name=hostile)
    response = look_up(client, key)
    assert response.status_code == 200
    assert hostile not in response.text and "&lt;img src=x onerror=alert(1)&gt;" in response.text
    assert not any(tag in ("img", "b") for tag, _ in _Elements(response.text).tags)


def test_no_usage_draws_an_empty_chart_that_says_so(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("requests:10/1m")
    response = look_up(client, key)
    assert response.status_code == 200
    page = _Elements(response.text)
    (chart,) = [attrs for tag, attrs in page.tags if tag == "svg"]
    assert chart["aria-label"] == "Tokens per day over the last 30 days: no use."
    assert not [attrs for tag, attrs in page.tags if tag == "rect" and attrs["class"] != "hit"]
    assert len(page.having("data-day")) == 30
    assert "No requests yet." in response.text
    assert "Nothing used in the last 1 minute." in " ".join(" ".join(page.text).split())


def _lock_out(client: httpx.Client, key: str, headers: dict[str, str]) -> None:
    guesses = [key[:16] + f"{n:02d}" + key[18:] for n in range(20, 25)]
    for guess in guesses:
        answer = client.get("/v1/key-status", headers={**headers, "x-api-key": guess})
        assert answer.status_code == 401
    answer = client.get("/v1/key-status", headers={**headers, "x-api-key": key})
    assert answer.status_code == 429


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_throttle(
    tmp_path: Path,
) -> None:
    gw = start_gateway(tmp_path, None, "--behind-tls-proxy", "--forwarded-allow-ips",
                       "127.0.0.0/8, ::1")  # fmt: skip
    try:
        key = gw.new_key()
        with httpx.Client(base_url=gw.url, timeout=15) as proxy:
            _lock_out(proxy, key, {"x-forwarded-for": "203.0.113.7"})
            other = {"x-forwarded-for": "198.51.100.4"}
            assert (
                proxy.get("/v1/key-status", headers={**other, "x-api-key": key}).status_code == 200
            )
            # What the client wrote left of the proxy's own entry does not count.
            spoofed = {"x-forwarded-for": "192.0.2.1, 203.0.113.7"}
            assert (
                proxy.get("/v1/key-status", headers={**spoofed, "x-api-key": key}).status_code
                == 429
            )
        output = gw.output.read_text()
        assert "203.0.113.7" not in output and "198.51.100.4" not in output
    finally:
        gw.stop()
        gw.mock.stop()


def test_without_trusted_proxies_a_forwarded_header_changes_nothing(gateway: Gateway) -> None:
    key = gateway.new_key()
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
    with httpx.Client(base_url=gateway.url, transport=transport, timeout=15) as client:
        _lock_out(client, key, {})
        escape = {"x-forwarded-for": "198.51.100.99", "x-api-key": key}
        assert client.get("/v1/key-status", headers=escape).status_code == 429


def test_the_client_is_the_right_most_untrusted_forwarded_address() -> None:
    from opulon.gateway.client_address import client_address, parse_trusted

    trusted = parse_trusted(["10.0.0.0/8,127.0.0.1"])
    assert client_address("127.0.0.1", ["1.1.1.1, 2.2.2.2, 10.0.0.5"], trusted) == "2.2.2.2"
    assert client_address("127.0.0.1", ["1.1.1.1", "3.3.3.3"], trusted) == "3.3.3.3"
    assert client_address("192.0.2.9", ["1.1.1.1"], trusted) == "192.0.2.9"  # untrusted peer
    assert client_address("127.0.0.1", [], trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", ["1.1.1.1"], ()) == "127.0.0.1"
    # An IPv6 client is its /64, however many of its addresses it uses.
    assert client_address("2001:db8:1:2::a", [], ()) == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:2:ffff::1", [], ()) == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:3::1", [], ()) == "2001:db8:1:3::/64"
    assert client_address("::ffff:192.0.2.7", [], ()) == "192.0.2.7"
    assert client_address("127.0.0.1", ["2001:db8::5"], trusted) == "2001:db8::/64"
    with pytest.raises(ValueError, match="'nope'"):
        parse_trusted(["10.0.0.1, nope"])
