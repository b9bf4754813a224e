"""The site's pages against a live gateway: templates under a strict Content-Security-Policy,
one stylesheet under its content hash with a year's cache, and no input that breaks a page."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from gateway_helpers import Gateway, start_gateway
from sign_in_helpers import look_up

from opulon.keys import KeyStore
from opulon.settings import Settings
from opulon.storage import open_store

WEB = Path(__file__).resolve().parent.parent / "opulon" / "web"
STYLESHEET = WEB / "static" / "opulon.css"
POLICY_TEMPLATE = WEB / "templates" / "privacy_policy.txt"
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
STYLESHEET_URL = re.compile(r"/static/opulon\.([0-9a-f]{12})\.css")
_addresses = iter(range(2, 250))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("pages"))
    yield gw
    gw.stop()
    gw.mock.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    """A client with a loopback address of its own, so each test has its own failure count."""
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
    with httpx.Client(base_url=gateway.url, transport=transport, timeout=15) as http:
        yield http


class _Document(HTMLParser):
    """Every start tag with its attributes, the text of <title>, and any inline code."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.title = ""
        self._in_title = False
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))
        self._in_title = tag == "title"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def inline_code(self) -> list[str]:
        """Whatever a CSP without 'unsafe-inline' would block: style and script, inline."""
        found = [tag for tag, _ in self.tags if tag in ("style", "script")]
        for tag, attrs in self.tags:
            found += [f"{tag} {name}" for name in attrs if name == "style" or name.startswith("on")]
            if attrs.get("href", "").lower().startswith("javascript:"):
                found.append(f"{tag} javascript: link")
        return found


def _pages(gateway: Gateway) -> list[tuple[str, httpx.Response]]:
    key = gateway.new_key("requests:10/1m", "tokens:1M/1d")
    with httpx.Client(base_url=gateway.url, timeout=15) as http:
        http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
        ).raise_for_status()
        return [
            ("/", http.get("/")),
            ("/privacy", http.get("/privacy")),
            ("/key-status", http.get("/key-status")),
            ("/key-status", http.get("/key-status?key=op-ul-0123456789")),
            ("/key-status", look_up(http, "op-ul-x")),
            ("/key-status", look_up(http, key)),
        ]


def test_every_page_comes_from_the_templates_under_a_policy_without_unsafe_inline(
    gateway: Gateway,
) -> None:
    pages = _pages(gateway)
    assert [response.status_code for _, response in pages] == [200, 200, 200, 400, 401, 200]
    stylesheets = set()
    for path, response in pages:
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        document = _Document(response.text)
        assert document.inline_code() == [], (path, document.inline_code())
        assert ("html", {"lang": "en"}) in document.tags
        links = [attrs for tag, attrs in document.tags if tag == "link"]
        (sheet,) = [attrs["href"] for attrs in links if attrs.get("rel") == "stylesheet"]
        assert STYLESHEET_URL.fullmatch(sheet), sheet
        stylesheets.add(sheet)
        # Nothing is loaded from anywhere else; the only image is the empty data: icon.
        for _, attrs in document.tags:
            for name in ("src", "href", "action"):
                assert not attrs.get(name, "").startswith(("http:", "https:", "//")), attrs
        current = [
            attrs["href"] for tag, attrs in document.tags if attrs.get("aria-current") == "page"
        ]
        assert current == [path]
        assert "Opulon" in document.title
        assert any(tag == "footer" for tag, _ in document.tags)
    assert len(stylesheets) == 1
    key_status = [response for path, response in pages if path == "/key-status"]
    assert all(response.headers["cache-control"] == "no-store" for response in key_status)


def test_the_landing_page_says_what_the_service_is(client: httpx.Client) -> None:
    text = " ".join(client.get("/").text.split())
    assert "A privacy-first gateway to AI models." in text
    assert "Prompts and answers pass through in memory and are never stored" in text
    assert "href='/key-status'" in text and "href='/privacy'" in text


def test_the_privacy_page_is_the_policy_with_its_headings(client: httpx.Client) -> None:
    policy = POLICY_TEMPLATE.read_text()
    first_line = next(line.strip() for line in policy.splitlines() if line.strip())
    document = _Document(client.get("/privacy").text)
    tags = [tag for tag, _ in document.tags]
    assert tags.count("h1") == 1 and tags.count("h2") >= 3 and "li" in tags
    assert f"<h1>{first_line}</h1>" in client.get("/privacy").text.replace("&#39;", "'")
    assert all(attrs.get("id") for tag, attrs in document.tags if tag in ("h2", "h3"))


def test_the_stylesheet_is_served_under_its_content_hash_and_kept_for_a_year(
    client: httpx.Client,
) -> None:
    page = client.get("/").text
    match = STYLESHEET_URL.search(page)
    assert match is not None
    response = client.get(match.group(0))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/css; charset=utf-8"
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == STYLESHEET.read_bytes()
    assert hashlib.sha256(response.content).hexdigest()[:12] == match.group(1)
    # Only the current name is served: not the bare file, not another hash, nothing else.
    for other in (
        "/static/opulon.css",
        "/static/opulon.000000000000.css",
        "/static/privacy_policy.txt",
        "/static/..%2Ftemplates%2Fprivacy_policy.txt",
        "/static/consent.js",
        "/static/",
    ):
        assert client.get(other).status_code == 404, other


@pytest.mark.parametrize(
    ("method", "path", "options"),
    [
        ("POST", "/key-status", {"content": b"key=\xff\xfe\x00op-ul-", "headers": {
            "content-type": "application/x-www-form-urlencoded"}}),
        ("POST", "/key-status", {"json": {"key": "op-ul-0123456789"}}),
        ("POST", "/key-status", {"files": {"key": ("k", b"op-ul-0123456789")}}),
        ("POST", "/key-status", {"content": b"key=" + b"a" * 10_000, "headers": {
            "content-type": "application/x-www-form-urlencoded"}}),
        ("POST", "/key-status", {"content": b"&".join([b"key=x"] * 50), "headers": {
            "content-type": "application/x-www-form-urlencoded"}}),
        ("POST", "/key-status", {"content": b"%%%=%zz&key", "headers": {
            "content-type": "application/x-www-form-urlencoded; charset=latin-1"}}),
        ("POST", "/key-status", {"data": {"key": "op-ul-" + "\u00e9" * 60}}),
        ("GET", "/key-status?%ff%fe=%00", {}),
        ("GET", "/key-status?" + "a=b&" * 500, {}),
        ("GET", "/v1/key-status", {"headers": {"authorization": "Bearer \u00e9\u00e8".encode("latin-1")}}),
        ("GET", "/v1/key-status", {"headers": {"x-api-key": "op-ul-" + "z" * 500}}),
        ("GET", "/privacy?x=<script>", {}),
        ("GET", "/static/opulon.css%00", {}),
        ("POST", "/", {"data": {"a": "b"}}),
        ("PUT", "/key-status", {"content": b"key=x"}),
        ("DELETE", "/privacy", {}),
    ],
)  # fmt: skip
def test_no_input_makes_a_page_fail(
    client: httpx.Client, method: str, path: str, options: dict[str, object]
) -> None:
    response = client.request(method, path, **options)  # type: ignore[arg-type]
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    if response.status_code >= 400 and "html" in response.headers.get("content-type", ""):
        assert "role='alert'" in response.text  # the page says what went wrong


def test_a_key_without_limits_with_models_concurrency_and_an_expiry(
    gateway: Gateway, client: httpx.Client
) -> None:
    store = open_store(Settings(home=gateway.home))
    try:
        _, key = KeyStore(store).create(
            "laptop", models=["gpt-4o*"], concurrency=2, expires_at=time.time() + 3 * 86400 + 60
        )
    finally:
        store.close()
    deadline = time.monotonic() + 5
    while (response := look_up(client, key)).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)
    text = " ".join(response.text.split())
    assert "This key has no usage limits." in text
    assert "<dd>gpt-4o*</dd>" in text
    assert "of 2 requests in flight" in text and "data-in-flight='0'" in text
    assert "in 3 days" in text
    assert _Document(response.text).inline_code() == []


def test_head_answers_every_page_and_the_stylesheet_as_get_does_without_a_body(
    client: httpx.Client,
) -> None:
    stylesheet = re.search(r"/static/opulon\.[0-9a-f]+\.css", client.get("/").text)
    assert stylesheet is not None
    for path in ("/", "/privacy", "/key-status", "/healthz", stylesheet.group(0)):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"", path
        for name in ("content-type", "content-security-policy", "cache-control"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    assert client.head("/static/opulon.0000.css").status_code == 404


def test_errors_outside_the_handlers_are_pages_with_the_pages_headers(
    client: httpx.Client,
) -> None:
    cases = [
        ("GET", "/no-such-page", 404),
        ("POST", "/privacy", 405),
        ("DELETE", "/", 405),
        ("GET", "/static/opulon.css", 404),
    ]
    for method, path, status in cases:
        response = client.request(method, path)
        assert response.status_code == status, (method, path)
        assert response.headers["content-type"].startswith("text/html"), path
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "'unsafe-inline'" not in response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "status_code" not in response.text and "Traceback" not in response.text
    assert "GET" in client.post("/privacy").headers["allow"]


def test_a_wrong_method_on_the_json_status_gets_the_api_error_shape(client: httpx.Client) -> None:
    response = client.post("/v1/key-status")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["cache-control"] == "no-store"
