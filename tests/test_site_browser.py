"""The public website and its cookie banner in a real headless Chromium (Debian's).

What this proves, against a live gateway:

* With no analytics ID configured, ``/``, ``/privacy`` and ``/key-status`` (and a page reached
  through the navigation) ask for nothing but the gateway's own origin, carry no script
  element, and Chromium reports no Content-Security-Policy violation.
* With Google Tag Manager, GA4 and a Meta Pixel configured, nothing of Google's or Meta's is
  requested before the visitor chooses; Consent Mode's defaults (all denied) are the first
  entry of ``window.dataLayer``. The banner is a named region reached by the keyboard before
  the site's navigation, its "Reject all" and "Accept all" look alike, no box is ticked.
  Rejecting keeps every tag away on later pages; accepting loads the three tags (stubbed
  here: Google's and Meta's hosts are answered locally, anything else off the machine is
  aborted) under the page's nonce, and their beacons pass the policy's img-src/connect-src;
  a partial choice loads only what was chosen; Global Privacy Control (header or script
  property) and Do Not Track are refusals with nothing to accept; "Cookie settings" reopens
  the banner to withdraw; a changed set of tags asks again.
* Every page's policy has no ``'unsafe-inline'``, has ``frame-ancestors 'none'``, names the
  analytics hosts only when they are configured, and no page in any scenario breaks it.
* Screenshots of the pages (phone and desktop, light and dark, with and without the banner)
  go to ``artifacts/site/``.

Chromium comes from Debian (``.ci/install-browser``); without it these tests skip, except on
CI (``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from gateway_helpers import Gateway, start_gateway
from test_key_status_browser import browser

from opulon.settings import Settings
from opulon.site_settings import SiteSettings, SiteSettingsStore
from opulon.storage import open_store

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Request, Response, Route

__all__ = ["browser"]  # the fixture, shared with the other browser tests

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "site"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
PAGES = ("/", "/privacy", "/key-status")
SITE_PAGES = ("/", "/privacy")  # with the banner, where analytics are configured
IDS = {"gtm_id": "GTM-TEST12", "ga4_id": "G-TEST1234", "meta_pixel_id": "1234567890"}
FIELDS = ("name", "contact", "public-url", "policy-date", "gtm-id", "ga4-id", "meta-pixel-id")
# The hosts Google's and Meta's tags talk to: answered by the stubs below, never the network.
TAG_HOSTS = re.compile(
    r"https://(www\.googletagmanager\.com|[^/]*google-analytics\.com|[^/]*analytics\.google\.com"
    r"|connect\.facebook\.net|www\.facebook\.com)/.*"
)
GTM = "https://www.googletagmanager.com/gtm.js?id=GTM-TEST12"
GTAG = "https://www.googletagmanager.com/gtag/js?id=G-TEST1234"
PIXEL = "https://connect.facebook.net/en_US/fbevents.js"
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

# The stand-ins for the tags: each says it ran, and sends its measurement the way the real
# one does (GA4: a beacon and a fetch to google-analytics.com; the Pixel: an image request to
# facebook.com with the ID it was initialised with), so the policy's img-src and connect-src
# are what let them through.
STUB_GTM = """(function () {
  (window.__stubs = window.__stubs || []).push('gtm');
  navigator.sendBeacon('https://region1.google-analytics.com/g/collect?v=2&tid=GTM-TEST12&en=page_view');
})();"""
STUB_GTAG = """(function () {
  (window.__stubs = window.__stubs || []).push('gtag');
  fetch('https://region1.analytics.google.com/g/collect?v=2&tid=G-TEST1234&en=page_view',
        {mode: 'no-cors', method: 'POST'});
  new Image().src = 'https://www.google-analytics.com/g/collect?v=2&tid=G-TEST1234&en=img';
})();"""
STUB_PIXEL = """(function () {
  (window.__stubs = window.__stubs || []).push('pixel');
  var queue = (window.fbq && window.fbq.queue) || [];
  var id = '';
  for (var i = 0; i < queue.length; i++) {
    if (queue[i][0] === 'init') { id = queue[i][1]; }
  }
  new Image().src = 'https://www.facebook.com/tr?id=' + id + '&ev=PageView&noscript=1';
})();"""

# Every CSP violation any page of the context sees, handed to the test as it happens (a
# page's own list would be lost with each navigation).
WATCH_VIOLATIONS = """
document.addEventListener('securitypolicyviolation', (event) => {
  window.__violation(`${location.pathname}: ${event.effectiveDirective} ${event.blockedURI}`);
});
"""
# Navigator.globalPrivacyControl as a browser with GPC switched on has it.
GPC_PROPERTY = """
Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {
  get: () => true, configurable: true,
});
"""
DATA_LAYER = (
    "JSON.stringify((window.dataLayer || []).map(e => e.length === undefined ? e : Array.from(e)))"
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("site-browser"))
    yield gw
    gw.stop()
    gw.mock.stop()


def configure(gateway: Gateway, **values: str) -> SiteSettings:
    """Store these site settings (clearing the rest) as ``opulon site configure`` does, and
    wait until the running gateway's pages carry them (their tags' fingerprint)."""
    store = open_store(Settings(home=gateway.home))
    try:
        sites = SiteSettingsStore(store)
        sites.configure(remove=FIELDS)
        _, after = sites.configure(**values)  # type: ignore[arg-type]
    finally:
        store.close()
    wanted = f"data-tags='{after.tag_fingerprint}'" if after.analytics else None
    deadline = time.monotonic() + 10
    transport = httpx.HTTPTransport(local_address="127.0.0.201")
    with httpx.Client(base_url=gateway.url, transport=transport, timeout=10) as client:
        while True:
            page = client.get("/privacy").text
            if (wanted in page) if wanted else ("id='consent'" not in page):
                return after
            assert time.monotonic() < deadline, "the gateway did not pick up the site settings"
            time.sleep(0.1)


class _Watched:
    """A browser context whose every request, console message and CSP violation is recorded;
    the tags' hosts are answered by stubs, and anything else off the gateway is aborted."""

    def __init__(self, browser: Browser, gateway: Gateway, **options: Any) -> None:
        self.origin = gateway.url
        self.requested: list[str] = []  # everything the pages asked for, in order
        self.stubbed: list[str] = []  # what reached the stand-ins for Google's and Meta's hosts
        self.aborted: list[str] = []  # what would have left the machine otherwise
        self.console: list[str] = []
        self.violations: list[str] = []
        init_scripts: tuple[str, ...] = options.pop("init_scripts", ())
        self.context: BrowserContext = browser.new_context(**options)
        self.context.expose_function("__violation", self._violation)
        self.context.add_init_script(WATCH_VIOLATIONS)
        for script in init_scripts:
            self.context.add_init_script(script)
        self.context.route("**/*", self._route)
        self.context.on("request", lambda request: self.requested.append(request.url))
        self.context.on("console", lambda message: self.console.append(message.text))
        self.page: Page = self.context.new_page()

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    def _route(self, route: Route, request: Request) -> None:
        url = request.url
        if url.startswith(self.origin + "/"):
            route.continue_()
        elif TAG_HOSTS.match(url):
            self.stubbed.append(url)
            if url.startswith(GTM):
                route.fulfill(status=200, content_type="text/javascript", body=STUB_GTM)
            elif url.startswith(GTAG):
                route.fulfill(status=200, content_type="text/javascript", body=STUB_GTAG)
            elif url == PIXEL:
                route.fulfill(status=200, content_type="text/javascript", body=STUB_PIXEL)
            elif request.resource_type == "image":
                route.fulfill(status=200, content_type="image/gif", body=GIF)
            else:
                route.fulfill(status=204, body="")
        else:
            self.aborted.append(url)
            route.abort()

    def goto(self, path: str, status: int = 200) -> Response:
        """Open ``path`` and check its policy and that it broke none so far."""
        response = self.page.goto(self.origin + path)
        assert response is not None and response.status == status, path
        csp = response.headers["content-security-policy"]
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, csp
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, csp
        self.assert_clean()
        return response

    def tags(self) -> list[str]:
        """The requests to Google's and Meta's hosts so far (by what the pages asked for)."""
        return [url for url in self.requested if TAG_HOSTS.match(url)]

    def wait_for(self, what: Callable[[], bool], message: str, seconds: float = 5) -> None:
        """Wait (pumping Playwright's events) until ``what()`` holds."""
        deadline = time.monotonic() + seconds
        while not what():
            assert time.monotonic() < deadline, message
            self.page.wait_for_timeout(50)

    def wait_for_stubs(self, count: int) -> None:
        """Wait until ``count`` stand-in tags ran on the page (polled by evaluating: the pages'
        policy refuses the string evaluation ``wait_for_function`` would use)."""
        self.wait_for(
            lambda: self.page.evaluate("(window.__stubs || []).length") >= count,
            f"fewer than {count} tags ran: {self.stubbed}",
        )
        assert self.page.evaluate("window.__stubs.length") == count

    def settle(self) -> None:
        """A short while for anything a page might still ask for, before asserting it didn't."""
        self.page.wait_for_load_state("load")
        self.page.wait_for_timeout(300)

    def assert_clean(self) -> None:
        said = [m for m in self.console if "Content Security Policy" in m or "Refused to" in m]
        assert self.violations == [] and said == [], (self.violations, said)
        assert self.aborted == [], self.aborted

    def cookie(self) -> str | None:
        for cookie in self.context.cookies():
            if cookie["name"] == "opulon_consent":
                return cookie["value"]
        return None

    def data_layer(self) -> list[Any]:
        entries: list[Any] = json.loads(self.page.evaluate(DATA_LAYER))
        return entries

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watch(browser: Browser, gateway: Gateway) -> Iterator[Callable[..., _Watched]]:
    """Contexts to open, each closed after the test (its CSP record checked clean)."""
    opened: list[_Watched] = []

    def open_(**options: Any) -> _Watched:
        options.setdefault("viewport", DESKTOP)
        watched = _Watched(browser, gateway, **options)
        opened.append(watched)
        return watched

    yield open_
    try:
        for watched in opened:
            watched.assert_clean()
    finally:
        for watched in opened:
            watched.close()


@pytest.fixture
def configured(gateway: Gateway) -> SiteSettings:
    return configure(gateway, name="Opulon API", **IDS)


def _banner(page: Page) -> Any:
    return page.get_by_role("region", name="Cookies and analytics")


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def _directive(csp: str, name: str) -> list[str]:
    for directive in csp.split(";"):
        words = directive.split()
        if words and words[0] == name:
            return words[1:]
    return []


def _nonce(response: Response) -> str:
    match = re.search(r"'nonce-([^']+)'", response.headers["content-security-policy"])
    assert match is not None
    return match.group(1)


# -- nothing configured ---------------------------------------------------------------------


def test_with_nothing_configured_the_pages_ask_only_their_own_origin_and_run_no_script(
    gateway: Gateway, watch: Callable[..., _Watched]
) -> None:
    configure(gateway)
    watched = watch()
    page = watched.page
    for path in PAGES:
        csp = watched.goto(path).headers["content-security-policy"]
        assert "script-src" not in csp and "connect-src" not in csp, csp
        assert not re.search(r"google|facebook", csp), csp
        assert page.evaluate("document.querySelectorAll('script').length") == 0, path
        assert (
            page.locator("#consent").count() == 0 and page.locator("#cookie-settings").count() == 0
        )
    # Follow the navigation, as a visitor would.
    page.goto(gateway.url + "/")
    with page.expect_navigation():
        page.get_by_role("navigation", name="Site").get_by_role("link", name="Key status").click()
    assert page.url == gateway.url + "/key-status"
    with page.expect_navigation():
        page.get_by_role("link", name="Privacy policy").click()
    assert page.url == gateway.url + "/privacy"
    watched.settle()
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    # Nothing but this origin: no CDN, no font, no tag (a data: icon has no host at all).
    assert watched.requested
    elsewhere = [u for u in watched.requested if not u.startswith(gateway.url + "/")]
    assert all(u.startswith("data:") for u in elsewhere), elsewhere
    assert watched.stubbed == [] and watched.aborted == []
    watched.assert_clean()


# -- configured: before a choice, keyboard, reject ------------------------------------------


def test_before_a_choice_nothing_of_theirs_loads_and_consent_mode_defaults_to_denied(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch()
    page = watched.page
    for path in SITE_PAGES:
        response = watched.goto(path)
        csp = response.headers["content-security-policy"]
        nonce = _nonce(response)
        script_src = _directive(csp, "script-src")
        assert f"'nonce-{nonce}'" in script_src and "https://www.googletagmanager.com" in script_src
        for host in ("https://connect.facebook.net", "https://*.google-analytics.com",
                     "https://www.facebook.com"):  # fmt: skip
            assert host in csp, (host, csp)
        _expect()(_banner(page)).to_be_visible(timeout=3000)
        # The page's one script, under this response's nonce.
        scripts = page.evaluate("[...document.scripts].map(s => [s.src, s.nonce])")
        assert len(scripts) == 1 and re.search(r"/static/consent\.[0-9a-f]{12}\.js$", scripts[0][0])
        assert scripts[0][1] == nonce
        layer = watched.data_layer()
        assert layer[0][:2] == ["consent", "default"], layer
        defaults = layer[0][2]
        for signal in ("analytics_storage", "ad_storage", "ad_user_data", "ad_personalization"):
            assert defaults[signal] == "denied", defaults
        assert not any(
            entry[:2] == ["consent", "update"] for entry in layer if isinstance(entry, list)
        )
    watched.settle()
    assert watched.tags() == [] and watched.stubbed == []
    assert watched.cookie() is None


def test_the_banner_comes_first_to_the_keyboard_and_its_two_choices_look_alike(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    for viewport in (DESKTOP, PHONE):
        watched = watch(viewport=viewport)
        page = watched.page
        watched.goto("/")
        banner = _banner(page)
        _expect()(banner).to_be_visible(timeout=3000)
        reject = banner.get_by_role("button", name="Reject all")
        accept = banner.get_by_role("button", name="Accept all")
        _expect()(reject).to_be_visible()
        _expect()(accept).to_be_visible()
        boxes = banner.get_by_role("checkbox")
        assert boxes.count() == 2
        assert [boxes.nth(i).is_checked() for i in range(2)] == [False, False]
        style = """el => { const s = getComputedStyle(el); const r = el.getBoundingClientRect();
          return [s.fontWeight, s.fontSize, s.backgroundColor, s.color, s.borderTopWidth,
                  s.borderTopColor, s.paddingTop, s.paddingLeft, Math.round(r.width),
                  Math.round(r.height)]; }"""
        assert reject.evaluate(style) == accept.evaluate(style), viewport

        # Tab from the top: the skip link, then the banner (its buttons), then the header.
        order: list[str] = []
        for _ in range(15):
            page.keyboard.press("Tab")
            order.append(
                page.evaluate(
                    "(() => { const e = document.activeElement;"
                    " return (e.dataset.consent ? 'consent:' + e.dataset.consent : '')"
                    " || (e.closest('#consent') ? 'consent:' + (e.value || e.textContent) : '')"
                    " || (e.closest('header') ? 'header' : '') || e.className || e.tagName; })()"
                )
            )
            if order[-1] == "header":
                break
        assert order[0] == "skip", order
        assert "consent:reject" in order and "consent:accept" in order, order
        assert order.index("consent:reject") < order.index("consent:accept") < order.index("header")
        # Everything between the skip link and the header is the banner's.
        assert order[-1] == "header" and all(o.startswith("consent:") for o in order[1:-1]), order
        assert order[1:-1] == [
            "consent:What they collect",
            "consent:analytics",
            "consent:marketing",
            "consent:reject",
            "consent:accept",
            "consent:save",
        ], order
    # Enter on "Reject all" chooses, and so does Space after reopening.
    focus = order.index("consent:reject") + 1
    page.goto(gateway.url + "/")
    for _ in range(focus):
        page.keyboard.press("Tab")
    _expect()(reject).to_be_focused()
    page.keyboard.press("Enter")
    _expect()(banner).to_be_hidden(timeout=3000)
    assert (watched.cookie() or "").startswith("v1.a0m0.")
    page.get_by_role("link", name="Cookie settings").click()
    _expect()(banner).to_be_visible(timeout=3000)
    for _ in range(8):
        if page.evaluate("document.activeElement.dataset.consent") == "reject":
            break
        page.keyboard.press("Tab")
    _expect()(reject).to_be_focused()
    page.keyboard.press("Space")
    _expect()(banner).to_be_hidden(timeout=3000)
    assert (watched.cookie() or "").startswith("v1.a0m0.")
    watched.settle()
    assert watched.tags() == []


def test_after_reject_all_nothing_of_theirs_loads_on_any_page(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch()
    page = watched.page
    watched.goto("/")
    banner = _banner(page)
    banner.get_by_role("button", name="Reject all").click()
    _expect()(banner).to_be_hidden(timeout=3000)
    cookie = watched.cookie()
    assert cookie == f"v1.a0m0.{configured.tag_fingerprint}", cookie
    status = page.locator("#consent-status")
    _expect()(status).to_have_text("Cookie choice saved: no analytics load.")
    layer = watched.data_layer()
    update = [e for e in layer if isinstance(e, list) and e[:2] == ["consent", "update"]]
    assert len(update) == 1 and update[0][2]["analytics_storage"] == "denied"
    for path in ("/privacy", "/"):
        watched.goto(path)
        _expect()(_banner(page)).to_be_hidden()
        assert page.evaluate("window.dataLayer.length") > 0  # the script ran
        watched.settle()
        _expect()(_banner(page)).to_be_hidden()
    assert watched.tags() == [] and watched.stubbed == []


def test_the_key_status_pages_load_no_tag_even_after_accept_all(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch()
    page = watched.page
    watched.goto("/")
    _banner(page).get_by_role("button", name="Accept all").click()
    watched.wait_for_stubs(3)
    before = len(watched.requested)
    for path, status in (("/key-status", 200), ("/key-status/account", 200),
                         ("/key-status/nope", 404)):  # fmt: skip
        csp = watched.goto(path, status).headers["content-security-policy"]
        assert "script-src" not in csp and not re.search(r"google|facebook", csp), (path, csp)
        assert page.evaluate("document.scripts.length") == 0, path
        assert (
            page.locator("#consent").count() == 0 and page.locator("#cookie-settings").count() == 0
        )
    watched.settle()
    later = watched.requested[before:]
    assert later and all(u.startswith(gateway.url + "/") for u in later), later
    # A key typed into the look-up form stays among this origin's requests.
    page.goto(gateway.url + "/key-status")
    page.get_by_label("API key").fill("op-ul-" + "q" * 40)
    with page.expect_navigation():
        page.get_by_role("button", name="Show status").click()
    watched.settle()
    assert all(u.startswith(gateway.url + "/") for u in watched.requested[before:])
    watched.assert_clean()


def test_two_consent_cookies_of_one_name_are_no_choice(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    # A second cookie of the name (here for a narrower path; elsewhere one set for a parent
    # domain by another host) could say "accepted" for the visitor: the banner asks instead.
    watched = watch()
    page = watched.page
    accepted = f"v1.a1m1.{configured.tag_fingerprint}"
    watched.context.add_cookies(
        [
            {"name": "opulon_consent", "value": accepted, "url": gateway.url + "/"},
            {
                "name": "opulon_consent",
                "value": accepted,
                "domain": "127.0.0.1",
                "path": "/privacy",
            },
        ]
    )
    watched.goto("/privacy")
    _expect()(_banner(page)).to_be_visible(timeout=3000)
    watched.settle()
    assert watched.tags() == [] and watched.stubbed == []
    watched.goto("/")  # one cookie on this path: the choice holds
    watched.wait_for_stubs(3)


# -- configured: accept, partial choice ------------------------------------------------------


def _loaded_scripts(page: Page) -> dict[str, str]:
    found: dict[str, str] = page.evaluate(
        "Object.fromEntries([...document.scripts].filter(s => s.src).map(s => [s.src, s.nonce]))"
    )
    return found


def test_after_accept_all_the_tags_load_under_the_nonce_and_their_beacons_pass(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch()
    page = watched.page
    response = watched.goto("/")
    nonce = _nonce(response)
    banner = _banner(page)
    banner.get_by_role("button", name="Accept all").click()
    _expect()(banner).to_be_hidden(timeout=3000)
    assert watched.cookie() == f"v1.a1m1.{configured.tag_fingerprint}"
    watched.wait_for_stubs(3)
    scripts = _loaded_scripts(page)
    for url in (GTM, GTAG, PIXEL):
        assert scripts.get(url) == nonce, (url, scripts)
    # The stand-ins' measurements went out: the policy let the beacon, fetch and images pass.
    beacons = (
        "https://region1.google-analytics.com/g/collect?v=2&tid=GTM-TEST12",
        "https://region1.analytics.google.com/g/collect?v=2&tid=G-TEST1234",
        "https://www.google-analytics.com/g/collect?v=2&tid=G-TEST1234",
        "https://www.facebook.com/tr?id=1234567890&ev=PageView",
    )
    watched.wait_for(
        lambda: all(any(u.startswith(b) for u in watched.stubbed) for b in beacons),
        f"the beacons did not all arrive: {watched.stubbed}",
    )
    layer = watched.data_layer()
    assert layer[0][:2] == ["consent", "default"]
    update = [e for e in layer if isinstance(e, list) and e[:2] == ["consent", "update"]]
    assert len(update) == 1 and update[0][2]["analytics_storage"] == "granted"
    assert update[0][2]["ad_storage"] == "granted"
    assert layer.index(update[0]) < next(
        i for i, e in enumerate(layer) if isinstance(e, dict) and e.get("event") == "gtm.js"
    )
    watched.assert_clean()

    # The next page loads them again, without asking.
    before = len(watched.stubbed)
    response = watched.goto("/privacy")
    watched.wait_for_stubs(3)
    _expect()(_banner(page)).to_be_hidden()
    scripts = _loaded_scripts(page)
    assert all(scripts.get(url) == _nonce(response) for url in (GTM, GTAG, PIXEL)), scripts
    watched.wait_for(lambda: len(watched.stubbed) >= before + 7, "no beacons on the next page")
    watched.settle()
    watched.assert_clean()


def test_a_choice_of_analytics_only_loads_the_google_tags_and_not_the_pixel(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch()
    page = watched.page
    watched.goto("/")
    banner = _banner(page)
    banner.get_by_role("checkbox", name=re.compile("^Analytics")).check()
    banner.get_by_role("button", name="Save my choices").click()
    _expect()(banner).to_be_hidden(timeout=3000)
    assert watched.cookie() == f"v1.a1m0.{configured.tag_fingerprint}"
    watched.wait_for_stubs(2)
    watched.settle()
    assert sorted(page.evaluate("window.__stubs")) == ["gtag", "gtm"]
    assert not any("facebook" in url for url in watched.requested), watched.requested
    update = [e for e in watched.data_layer() if isinstance(e, list) and e[1:2] == ["update"]]
    assert update[0][2]["analytics_storage"] == "granted"
    assert update[0][2]["ad_storage"] == "denied"
    # Reopened, the banner shows the choice made.
    page.get_by_role("link", name="Cookie settings").click()
    assert banner.get_by_role("checkbox", name=re.compile("^Analytics")).is_checked()
    assert not banner.get_by_role("checkbox", name=re.compile("^Marketing")).is_checked()
    page.keyboard.press("Escape")
    _expect()(banner).to_be_hidden(timeout=3000)
    watched.goto("/privacy")
    watched.wait_for_stubs(2)
    watched.settle()
    assert not any("facebook" in url for url in watched.requested)


# -- configured: the browser's refusals ------------------------------------------------------


def _refused(watched: _Watched, signal: str) -> None:
    """The banner says the browser's signal is a refusal and offers nothing to accept."""
    page = watched.page
    banner = _banner(page)
    _expect()(banner).to_be_visible(timeout=3000)
    refusal = page.locator("#consent-refused")
    _expect()(refusal).to_be_visible()
    text = " ".join((refusal.text_content() or "").split())
    assert f"Your browser sends {signal}: we take that as a refusal" in text, text
    assert banner.get_by_role("button", name="Accept all").count() == 0 or not (
        banner.get_by_role("button", name="Accept all").is_visible()
    )
    assert banner.get_by_role("checkbox").filter(visible=True).count() == 0
    visible = banner.get_by_role("button").filter(visible=True)
    assert visible.all_text_contents() == ["OK"]


def test_global_privacy_control_is_a_refusal_with_nothing_to_accept(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    # The header (and the property, as a browser with GPC on has both).
    watched = watch(extra_http_headers={"Sec-GPC": "1"}, init_scripts=(GPC_PROPERTY,))
    page = watched.page
    response = watched.goto("/")
    csp = response.headers["content-security-policy"]
    assert not re.search(r"google|facebook", csp), csp
    assert page.evaluate("navigator.globalPrivacyControl") is True
    _refused(watched, "Global Privacy Control")
    assert page.locator("[data-consent=accept]").count() == 0  # not even in the markup
    _banner(page).get_by_role("button", name="OK").click()
    _expect()(_banner(page)).to_be_hidden(timeout=3000)
    watched.goto("/privacy")
    _expect()(_banner(page)).to_be_hidden()
    watched.settle()
    assert watched.tags() == [] and watched.stubbed == []

    # Only the property, no header: the script refuses by itself.
    watched = watch(init_scripts=(GPC_PROPERTY,))
    page = watched.page
    response = watched.goto("/")
    assert "https://www.googletagmanager.com" in response.headers["content-security-policy"]
    _refused(watched, "Global Privacy Control")
    # Whatever is clicked, even the hidden "Accept all" by script, nothing loads.
    page.locator("[data-consent=accept]").dispatch_event("click")
    _expect()(_banner(page)).to_be_hidden(timeout=3000)
    page.get_by_role("link", name="Cookie settings").click()
    _refused(watched, "Global Privacy Control")
    _banner(page).get_by_role("button", name="OK").click()
    watched.goto("/privacy")
    watched.settle()
    assert watched.tags() == [] and watched.stubbed == []
    assert not any(
        isinstance(e, list) and e[1:2] == ["update"] and e[2]["analytics_storage"] == "granted"
        for e in watched.data_layer()
    )


def test_do_not_track_is_named_as_the_refusal(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch(extra_http_headers={"DNT": "1"})
    response = watched.goto("/privacy")
    assert not re.search(r"google|facebook", response.headers["content-security-policy"])
    _refused(watched, "Do Not Track")
    _banner(watched.page).get_by_role("button", name="OK").click()
    _expect()(_banner(watched.page)).to_be_hidden(timeout=3000)
    watched.settle()
    assert watched.tags() == []


# -- withdrawal, and a changed set of tags -------------------------------------------------


def test_cookie_settings_withdraws_consent_for_the_pages_that_follow(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch()
    page = watched.page
    watched.goto("/")
    _banner(page).get_by_role("button", name="Accept all").click()
    watched.wait_for_stubs(3)
    watched.goto("/privacy")
    watched.wait_for_stubs(3)
    page.get_by_role("link", name="Cookie settings").click()
    banner = _banner(page)
    _expect()(banner).to_be_visible(timeout=3000)
    assert page.evaluate("document.activeElement.id") == "consent-title"
    assert [banner.get_by_role("checkbox").nth(i).is_checked() for i in range(2)] == [True, True]
    banner.get_by_role("button", name="Reject all").click()
    _expect()(banner).to_be_hidden(timeout=3000)
    assert page.evaluate("document.activeElement.id") == "cookie-settings"  # focus returns
    assert watched.cookie() == f"v1.a0m0.{configured.tag_fingerprint}"
    watched.settle()
    before = len(watched.tags())
    watched.goto("/")
    _expect()(banner).to_be_hidden()
    watched.settle()
    assert watched.tags()[before:] == []
    assert page.evaluate("window.__stubs") is None


def test_a_changed_set_of_tags_asks_again(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    watched = watch()
    page = watched.page
    watched.goto("/")
    _banner(page).get_by_role("button", name="Accept all").click()
    watched.wait_for_stubs(3)
    try:
        fewer = configure(gateway, name="Opulon API", gtm_id="GTM-TEST12", ga4_id="G-TEST1234")
        assert fewer.tag_fingerprint != configured.tag_fingerprint
        before = len(watched.tags())
        watched.goto("/privacy")
        banner = _banner(page)
        _expect()(banner).to_be_visible(timeout=3000)
        assert banner.get_by_role("checkbox").count() == 0  # one purpose left: no boxes
        watched.settle()
        assert watched.tags()[before:] == []
        banner.get_by_role("button", name="Accept all").click()
        watched.wait_for_stubs(2)
        assert watched.cookie() == f"v1.a1m1.{fewer.tag_fingerprint}"
        watched.settle()
        assert not any("facebook" in url for url in watched.tags()[before:])
    finally:
        configure(gateway, name="Opulon API", **IDS)
    # The pixel back: asked again.
    watched.goto("/")
    _expect()(_banner(page)).to_be_visible(timeout=3000)


# -- the watch itself, and screenshots -------------------------------------------------------


def test_the_watch_sees_a_tag_the_policy_does_not_admit(
    gateway: Gateway, watch: Callable[..., _Watched], configured: SiteSettings
) -> None:
    """The assertions of no violation above mean something: an image from a host the policy
    does not name is refused, reported, and never requested."""
    watched = watch()
    page = watched.page
    watched.goto("/")
    page.evaluate("new Image().src = 'https://tracker.example/pixel.gif'")
    watched.wait_for(lambda: bool(watched.violations), "no violation reported")
    assert watched.violations == ["/: img-src https://tracker.example/pixel.gif"]
    assert watched.aborted == []  # refused before any request
    watched.violations.clear()
    watched.console.clear()


SCHEMES = ("light", "dark")
WIDTHS = ((PHONE, "phone"), (DESKTOP, "desktop"))


def _shoot(watched: _Watched, path: str, name: str, *, banner: bool = False) -> None:
    page = watched.page
    watched.goto(path)
    if banner:
        _expect()(_banner(page)).to_be_visible(timeout=3000)
    width = page.evaluate("document.documentElement.scrollWidth")
    viewport = page.viewport_size
    assert viewport is not None and width <= viewport["width"], (path, width)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def test_screenshots_of_the_pages_with_and_without_the_banner(
    gateway: Gateway, watch: Callable[..., _Watched]
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    configure(gateway)
    for scheme in SCHEMES:
        for viewport, width in WIDTHS:
            watched = watch(viewport=viewport, color_scheme=scheme)
            for path in PAGES:
                slug = path.strip("/") or "landing"
                _shoot(watched, path, f"{slug}-{width}-{scheme}")
            assert watched.tags() == []
    configure(gateway, name="Opulon API", **IDS)
    for scheme in SCHEMES:
        for viewport, width in WIDTHS:
            watched = watch(viewport=viewport, color_scheme=scheme)
            for path in SITE_PAGES:
                slug = path.strip("/") or "landing"
                _shoot(watched, path, f"{slug}-banner-{width}-{scheme}", banner=True)
            # What a visitor sees first: the window, with the banner over the page.
            watched.goto("/")
            watched.page.screenshot(path=ARTIFACTS / f"banner-{width}-{scheme}.png")
            _banner(watched.page).screenshot(path=ARTIFACTS / f"banner-only-{width}-{scheme}.png")
            assert watched.tags() == []
    gpc = watch(viewport=PHONE, extra_http_headers={"Sec-GPC": "1"})
    gpc.goto("/")
    _expect()(_banner(gpc.page)).to_be_visible(timeout=3000)
    gpc.page.screenshot(path=ARTIFACTS / "banner-gpc-phone-light.png")


@pytest.mark.parametrize(
    ("viewport", "name"),
    [({"width": 320, "height": 568}, "small-phone"), ({"width": 844, "height": 390}, "landscape")],
)
def test_on_a_small_window_every_choice_of_the_banner_can_be_reached(
    gateway: Gateway,
    watch: Callable[..., _Watched],
    configured: SiteSettings,
    viewport: dict[str, int],
    name: str,
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    watched = watch(viewport=viewport)
    page = watched.page
    watched.goto("/privacy")
    banner = _banner(page)
    _expect()(banner).to_be_visible(timeout=3000)
    page.screenshot(path=ARTIFACTS / f"banner-{name}.png")
    # The banner fits the window (scrolling within itself if it must): its title too.
    box = banner.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"]
    title = page.locator("#consent-title")
    for label in ("Reject all", "Accept all", "Save my choices", None):
        button = title if label is None else banner.get_by_role("button", name=label)
        button.scroll_into_view_if_needed(timeout=3000)
        box = button.bounding_box()
        assert box is not None, label
        assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], (label, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], (label, box)
    banner.get_by_role("button", name="Reject all").click(timeout=3000)
    _expect()(banner).to_be_hidden(timeout=3000)
