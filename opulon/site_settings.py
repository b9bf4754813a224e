"""The public website's settings: whose service it is, and which analytics it may load.

One row in ``site_settings`` (migration m008), every value optional: the service's name, the
contact address of the privacy policy, the gateway's public URL (the base URL the landing page
gives to SDKs), the policy's date, and the IDs of Google Tag Manager, Google Analytics 4 and
the Meta Pixel. Nothing is set in a new installation, and then no page loads anything from
another host. An analytics ID only ever makes the pages *offer* its tag: the cookie banner
loads it after the visitor accepts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
import unicodedata
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from opulon.email_settings import validate_address, validate_public_url
from opulon.errors import InvalidInput, NotFound
from opulon.storage import Store

__all__ = [
    "FIELDS",
    "POLICY_REVISED",
    "SiteSettings",
    "SiteSettingsStore",
    "load_site_settings",
]

#: When the privacy policy's own text (opulon/web/templates/privacy_policy.txt) last changed:
#: its date until the operator's settings change what it says.
POLICY_REVISED = dt.date(2026, 3, 22)
MAX_NAME = 80

_GTM_RE = re.compile(r"GTM-[A-Z0-9]{4,12}")
_GA4_RE = re.compile(r"G-[A-Z0-9]{4,16}")
_PIXEL_RE = re.compile(r"[0-9]{5,20}")
_URL_RE = re.compile(r"https://[^\s<>\"']+")

_COLUMNS = ("name", "contact", "public_url", "policy_date", "gtm_id", "ga4_id", "meta_pixel_id")
#: The settings by their CLI spelling (``--remove gtm-id``), in the order they are shown.
FIELDS = tuple(column.replace("_", "-") for column in _COLUMNS)


@dataclass(frozen=True, slots=True)
class SiteSettings:
    """The stored site settings (all None when nothing is configured)."""

    name: str | None = None
    contact: str | None = None  # an email address or an https URL
    public_url: str | None = None  # e.g. https://api.example.com, without /v1
    policy_date: dt.date | None = None
    gtm_id: str | None = None
    ga4_id: str | None = None
    meta_pixel_id: str | None = None

    @property
    def google(self) -> bool:
        """Whether a Google tag (Tag Manager or GA4 directly) is configured."""
        return bool(self.gtm_id or self.ga4_id)

    @property
    def analytics(self) -> bool:
        """Whether any analytics ID is configured, so that pages carry the cookie banner."""
        return self.google or bool(self.meta_pixel_id)

    @property
    def tag_fingerprint(self) -> str:
        """A short digest of the configured tags: a visitor's choice holds for this set only,
        and a tag added later asks again."""
        ids = "|".join(value or "" for value in (self.gtm_id, self.ga4_id, self.meta_pixel_id))
        return hashlib.sha256(ids.encode()).hexdigest()[:10]

    @property
    def contact_is_email(self) -> bool:
        return self.contact is not None and not self.contact.startswith("https://")

    @property
    def website(self) -> str | None:
        """The website's host as people write it (``api.example.com``), from the public URL."""
        if self.public_url is None:
            return None
        parts = urlsplit(self.public_url)
        return (parts.netloc + parts.path).rstrip("/")

    def policy_date_or_default(self) -> dt.date:
        return self.policy_date or POLICY_REVISED

    def to_json(self) -> dict[str, Any]:
        """What ``opulon site show --json`` prints."""
        data: dict[str, Any] = {
            column: getattr(self, column) for column in _COLUMNS if column != "policy_date"
        }
        data["policy_date"] = self.policy_date_or_default().isoformat()
        data["policy_date_set"] = self.policy_date is not None
        data["analytics"] = self.analytics
        return data


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch)[0] == "C" for ch in text)


def validate_name(name: str) -> str:
    cleaned = " ".join(name.split())
    if not cleaned or _has_control(name) or len(cleaned) > MAX_NAME:
        raise InvalidInput(
            f"invalid --name {name!r}: 1 to {MAX_NAME} characters, no control characters"
        )
    return cleaned


def validate_contact(contact: str) -> str:
    """An email address (``info@example.com``) or an https URL of a contact page."""
    cleaned = contact.strip()
    if _has_control(cleaned):  # an address's pattern alone lets NUL or a zero-width space by
        raise InvalidInput(f"invalid --contact {contact!r}: no control characters")
    if cleaned.startswith("mailto:"):
        cleaned = cleaned[len("mailto:") :]
    if cleaned.lower().startswith(("http://", "https://")):
        if not _URL_RE.fullmatch(cleaned) or _has_control(cleaned) or not urlsplit(cleaned).netloc:
            raise InvalidInput(
                f"invalid --contact {contact!r}: an email address, or an https:// URL"
            )
        return cleaned
    return validate_address(cleaned, what="--contact")


def validate_policy_date(value: str, *, today: dt.date | None = None) -> dt.date:
    try:
        date = dt.date.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(f"invalid --policy-date {value!r}: expected YYYY-MM-DD") from None
    latest = (today or dt.datetime.now(dt.UTC).date()) + dt.timedelta(days=1)
    if date > latest:
        raise InvalidInput(f"invalid --policy-date {value}: it is in the future")
    return date


def _validate_id(value: str, pattern: re.Pattern[str], option: str, example: str) -> str:
    cleaned = value.strip().upper()
    if not pattern.fullmatch(cleaned):
        raise InvalidInput(f"invalid {option} {value!r}: expected {example}")
    return cleaned


def validate_gtm_id(value: str) -> str:
    return _validate_id(value, _GTM_RE, "--gtm-id", "GTM- and 4 to 12 letters or digits")


def validate_ga4_id(value: str) -> str:
    return _validate_id(value, _GA4_RE, "--ga4-id", "G- and 4 to 16 letters or digits")


def validate_meta_pixel_id(value: str) -> str:
    return _validate_id(value, _PIXEL_RE, "--meta-pixel-id", "the pixel's number, 5 to 20 digits")


def _policy_changes(before: SiteSettings, after: SiteSettings) -> bool:
    """Whether the rendered policy says something else: its name, contact, website or tags."""
    compared = ("name", "contact", "public_url", "gtm_id", "ga4_id", "meta_pixel_id")
    return any(getattr(before, name) != getattr(after, name) for name in compared)


class SiteSettingsStore:
    """The site settings in the database: at most one row."""

    def __init__(self, store: Store) -> None:
        self._db = store.db

    def get(self) -> SiteSettings:
        """The settings; every value None when nothing is configured."""
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM site_settings WHERE id = 1"
        ).fetchone()
        if row is None:
            return SiteSettings()
        values = dict(zip(_COLUMNS, row, strict=True))
        date = values.pop("policy_date")
        return SiteSettings(
            **values, policy_date=dt.date.fromisoformat(date) if date is not None else None
        )

    def configure(
        self,
        *,
        name: str | None = None,
        contact: str | None = None,
        public_url: str | None = None,
        policy_date: str | None = None,
        gtm_id: str | None = None,
        ga4_id: str | None = None,
        meta_pixel_id: str | None = None,
        remove: tuple[str, ...] = (),
        today: dt.date | None = None,
    ) -> tuple[SiteSettings, SiteSettings]:
        """Change the given settings and clear those named in ``remove`` (CLI spellings);
        the others stay. Returns (before, after).

        When the policy would say something else and no ``policy_date`` is given, its date
        becomes today: the "Last updated" line stays true.
        """
        unknown = [item for item in remove if item not in FIELDS]
        if unknown:
            raise InvalidInput(f"invalid --remove {unknown[0]!r}: one of {', '.join(FIELDS)}")
        today = today or dt.datetime.now(dt.UTC).date()
        given: dict[str, Any] = {}
        if name is not None:
            given["name"] = validate_name(name)
        if contact is not None:
            given["contact"] = validate_contact(contact)
        if public_url is not None:
            given["public_url"] = validate_public_url(public_url)
        if policy_date is not None:
            given["policy_date"] = validate_policy_date(policy_date, today=today)
        if gtm_id is not None:
            given["gtm_id"] = validate_gtm_id(gtm_id)
        if ga4_id is not None:
            given["ga4_id"] = validate_ga4_id(ga4_id)
        if meta_pixel_id is not None:
            given["meta_pixel_id"] = validate_meta_pixel_id(meta_pixel_id)
        for item in remove:
            column = item.replace("-", "_")
            if column in given:
                raise InvalidInput(f"--{item} and --remove {item} contradict each other")
            given[column] = None
        with self._db.atomic():
            before = self.get()
            after = replace(before, **given)
            if "policy_date" not in given and _policy_changes(before, after):
                after = replace(after, policy_date=today)
            self._write(after)
        return before, after

    def _write(self, settings: SiteSettings) -> None:
        values = [getattr(settings, column) for column in _COLUMNS]
        values[_COLUMNS.index("policy_date")] = (
            settings.policy_date.isoformat() if settings.policy_date else None
        )
        self._db.execute("DELETE FROM site_settings")
        self._db.execute(
            f"INSERT INTO site_settings (id, {', '.join(_COLUMNS)}, updated_at) "
            f"VALUES (1, {', '.join('?' for _ in _COLUMNS)}, ?)",
            [*values, time.time()],
        )

    def remove(self) -> SiteSettings:
        """Forget every setting (the site shows its defaults again); NotFound when none."""
        settings = self.get()
        if settings == SiteSettings():
            raise NotFound("the site is not configured; nothing to remove")
        self._db.execute("DELETE FROM site_settings")
        return settings


def load_site_settings(store: Store) -> SiteSettings:
    return SiteSettingsStore(store).get()
