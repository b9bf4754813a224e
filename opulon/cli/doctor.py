"""``opulon doctor``: is this installation sound?"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.table import Table

from opulon.cli.common import settings_of
from opulon.cli.console import console, escape, print_json
from opulon.email_settings import EmailSettings, load_email_settings
from opulon.errors import OpulonError
from opulon.interpreter import describe
from opulon.keys import KeyStore
from opulon.providers import ProviderStore
from opulon.service_checks import ServiceUnreachable, check_postgresql, check_redis
from opulon.settings import MASTER_KEY_ENV, Settings
from opulon.site_settings import SiteSettings, load_site_settings
from opulon.storage import open_store
from opulon.usage_journal import JOURNAL_DIR, waiting_rows

OK, TODO, FAIL = "ok", "todo", "FAIL"
_SETUP = "opulon keys list (or any command) creates it"


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def _private_file(name: str, path: Path, mode: int | None) -> tuple[str, str, str]:
    """A file that must be readable by its owner alone; not there yet is a step to take."""
    if mode is None:
        return (name, TODO, f"{path} does not exist yet: {_SETUP}")
    if mode & 0o077:
        return (name, FAIL, f"{path} has mode {oct(mode)}: others may read it (chmod 600)")
    return (name, OK, f"{path} (mode {oct(mode)})")


def _email_check(email: EmailSettings | None) -> tuple[str, str, str]:
    if email is None:
        return ("email", TODO, "not configured (key delivery, sign-in): opulon email configure")
    if email.public_url is None:
        return (
            "email",
            TODO,
            f"{email.provider_name}, no public URL: keys cannot be sent "
            "(opulon site configure --public-url URL)",
        )
    return ("email", OK, f"{email.provider_name}, for {email.public_url}")


#: What the pages need to say whose service it is: (setting, in words, its option).
_SITE_NEEDS = (
    ("name", "name", "--name"),
    ("contact", "contact", "--contact"),
    ("public_url", "public URL", "--public-url"),
)


def _site_check(site: SiteSettings) -> tuple[str, str, str]:
    from opulon.cli.site import analytics_summary

    if site == SiteSettings():
        return (
            "site",
            TODO,
            "not configured (name, contact, public URL): "
            "opulon site configure --name ... --contact ... --public-url ...",
        )
    missing = [(words, option) for field, words, option in _SITE_NEEDS if not getattr(site, field)]
    if missing:
        what = ", ".join(words for words, _ in missing)
        steps = " ".join(f"{option} ..." for _, option in missing)
        return ("site", TODO, f"no {what}: opulon site configure {steps}")
    tags = analytics_summary(site)
    analytics = f"analytics: {tags} (after consent)" if tags else "no analytics"
    return ("site", OK, f"{site.name}, {site.public_url}, contact {site.contact}; {analytics}")


def _initialised(url: str) -> bool:
    from opulon.store_postgres import PgConnection, is_initialised

    conn = PgConnection(url, read_only=True)
    try:
        return is_initialised(conn)
    finally:
        conn.close()


def _database_checks(settings: Settings, checks: list[tuple[str, str, str]]) -> int | None:
    """The database's rows; the SQLite file's mode (a PostgreSQL store with tables counts as
    a private file), or None when there is nothing to open yet."""
    if not (settings.is_postgresql and settings.database_url):
        mode = _mode(settings.db_path)
        checks.append(_private_file("database", settings.db_path, mode))
        return mode
    try:
        found = check_postgresql(settings.database_url)
        checks.append(("database", OK, found.describe()))
        if _initialised(settings.database_url):
            return 0o600
        checks.append(("schema", TODO, f"no tables yet: {_SETUP}"))
    except (ServiceUnreachable, OpulonError) as exc:
        checks.append(("database", FAIL, str(exc)))
    return None


def _redis_check(url: str | None) -> tuple[str, str, str]:
    if not url:
        return ("redis", OK, "not used: one node (several share one: opulon serve --redis URL)")
    try:
        found = check_redis(url).describe()
    except ServiceUnreachable as exc:
        return ("redis", FAIL, str(exc))
    parts = urlsplit(url)
    if parts.scheme != "unix" and not parts.password and "password=" not in parts.query:
        # Whoever reaches it could reset every key's counts: the limits would fail open.
        return ("redis", TODO, f"{found}; no password: give it one (requirepass or an ACL user)")
    return ("redis", OK, found)


def _journal_check(settings: Settings) -> tuple[str, str, str]:
    directory = settings.home / JOURNAL_DIR
    journals, rows = waiting_rows(directory)
    if rows:
        return (
            "usage journal",
            TODO,
            f"{rows} usage rows of {journals} gateway process(es) that stopped wait in "
            f"{directory}: opulon serve on this data dir and their database writes them",
        )
    return ("usage journal", OK, "no rows waiting")


def doctor(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis",
            envvar="OPULON_REDIS_URL",
            help="The shared limiter's Redis to check (as opulon serve --redis takes it).",
        ),
    ] = None,
) -> None:
    """Check the data dir, file modes, database, schema and master key, and Redis where one is
    used; exit 1 when something is wrong.

    What does not exist yet is named with the command that creates it, and is not a failure.
    """
    settings = settings_of(ctx)
    checks: list[tuple[str, str, str]] = []
    if settings.home.is_dir():
        checks.append(("data dir", OK, str(settings.home)))
    else:
        checks.append(("data dir", TODO, f"{settings.home} does not exist yet: {_SETUP}"))
    db_mode = _database_checks(settings, checks)
    if settings.master_key_text is not None:
        checks.append(("master key", OK, f"from {MASTER_KEY_ENV}"))
    else:
        key_path = settings.master_key_path
        checks.append(_private_file("master key file", key_path, _mode(key_path)))
    for suffix in ("-wal", "-shm") if not settings.is_postgresql else ():
        extra = settings.db_path.with_name(settings.db_path.name + suffix)
        mode = _mode(extra)
        if mode is not None:
            checks.append(_private_file(f"database{suffix}", extra, mode))
    schema = "-"
    if db_mode is not None:
        try:
            store = open_store(settings, create=False)
        except OpulonError as exc:
            checks.append(("master key fits", FAIL, str(exc)))
        else:
            try:
                applied = store.schema_version()
                unknown = store.unknown_migrations()
                providers = len(ProviderStore(store).all())
                keys = len(KeyStore(store).all())
                email = load_email_settings(store)
                site = load_site_settings(store)
            finally:
                store.close()
            schema = applied[-1] if applied else "-"
            checks.append(("master key fits", OK, "yes"))
            if unknown:
                checks.append(("schema", FAIL, f"newer than this opulon ({unknown[-1]}): upgrade"))
            else:
                checks.append(("schema", OK, f"{schema} ({len(applied)} migrations)"))
            checks.append(
                ("providers", OK, f"{providers}")
                if providers
                else ("providers", TODO, "none yet: opulon providers add NAME --kind openai ...")
            )
            checks.append(
                ("keys", OK, f"{keys}")
                if keys
                else ("keys", TODO, "none yet: opulon keys create --name NAME")
            )
            checks.append(_email_check(email))
            checks.append(_site_check(site))
    checks.append(_journal_check(settings))
    checks.append(_redis_check(redis))
    ok = all(status != FAIL for _, status, _ in checks)
    # Advice, not a failure: the gateway works on any CPython, only its speed differs.
    python_line, _ = describe()
    checks.append(("python", OK, python_line))
    if json:
        print_json(
            {
                "ok": ok,
                "home": str(settings.home),
                "schema": schema,
                "checks": [
                    {"name": n, "ok": status != FAIL, "status": status, "detail": d}
                    for n, status, d in checks
                ],
            }
        )
    else:
        colours = {OK: "green", TODO: "yellow", FAIL: "red"}
        table = Table(show_header=False, box=None)
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        for name, status, detail in checks:
            table.add_row(f"[{colours[status]}]{status}[/]", name, escape(detail))
        console.print(table)
        if not ok:
            console.print("[red]Something is wrong: see FAIL above.[/]")
        elif any(status == TODO for _, status, _ in checks):
            console.print("[green]Nothing is wrong;[/] the steps marked todo are still to take.")
        else:
            console.print("[green]All checks passed.[/]")
    if not ok:
        raise typer.Exit(1)
