"""The public website against a live gateway: the landing page and the policy say what this
gateway is and does, with the site's settings; every page carries its security headers; the
cookie banner and its script exist only where an analytics ID is configured."""

from __future__ import annotations

import datetime as dt
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_helpers import Gateway, start_gateway
from tls_helpers import self_signed

from opulon.settings import Settings
from opulon.site_settings import POLICY_REVISED, SiteSettingsStore
from opulon.storage import open_store

PAGES = ("/", "/privacy", "/key-status", "/no-such-page")
#: The pages with the banner where analytics are configured: all but those of /key-status.
SITE_PAGES = ("/", "/privacy", "/no-such-page")
#: A key's status, signing in and the account (and their error pages) never load analytics.
PRIVATE_PAGES = ("/key-status", "/key-status/account", "/key-status/code", "/key-status/nope")
SCRIPT_TAG = re.compile(r"<script src='(/static/consent\.[0-9a-f]{12}\.js)' nonce='([^']+)' defer>")
ANALYTICS_HOSTS = ("googletagmanager", "google-analytics", "analytics.google", "facebook")
IDS = {"gtm_id": "GTM-TEST12", "ga4_id": "G-TEST1234", "meta_pixel_id": "1234567890"}
_addresses = iter(range(2, 250))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("site"))
    yield gw
    gw.stop()
    gw.mock.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
    with httpx.Client(base_url=gateway.url, transport=transport, timeout=15) as http:
        yield http


def configure(gateway: Gateway, client: httpx.Client, **values: object) -> None:
    """Store site settings as ``opulon site configure`` does (clearing the rest), and wait until
    the running gateway shows them."""
    store = open_store(Settings(home=gateway.home))
    try:
        sites = SiteSettingsStore(store)
        sites.configure(remove=tuple(f for f in ("name", "contact", "public-url", "policy-date",
                                                 "gtm-id", "ga4-id", "meta-pixel-id")))  # fmt: skip
        _, after = sites.configure(**values)  # type: ignore[arg-type]
    finally:
        store.close()
    marker = after.name or "Opulon"
    deadline = time.monotonic() + 10
    while True:
        page = client.get("/privacy").text
        if f"<a class='brand' href='/'>{marker}</a>" in page and (
            ("id='consent'" in page) == after.analytics
        ):
            return
        assert time.monotonic() < deadline, "the gateway did not pick up the site settings"
        time.sleep(0.1)


@pytest.fixture
def unconfigured(gateway: Gateway, client: httpx.Client) -> None:
    configure(gateway, client)


def _text(response: httpx.Response) -> str:
    return " ".join(response.text.replace("&#39;", "'").split())


def _security_headers_hold(response: httpx.Response) -> str:
    csp = response.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert "base-uri 'none'" in csp and "form-action 'self'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    permissions = response.headers["permissions-policy"]
    for feature in ("camera=()", "microphone=()", "geolocation=()", "browsing-topics=()"):
        assert feature in permissions
    return csp


def test_with_nothing_configured_no_page_has_a_script_or_names_another_host(
    gateway: Gateway, client: httpx.Client, unconfigured: None
) -> None:
    for path in PAGES:
        response = client.get(path)
        csp = _security_headers_hold(response)
        assert "script-src" not in csp and "connect-src" not in csp, path
        assert not any(host in csp for host in ANALYTICS_HOSTS), path
        assert "<script" not in response.text, path
        assert "id='consent'" not in response.text and "Cookie settings" not in response.text
        assert "strict-transport-security" not in response.headers  # plain HTTP here
    assert client.get("/static/consent.js").status_code == 404


def test_with_nothing_configured_the_policy_names_no_analytics_and_no_banner(
    gateway: Gateway, client: httpx.Client, unconfigured: None
) -> None:
    text = _text(client.get("/privacy"))
    for absent in ("Google", "Meta", "Pixel", "cookie banner", "14 months", "opulonapi.com",
                   "info@opulonapi.com", "Resend", "SendGrid"):  # fmt: skip
        assert not re.search(rf"\b{absent}\b", text), absent
    assert "Our website uses no analytics: it sets no tracking cookies" in text
    assert "The website uses no analytics and no tracking cookies" in text
    assert "The Website — the pages this gateway serves" in text
    assert f"Last updated: {POLICY_REVISED:%B} {POLICY_REVISED.day}, {POLICY_REVISED.year}" in text
    assert "This is the Privacy Policy of Opulon (“the Service”" in text
    assert "Ask the administrator who gave you your API key." in text
    # No https public URL, and a provider on this machine over plain http: the policy claims
    # no encryption it cannot know of.
    assert "All communication is encrypted" not in text and "arrives via encrypted" not in text
    assert "encrypted with HTTPS/TLS wherever its address starts with https://" in text
    assert "(over HTTPS, except to a provider on the gateway's own machine)" in text
    assert "the email address the key is sent to" in text  # what a key's record holds
    assert "sign in on /key-status with your email" not in text  # no email configured


def test_the_landing_page_gives_the_base_urls_the_models_and_the_links(
    gateway: Gateway, client: httpx.Client, unconfigured: None
) -> None:
    response = client.get("/")
    text = _text(response)
    # Without a public URL, the address the browser used: no cache may keep it for another.
    assert response.headers["cache-control"] == "no-store" and response.headers["vary"] == "Host"
    assert f'OpenAI( base_url="{gateway.url}/v1", api_key=os.environ["OPULON_KEY"], )' in text
    assert f'Anthropic( base_url="{gateway.url}", api_key=os.environ["OPULON_KEY"], )' in text
    assert "export OPULON_KEY=op-ul-…" in text
    assert f"curl {gateway.url}/v1/chat/completions" in text
    assert f"curl {gateway.url}/v1/messages" in text
    for model in ("gpt-*", "text-embedding-*", "claude-*"):
        assert f"<li><code>{model}</code></li>" in text
    assert "href='/key-status'" in text and "href='/privacy'" in text
    # The provider behind the models stays the operator's business.
    assert gateway.mock.url not in text and "mock-openai" not in text
    # A Host header that is not a plain host name is not printed.
    hostile = client.get("/", headers={"host": "x<script>.example"}).text
    assert "x<script>" not in hostile and "&lt;script" not in hostile


def test_the_configured_name_contact_url_and_date_reach_the_landing_page_and_the_policy(
    gateway: Gateway, client: httpx.Client
) -> None:
    configure(
        gateway,
        client,
        name="Opulon API",
        contact="info@example.com",
        public_url="https://api.example.com",
        policy_date="2026-03-22",
    )
    answer = client.get("/")
    assert "vary" not in answer.headers  # the configured URL, whoever asks
    landing = _text(answer)
    assert 'OpenAI( base_url="https://api.example.com/v1",' in landing
    assert 'Anthropic( base_url="https://api.example.com",' in landing
    assert "<h1>Opulon API</h1>" in landing and "<title>Opulon API, a privacy" in landing
    policy = _text(client.get("/privacy"))
    assert "Last updated: March 22, 2026" in policy
    assert "This is the Privacy Policy of Opulon API (“the Service”" in policy
    assert "Your request arrives via encrypted HTTPS/TLS" in policy  # an https public URL
    assert "The Website — api.example.com and its pages" in policy
    assert "Contact us at info@example.com." in policy
    assert not re.search(r"\b(Google|Meta)\b", policy)  # still no analytics


def test_with_analytics_every_page_loads_only_its_own_script_under_a_fresh_nonce(
    gateway: Gateway, client: httpx.Client
) -> None:
    configure(gateway, client, name="Opulon API", **IDS)
    nonces = set()
    for path in SITE_PAGES:
        response = client.get(path)
        csp = _security_headers_hold(response)
        match = SCRIPT_TAG.search(response.text)
        assert match is not None, path
        script, nonce = match.groups()
        nonces.add(nonce)
        assert f"script-src 'nonce-{nonce}' https://www.googletagmanager.com " in csp
        assert "https://connect.facebook.net" in csp and "https://*.google-analytics.com" in csp
        assert response.headers["cache-control"] == "no-store", path
        assert "Sec-GPC" in response.headers["vary"]
        # The one script is the only one, and nothing on the page names a tag's URL.
        assert response.text.count("<script") == 1, path
        assert "googletagmanager.com" not in response.text and "fbevents" not in response.text
        assert "id='consent'" in response.text and "id='cookie-settings'" in response.text
        served = client.get(script)
        assert served.status_code == 200
        assert served.headers["content-type"].startswith("text/javascript")
        assert served.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert len(nonces) == len(SITE_PAGES)  # one per response
    banner = _text(client.get("/"))
    # Accept and reject are the same kind of button, and no box is ticked.
    assert "<button type='button' class='button' data-consent='reject'>Reject all</button>" in (
        banner
    )
    assert "<button type='button' class='button' data-consent='accept'>Accept all</button>" in (
        banner
    )
    assert "checked" not in banner
    assert "data-gtm='GTM-TEST12' data-ga4='G-TEST1234'" in banner


def test_with_analytics_the_policy_names_them_as_the_policy_does(
    gateway: Gateway, client: httpx.Client
) -> None:
    configure(gateway, client, name="Opulon API", **IDS)
    text = _text(client.get("/privacy"))
    assert "Google Analytics 4, managed through Google Tag Manager" in text
    assert "Meta Pixel" in text and "Meta Platforms Inc." in text and "Google LLC" in text
    assert "Website Analytics: 14 months" in text
    assert "or the cookie banner (“Cookie settings”, at the foot of the website's pages)" in text
    assert "They never load on the /key-status pages, where you look up a key or sign in." in text
    assert "a first-party cookie (opulon_consent) for six months" in text  # no https URL here
    assert "only once you accept them in the cookie banner" in text
    assert "not at all while your browser sends Global Privacy Control or Do Not Track" in text
    assert "id='cookies'" in client.get("/privacy").text  # where "Cookie settings" links to
    assert f"Last updated: {dt.datetime.now(dt.UTC).date():%B}" in text  # the policy changed


def test_with_analytics_the_key_status_pages_still_load_nothing_and_show_no_banner(
    gateway: Gateway, client: httpx.Client
) -> None:
    configure(gateway, client, name="Opulon API", **IDS)
    for path in PRIVATE_PAGES:
        response = client.get(path, follow_redirects=True)  # the account: to the sign-in
        csp = _security_headers_hold(response)
        assert "script-src" not in csp and "connect-src" not in csp, (path, csp)
        assert not any(host in csp for host in ANALYTICS_HOSTS), (path, csp)
        assert "<script" not in response.text, path
        assert "id='consent'" not in response.text and "Cookie settings" not in response.text
        assert "<a class='brand' href='/'>Opulon API</a>" in response.text  # the same site
    # A look-up posted with a key is a private page too.
    posted = client.post("/key-status", data={"key": "op-ul-" + "x" * 40})
    assert "<script" not in posted.text and "id='consent'" not in posted.text


def test_with_only_the_pixel_the_policy_and_the_policy_header_leave_google_out(
    gateway: Gateway, client: httpx.Client
) -> None:
    configure(gateway, client, meta_pixel_id="1234567890")
    response = client.get("/privacy")
    text = _text(response)
    assert "Google" not in text and "14 months" not in text
    assert "Marketing measurement uses the Meta Pixel" in text
    csp = response.headers["content-security-policy"]
    assert "facebook" in csp and "google" not in csp
    assert "id='consent'" in response.text and "data-consent='save'" not in response.text


@pytest.mark.parametrize(
    ("header", "signal"), [("sec-gpc", "Global Privacy Control"), ("dnt", "Do Not Track")]
)
def test_a_browser_that_sends_gpc_or_dnt_gets_pages_that_cannot_load_a_tag(
    gateway: Gateway, client: httpx.Client, header: str, signal: str
) -> None:
    configure(gateway, client, **IDS)
    for path in SITE_PAGES:
        response = client.get(path, headers={header: "1"})
        csp = _security_headers_hold(response)
        assert not any(host in csp for host in ANALYTICS_HOSTS), (path, csp)
        text = _text(response)
        assert (
            f"Your browser sends <span data-signal>{signal}</span>: we take that as a refusal"
            in (text)
        )
        assert "data-consent='accept'" not in text and "data-consent='close'" in text
    # Any other value is no refusal.
    assert "facebook" in client.get("/", headers={header: "0"}).headers["content-security-policy"]


def test_hsts_is_sent_when_the_gateway_serves_tls_itself(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    gw = start_gateway(tmp_path / "gw", None, "--ssl-certfile", str(cert), "--ssl-keyfile",
                       str(key), verify=context)  # fmt: skip
    try:
        with httpx.Client(base_url=gw.url, verify=context, timeout=15) as client:
            for path in PAGES:
                response = client.get(path)
                assert response.headers["strict-transport-security"] == "max-age=31536000"
                _security_headers_hold(response)
    finally:
        gw.stop()
        gw.mock.stop()


def test_hsts_is_sent_behind_a_trusted_tls_proxy_only_for_https(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, None, "--behind-tls-proxy", "--forwarded-allow-ips",
                       "127.0.0.1")  # fmt: skip
    try:
        with httpx.Client(base_url=gw.url, timeout=15) as proxy:
            over_tls = proxy.get("/", headers={"x-forwarded-proto": "https"})
            assert over_tls.headers["strict-transport-security"] == "max-age=31536000"
            assert "strict-transport-security" not in proxy.get("/").headers
        # From an address that is not the trusted proxy, the header proves nothing.
        transport = httpx.HTTPTransport(local_address="127.0.0.9")
        with httpx.Client(base_url=gw.url, transport=transport, timeout=15) as other:
            spoofed = other.get("/", headers={"x-forwarded-proto": "https"})
            assert "strict-transport-security" not in spoofed.headers
    finally:
        gw.stop()
        gw.mock.stop()
