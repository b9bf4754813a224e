"""``opulon site ...``: the public website's name, contact, public URL, policy date and analytics."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from opulon.cli.common import Yes, confirm, opened_store
from opulon.cli.console import console, escape, print_json
from opulon.errors import InvalidInput
from opulon.site_settings import FIELDS, POLICY_REVISED, SiteSettings, SiteSettingsStore

app = typer.Typer(
    rich_markup_mode=None,  # plain help, as gh and sqlite-utils print it: --limit LIMIT
    help="Configure, show and remove the public website's settings: whose service it is "
    "(the landing page and the privacy policy name it) and which analytics it may load.\n\n"
    'Example: opulon site configure --name "Opulon API" --contact info@example.com '
    "--public-url https://api.example.com",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

#: How each setting is named in the output, in FIELDS order.
LABELS = dict(
    zip(
        FIELDS,
        ("name", "contact", "public URL", "policy date", "gtm-id", "ga4-id", "meta-pixel-id"),
        strict=True,
    )
)
DEFAULT_NAME = "Opulon"
NO_ANALYTICS = "no analytics: no page loads anything from another host"
RETENTION_MONTHS = 14


def _value(settings: SiteSettings, field: str) -> str | None:
    value = getattr(settings, field.replace("-", "_"))
    return None if value is None else str(value)


def analytics_summary(settings: SiteSettings) -> str | None:
    """The configured tags in words (``GTM-ABCD, Meta Pixel 1234567``); None when none."""
    tags = []
    if settings.gtm_id:
        tags.append(settings.gtm_id)
    if settings.ga4_id:
        tags.append(f"GA4 {settings.ga4_id}")
    if settings.meta_pixel_id:
        tags.append(f"Meta Pixel {settings.meta_pixel_id}")
    return ", ".join(tags) or None


@app.command()
def configure(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="NAME",
            help='The service\'s name, e.g. "Opulon API" (the pages say "Opulon" without it).',
        ),
    ] = None,
    contact: Annotated[
        str | None,
        typer.Option(
            "--contact",
            metavar="ADDRESS",
            help="Where people reach the operator about privacy: an email address "
            "(info@example.com) or the https:// URL of a contact page.",
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            "--public-url",
            metavar="URL",
            help="The gateway's public URL, e.g. https://api.example.com (plain http only on "
            "this machine); the landing page gives it to SDKs, and the emails name it when "
            "email has none of its own.",
        ),
    ] = None,
    policy_date: Annotated[
        str | None,
        typer.Option(
            "--policy-date",
            metavar="YYYY-MM-DD",
            help='The privacy policy\'s "Last updated" date. Default: today whenever what the '
            f"policy says changes, {POLICY_REVISED.isoformat()} before that.",
            show_default=False,
        ),
    ] = None,
    gtm_id: Annotated[
        str | None,
        typer.Option(
            "--gtm-id",
            metavar="GTM-XXXX",
            help="A Google Tag Manager container to load, after the visitor's consent.",
        ),
    ] = None,
    ga4_id: Annotated[
        str | None,
        typer.Option(
            "--ga4-id",
            metavar="G-XXXX",
            help="A Google Analytics 4 measurement ID to load, after the visitor's consent.",
        ),
    ] = None,
    meta_pixel_id: Annotated[
        str | None,
        typer.Option(
            "--meta-pixel-id",
            metavar="NUMBER",
            help="A Meta Pixel to load, after the visitor's consent.",
        ),
    ] = None,
    remove: Annotated[
        list[str] | None,
        typer.Option(
            "--remove",
            metavar="FIELD",
            help=f"Clear one setting (repeatable): {', '.join(FIELDS)}.",
        ),
    ] = None,
) -> None:
    """Change the given settings; the others stay.

    Example: opulon site configure --name "Opulon API" --contact info@example.com --public-url https://api.example.com --gtm-id GTM-ABCD123
    """
    removed = tuple(remove or ())
    given = (name, contact, public_url, policy_date, gtm_id, ga4_id, meta_pixel_id)
    if all(value is None for value in given) and not removed:
        raise InvalidInput(
            "give a setting to change: --name, --contact, --public-url, --policy-date, "
            "--gtm-id, --ga4-id, --meta-pixel-id or --remove FIELD"
        )
    with opened_store(ctx) as store:
        before, after = SiteSettingsStore(store).configure(
            name=name,
            contact=contact,
            public_url=public_url,
            policy_date=policy_date,
            gtm_id=gtm_id,
            ga4_id=ga4_id,
            meta_pixel_id=meta_pixel_id,
            remove=removed,
        )
    changed = [field for field in FIELDS if _value(before, field) != _value(after, field)]
    if not changed:
        console.print("Nothing changed: the settings were so already.")
    for field in changed:
        old, new = _value(before, field), _value(after, field)
        if field == "policy-date" and new is None:
            line = f"{POLICY_REVISED.isoformat()} (removed: the policy's own date)"
        elif field == "policy-date" and policy_date is None:
            line = f"{new} (the policy changed; give --policy-date to choose another)"
        elif new is None:
            line = f"{old} (removed)"
        else:
            line = str(new)
        console.print(f"{LABELS[field]}: {line}", markup=False, soft_wrap=True)
    if gtm_id is not None or ga4_id is not None or meta_pixel_id is not None:
        console.print(
            "Note: the analytics tags load only after a visitor accepts them in the cookie "
            "banner; until then no page loads anything from another host.",
            markup=False,
        )
    if gtm_id is not None:
        console.print(
            "Reminder: Tag Manager loads once a visitor allows analytics, with Google's "
            "Consent Mode set to their choice. Every tag in the container must require "
            "consent (Google's tags do under Consent Mode; give any other tag an additional "
            "consent check in the container), or it would run against the visitor's choice.",
            markup=False,
        )
    if gtm_id is not None or ga4_id is not None:
        console.print(
            f"Reminder: the privacy policy promises {RETENTION_MONTHS} months of analytics "
            f"retention: set the GA4 property's data retention to {RETENTION_MONTHS} months "
            "(Admin > Data collection and modification > Data retention).",
            markup=False,
        )


@app.command()
def show(ctx: typer.Context, json: Json = False) -> None:
    """Show the site settings, and whether the pages load analytics."""
    with opened_store(ctx) as store:
        settings = SiteSettingsStore(store).get()
    if json:
        print_json(settings.to_json())
        return
    if settings == SiteSettings():
        console.print(
            f'The site is not configured; the pages use the defaults: the name "{DEFAULT_NAME}", '
            f"no contact, the policy date {POLICY_REVISED.isoformat()}, {NO_ANALYTICS}.\n"
            "Set it up: opulon site configure --name ... --contact ... --public-url ...",
            markup=False,
        )
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for field in FIELDS:
        value = _value(settings, field)
        if field == "name" and value is None:
            shown = f'- (the pages say "{DEFAULT_NAME}")'
        elif field == "policy-date":
            shown = settings.policy_date_or_default().isoformat()
            if settings.policy_date is None:
                shown += " (the default: the policy's own date)"
        else:
            shown = value or "-"
        table.add_row(LABELS[field], escape(shown))
    tags = analytics_summary(settings)
    table.add_row(
        "analytics",
        escape(f"{tags} (loaded only after a visitor accepts)" if tags else NO_ANALYTICS),
    )
    console.print(table)


@app.command()
def remove(ctx: typer.Context, yes: Yes = False) -> None:
    """Forget every site setting; the pages show their defaults again."""
    with opened_store(ctx) as store:
        stored = SiteSettingsStore(store)
        settings = stored.get()
        if settings != SiteSettings():
            confirm("Remove every site setting (name, contact, public URL, analytics IDs)?", yes)
        stored.remove()  # NotFound, one line, when there is nothing to remove
    console.print(
        f'Removed the site settings; the pages say "{DEFAULT_NAME}" and load no analytics.',
        markup=False,
    )
