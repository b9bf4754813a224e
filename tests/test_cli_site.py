"""``opulon site ...``, run as a user runs it."""

from __future__ import annotations

import datetime as dt

import pytest
from cli_helpers import run, run_error, run_json, run_ok

from opulon.site_settings import POLICY_REVISED

TODAY = dt.datetime.now(dt.UTC).date().isoformat()
RETENTION = "set the GA4 property's data retention to 14 months"
CONTAINER = "Every tag in the container must require consent"
CONSENT = "load only after a visitor accepts them in the cookie banner"


def lines(output: str) -> list[str]:
    return [line.rstrip() for line in output.splitlines() if line.strip()]


def flat(output: str) -> str:
    return " ".join(output.split())


def test_configure_prints_what_changed_one_line_each() -> None:
    out = run_ok(
        "site", "configure", "--name", "Opulon API", "--contact", "info@example.com",
        "--public-url", "https://api.example.com/",
    ).stdout  # fmt: skip
    assert lines(out) == [
        "name: Opulon API",
        "contact: info@example.com",
        "public URL: https://api.example.com",
        f"policy date: {TODAY} (the policy changed; give --policy-date to choose another)",
    ]
    assert CONSENT not in flat(out) and RETENTION not in flat(out)  # no analytics given
    # Only what is given changes; the rest stays.
    out = run_ok("site", "configure", "--name", "Opulon Gateway").stdout
    assert lines(out) == ["name: Opulon Gateway"]  # the date is today's already
    shown = run_json("site", "show")
    assert shown["name"] == "Opulon Gateway" and shown["contact"] == "info@example.com"
    assert shown["public_url"] == "https://api.example.com"


def test_a_given_policy_date_is_kept() -> None:
    out = run_ok("site", "configure", "--name", "Opulon API", "--policy-date", "2026-03-01").stdout
    assert lines(out) == ["name: Opulon API", "policy date: 2026-03-01"]
    shown = run_json("site", "show")
    assert shown["policy_date"] == "2026-03-01" and shown["policy_date_set"] is True
    out = run_ok("site", "configure", "--name", "Opulon API").stdout
    assert lines(out) == ["Nothing changed: the settings were so already."]


def test_configure_without_an_option_says_what_to_give() -> None:
    line = run_error("site", "configure", code=2)
    assert line.startswith("error: give a setting to change: --name, --contact, --public-url")
    assert "--remove FIELD" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--name", "x" * 81), "invalid --name"),
        (("--name", "Opulon\x07"), "no control characters"),
        (("--contact", "info"), "invalid --contact 'info'"),
        (("--contact", "http://example.com/contact"), "invalid --contact"),
        (("--public-url", "http://api.example.com"), "use https"),
        (("--policy-date", "2099-01-01"), "in the future"),
        (("--policy-date", "22.03.2026"), "expected YYYY-MM-DD"),
        (("--gtm-id", "GTM-<script>"), "invalid --gtm-id"),
        (("--ga4-id", "G-1 onload=x"), "invalid --ga4-id"),
        (("--meta-pixel-id", "pixel"), "invalid --meta-pixel-id"),
        (("--remove", "gtm"), "invalid --remove 'gtm': one of name, contact, public-url"),
        (("--gtm-id", "GTM-ABCD", "--remove", "gtm-id"), "contradict each other"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(args: tuple[str, ...], says: str) -> None:
    run_ok("site", "configure", "--name", "Before")
    line = run_error("site", "configure", *args, code=2)
    assert says in line
    assert run_json("site", "show")["name"] == "Before"
    assert run_json("site", "show")["analytics"] is False


def test_http_public_url_on_this_machine_is_fine() -> None:
    run_ok("site", "configure", "--public-url", "http://127.0.0.1:8000")
    assert run_json("site", "show")["public_url"] == "http://127.0.0.1:8000"


def test_analytics_ids_get_the_consent_note_and_the_retention_reminder() -> None:
    out = run_ok("site", "configure", "--gtm-id", "gtm-abcd123").stdout
    assert "gtm-id: GTM-ABCD123" in lines(out)  # upper case, as Google writes it
    assert CONSENT in flat(out) and RETENTION in flat(out) and CONTAINER in flat(out)
    out = run_ok("site", "configure", "--ga4-id", "G-ABCD1234").stdout
    assert CONSENT in flat(out) and RETENTION in flat(out)
    assert CONTAINER not in flat(out)  # gtag.js alone runs only Google's own tag
    out = run_ok("site", "configure", "--meta-pixel-id", "1234567").stdout
    assert CONSENT in flat(out)
    assert RETENTION not in flat(out)  # the Meta Pixel has no GA4 property
    shown = run_json("site", "show")
    assert (shown["gtm_id"], shown["ga4_id"], shown["meta_pixel_id"]) == (
        "GTM-ABCD123", "G-ABCD1234", "1234567",
    )  # fmt: skip
    assert shown["analytics"] is True
    text = flat(run_ok("site", "show").stdout)
    assert "analytics GTM-ABCD123, GA4 G-ABCD1234, Meta Pixel 1234567 (loaded only after" in text


def test_remove_gtm_id_removes_it() -> None:
    run_ok("site", "configure", "--name", "Opulon API", "--gtm-id", "GTM-ABCD")
    out = run_ok("site", "configure", "--remove", "gtm-id").stdout
    assert lines(out)[0] == "gtm-id: GTM-ABCD (removed)"  # the date was today's already
    assert CONSENT not in flat(out)
    shown = run_json("site", "show")
    assert shown["gtm_id"] is None and shown["analytics"] is False
    assert shown["name"] == "Opulon API"
    assert "no analytics: no page loads anything from another host" in flat(
        run_ok("site", "show").stdout
    )


def test_remove_is_repeatable_and_the_policy_date_goes_back_to_the_default() -> None:
    run_ok("site", "configure", "--name", "Opulon API", "--ga4-id", "G-ABCD1234",
           "--policy-date", "2026-03-01")  # fmt: skip
    out = run_ok("site", "configure", "--remove", "ga4-id", "--remove", "policy-date").stdout
    assert lines(out) == [
        "policy date: 2026-03-22 (removed: the policy's own date)",
        "ga4-id: G-ABCD1234 (removed)",
    ]
    shown = run_json("site", "show")
    assert shown["ga4_id"] is None
    assert shown["policy_date"] == POLICY_REVISED.isoformat()
    assert shown["policy_date_set"] is False


def test_show_when_nothing_is_configured_names_the_defaults() -> None:
    text = flat(run_ok("site", "show").stdout)
    assert "The site is not configured" in text
    assert 'the name "Opulon"' in text and "no contact" in text
    assert f"the policy date {POLICY_REVISED.isoformat()}" in text
    assert "no analytics" in text
    assert run_json("site", "show") == {
        "name": None, "contact": None, "public_url": None, "gtm_id": None, "ga4_id": None,
        "meta_pixel_id": None, "policy_date": POLICY_REVISED.isoformat(),
        "policy_date_set": False, "analytics": False,
    }  # fmt: skip


def test_show_lists_every_setting() -> None:
    run_ok(
        "site", "configure", "--name", "Opulon API", "--contact", "https://example.com/contact",
        "--public-url", "https://api.example.com",
    )  # fmt: skip
    text = flat(run_ok("site", "show").stdout)
    for row in (
        "name Opulon API",
        "contact https://example.com/contact",
        "public URL https://api.example.com",
        f"policy date {TODAY}",
        "gtm-id -",
        "ga4-id -",
        "meta-pixel-id -",
        "analytics no analytics",
    ):
        assert row in text, row
    assert "the default" not in text
    run_ok("site", "configure", "--remove", "policy-date")
    assert f"policy date {POLICY_REVISED.isoformat()} (the default" in flat(
        run_ok("site", "show").stdout
    )


def test_remove_asks_first_and_forgets_everything() -> None:
    run_ok("site", "configure", "--name", "Opulon API", "--gtm-id", "GTM-ABCD")
    line = run_error("site", "remove", input="n\n")
    assert "not confirmed; nothing changed" in line
    assert run_json("site", "show")["name"] == "Opulon API"
    run_ok("site", "remove", input="y\n")
    assert run_json("site", "show")["name"] is None
    run_ok("site", "configure", "--name", "Opulon API")
    assert "Removed the site settings" in run_ok("site", "remove", "--yes").stdout
    assert run_json("site", "show")["analytics"] is False


def test_remove_of_nothing_is_one_line() -> None:
    line = run_error("site", "remove", "--yes")
    assert line == "error: the site is not configured; nothing to remove"


def test_the_help_is_plain_and_names_the_values() -> None:
    result = run("site", "configure", "--help")
    assert result.exit_code == 0
    text = flat(result.stdout)
    options = (
        "--name NAME", "--contact ADDRESS", "--public-url URL", "--policy-date YYYY-MM-DD",
        "--gtm-id GTM-XXXX", "--ga4-id G-XXXX", "--meta-pixel-id NUMBER", "--remove FIELD",
    )  # fmt: skip
    for shown in (*options, "Example: opulon site configure"):
        assert shown in text, shown
    assert "╭" not in result.stdout  # no rich panels
