"""The stored site settings (opulon.site_settings): validation, merging, the policy's date."""

from __future__ import annotations

import datetime as dt

import pytest

from opulon.errors import InvalidInput, NotFound
from opulon.site_settings import (
    FIELDS,
    POLICY_REVISED,
    SiteSettings,
    SiteSettingsStore,
    load_site_settings,
)
from opulon.storage import Store

TODAY = dt.date(2026, 12, 2)


def configure(store: Store, **given: object) -> tuple[SiteSettings, SiteSettings]:
    return SiteSettingsStore(store).configure(today=TODAY, **given)  # type: ignore[arg-type]


def test_nothing_is_configured_at_first(store: Store) -> None:
    settings = load_site_settings(store)
    assert settings == SiteSettings()
    assert not settings.analytics and not settings.google
    assert settings.policy_date_or_default() == POLICY_REVISED
    assert settings.to_json() == {
        "name": None, "contact": None, "public_url": None, "gtm_id": None, "ga4_id": None,
        "meta_pixel_id": None, "policy_date": POLICY_REVISED.isoformat(),
        "policy_date_set": False, "analytics": False,
    }  # fmt: skip
    with pytest.raises(NotFound, match="not configured"):
        SiteSettingsStore(store).remove()


@pytest.mark.parametrize(
    ("field", "given", "stored"),
    [
        ("name", "Opulon API", "Opulon API"),
        ("name", "  Opulon   API ", "Opulon API"),
        ("name", "x" * 80, "x" * 80),
        ("contact", "info@example.com", "info@example.com"),
        ("contact", "mailto:info@example.com", "info@example.com"),
        ("contact", "https://example.com/contact", "https://example.com/contact"),
        ("public_url", "https://api.example.com/", "https://api.example.com"),
        ("public_url", "https://api.example.com/v1", "https://api.example.com"),
        ("public_url", "http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("public_url", "http://localhost:8000", "http://localhost:8000"),
        ("public_url", "https://api.example.com:8443/gw/ai", "https://api.example.com:8443/gw/ai"),
        ("public_url", "https://[::1]:8000", "https://[::1]:8000"),
        ("policy_date", "2026-03-01", dt.date(2026, 3, 1)),
        ("policy_date", TODAY.isoformat(), TODAY),
        ("gtm_id", "GTM-ABCD123", "GTM-ABCD123"),
        ("gtm_id", " gtm-abcd123 ", "GTM-ABCD123"),
        ("ga4_id", "G-1234ABCD", "G-1234ABCD"),
        ("ga4_id", "g-1234abcd", "G-1234ABCD"),
        ("meta_pixel_id", "1234567890123456", "1234567890123456"),
    ],
)
def test_good_values_are_stored_normalised(
    store: Store, field: str, given: str, stored: object
) -> None:
    _, after = configure(store, **{field: given})
    assert getattr(after, field) == stored
    assert getattr(load_site_settings(store), field) == stored


@pytest.mark.parametrize(
    ("field", "given", "message"),
    [
        ("name", "", "--name"),
        ("name", "   ", "--name"),
        ("name", "x" * 81, "1 to 80 characters"),
        ("name", "Opulon\nAPI", "no control characters"),
        ("name", "Opulon\x00", "no control characters"),
        ("name", "Opulon\u200b", "no control characters"),
        ("contact", "info", "--contact"),
        ("contact", "info@example", "--contact"),
        ("contact", "info@example.com\r\nBcc: x@example.com", "--contact"),
        ("contact", "info\x00@example.com", "no control characters"),
        ("contact", "info\u200b@example.com", "no control characters"),
        ("contact", "http://example.com/contact", "https://"),
        ("contact", "https://", "https://"),
        ("contact", 'https://example.com/"onmouseover=x', "https://"),
        ("public_url", "http://api.example.com", "use https"),
        ("public_url", "ftp://api.example.com", "--public-url"),
        ("public_url", "https://api.example.com/?x=1", "no query"),
        ("public_url", "https://api.example.com/\x01", "control characters"),
        ("public_url", 'https://api.example.com/"+alert(1)+"', "letters, digits"),
        ("public_url", "https://api.example.com/a\\b", "letters, digits"),
        ("public_url", "https://api.example.com:8443/gw<x>", "letters, digits"),
        ("policy_date", "2026-13-01", "YYYY-MM-DD"),
        ("policy_date", "yesterday", "YYYY-MM-DD"),
        ("policy_date", "2026-12-04", "in the future"),
        ("gtm_id", "GTM-<script>", "--gtm-id"),
        ("gtm_id", "GTM-ABC", "--gtm-id"),
        ("gtm_id", "G-1234ABCD", "--gtm-id"),
        ("gtm_id", "GTM-ABCD\nX", "--gtm-id"),
        ("ga4_id", "G-1 onload=x", "--ga4-id"),
        ("ga4_id", 'G-12"345', "--ga4-id"),
        ("ga4_id", "UA-12345-1", "--ga4-id"),
        ("ga4_id", "GTM-ABCD123", "--ga4-id"),
        ("meta_pixel_id", "1234", "--meta-pixel-id"),
        ("meta_pixel_id", "12345x", "--meta-pixel-id"),
        ("meta_pixel_id", "1" * 21, "--meta-pixel-id"),
        ("meta_pixel_id", "123456<", "--meta-pixel-id"),
    ],
)
def test_bad_values_are_refused_and_nothing_changes(
    store: Store, field: str, given: str, message: str
) -> None:
    configure(store, name="Before")
    generation = store.config_generation()
    with pytest.raises(InvalidInput, match=message) as refused:
        configure(store, **{field: given})
    assert "\n" not in str(refused.value).replace("\\n", "")
    assert load_site_settings(store) == SiteSettings(name="Before", policy_date=TODAY)
    assert store.config_generation() == generation


def test_given_values_change_and_the_others_stay(store: Store) -> None:
    configure(store, name="Opulon API", contact="info@example.com", gtm_id="GTM-ABCD")
    before, after = configure(store, public_url="https://api.example.com", ga4_id="G-ABCD1234")
    assert before == SiteSettings(
        name="Opulon API", contact="info@example.com", gtm_id="GTM-ABCD", policy_date=TODAY
    )
    assert after == SiteSettings(
        name="Opulon API", contact="info@example.com", public_url="https://api.example.com",
        policy_date=TODAY, gtm_id="GTM-ABCD", ga4_id="G-ABCD1234",
    )  # fmt: skip
    assert load_site_settings(store) == after
    assert after.analytics and after.google
    assert after.website == "api.example.com"
    assert store.db.execute("SELECT count(*) FROM site_settings").fetchone()[0] == 1


def test_remove_clears_the_named_settings_only(store: Store) -> None:
    configure(store, name="Opulon API", gtm_id="GTM-ABCD", meta_pixel_id="1234567")
    _, after = configure(store, remove=("gtm-id", "meta-pixel-id"))
    assert after.name == "Opulon API"
    assert after.gtm_id is None and after.meta_pixel_id is None and not after.analytics
    assert load_site_settings(store) == after


def test_remove_refuses_unknown_fields_and_contradictions(store: Store) -> None:
    with pytest.raises(InvalidInput, match="invalid --remove 'gtm_id': one of name, contact"):
        configure(store, remove=("gtm_id",))
    with pytest.raises(InvalidInput, match="--gtm-id and --remove gtm-id contradict"):
        configure(store, gtm_id="GTM-ABCD", remove=("gtm-id",))
    assert set(FIELDS) == {
        "name", "contact", "public-url", "policy-date", "gtm-id", "ga4-id", "meta-pixel-id"
    }  # fmt: skip


def test_the_policy_date_moves_to_today_only_when_the_policy_changes(store: Store) -> None:
    stored = SiteSettingsStore(store)
    # A date given is kept, though the policy changes.
    _, after = configure(store, name="Opulon API", policy_date="2026-11-01")
    assert after.policy_date == dt.date(2026, 11, 1)
    # What the policy says changes: today's date.
    later = TODAY + dt.timedelta(days=3)
    _, after = stored.configure(contact="info@example.com", today=later)
    assert after.policy_date == later
    # The same values again: the policy says the same, the date stays.
    _, after = stored.configure(contact="info@example.com", today=later + dt.timedelta(days=1))
    assert after.policy_date == later
    # A tag added or removed changes the policy.
    _, after = stored.configure(gtm_id="GTM-ABCD", today=later + dt.timedelta(days=2))
    assert after.policy_date == later + dt.timedelta(days=2)
    _, after = stored.configure(remove=("gtm-id",), today=later + dt.timedelta(days=3))
    assert after.policy_date == later + dt.timedelta(days=3)
    # Only the date given: it is the date.
    _, after = stored.configure(policy_date="2026-03-22", today=later + dt.timedelta(days=4))
    assert after.policy_date == POLICY_REVISED
    # Removing the date: back to the policy's own.
    _, after = stored.configure(remove=("policy-date",), today=later + dt.timedelta(days=5))
    assert after.policy_date is None and after.policy_date_or_default() == POLICY_REVISED
    assert after.to_json()["policy_date_set"] is False


def test_the_policy_date_may_not_be_in_the_future(store: Store) -> None:
    tomorrow = TODAY + dt.timedelta(days=1)  # a day's grace for time zones
    _, after = configure(store, policy_date=tomorrow.isoformat())
    assert after.policy_date == tomorrow


def test_remove_forgets_everything(store: Store) -> None:
    configure(store, name="Opulon API", ga4_id="G-ABCD1234")
    removed = SiteSettingsStore(store).remove()
    assert removed.name == "Opulon API"
    assert load_site_settings(store) == SiteSettings()
    assert store.db.execute("SELECT count(*) FROM site_settings").fetchone()[0] == 0
    with pytest.raises(NotFound):
        SiteSettingsStore(store).remove()


def test_a_changed_setting_bumps_the_config_generation(store: Store) -> None:
    start = store.config_generation()
    configure(store, name="Opulon API")
    after_configure = store.config_generation()
    assert after_configure > start
    configure(store, gtm_id="GTM-ABCD")
    assert store.config_generation() > after_configure
    before_remove = store.config_generation()
    SiteSettingsStore(store).remove()
    assert store.config_generation() > before_remove


def test_the_tag_fingerprint_follows_the_tags_only(store: Store) -> None:
    _, first = configure(store, gtm_id="GTM-ABCD")
    _, renamed = configure(store, name="Opulon API")
    _, more = configure(store, meta_pixel_id="1234567")
    assert first.tag_fingerprint == renamed.tag_fingerprint != more.tag_fingerprint
    assert len(more.tag_fingerprint) == 10


def test_the_contact_is_an_email_or_a_page() -> None:
    assert SiteSettings(contact="info@example.com").contact_is_email
    assert not SiteSettings(contact="https://example.com/contact").contact_is_email
    assert not SiteSettings().contact_is_email
    assert SiteSettings(public_url="https://example.com/api").website == "example.com/api"
