"""``opulon email ...``: the service that delivers keys (and sign-in codes) by email."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from opulon.cli.common import Yes, confirm, opened_store
from opulon.cli.console import console, escape, print_json
from opulon.email_settings import (
    DEFAULT_BASE_URLS,
    DEFAULT_SMTP_PORT,
    DEFAULT_TIMEOUT,
    HTTP_PROVIDERS,
    EmailSettings,
    EmailSettingsStore,
    validate_address,
    validate_provider,
)
from opulon.errors import InvalidInput, OpulonError
from opulon.keys import KeyRecord
from opulon.mail import Mailer, MailError, mailer_for
from opulon.storage import Store

app = typer.Typer(
    rich_markup_mode=None,  # plain help, as gh and sqlite-utils print it: --limit LIMIT
    help="Configure, show, test and remove the email service that delivers keys.\n\n"
    'Example: opulon email configure --provider resend --from "Opulon <keys@example.com>" '
    "--public-url https://api.example.com --api-key-env RESEND_API_KEY",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def read_secret(env_var: str | None, from_stdin: bool, *, what: str, options: str) -> str | None:
    """A secret from a variable or the first line of standard input; None when neither given."""
    if env_var and from_stdin:
        raise InvalidInput(f"give either {options}, not both")
    if env_var:
        value = os.environ.get(env_var)
        if not value:
            raise InvalidInput(f"the variable {env_var} is not set or empty")
        return value
    if from_stdin:
        value = sys.stdin.readline().strip()
        if not value:
            raise InvalidInput(f"no {what} on standard input")
        return value
    return None


def _secret_for(
    provider: str,
    api_key: tuple[str | None, bool],
    password: tuple[str | None, bool],
) -> str | None:
    given_key = api_key[0] is not None or api_key[1]
    given_password = password[0] is not None or password[1]
    if validate_provider(provider) in HTTP_PROVIDERS:
        if given_password:
            raise InvalidInput("--password-env and --password-stdin are for --provider smtp")
        secret = read_secret(*api_key, what="API key", options="--api-key-env or --api-key-stdin")
        if secret is None:
            raise InvalidInput("give the API key with --api-key-env VAR or --api-key-stdin")
        return secret
    if given_key:
        raise InvalidInput("--api-key-env and --api-key-stdin are for resend and sendgrid")
    return read_secret(
        *password, what="SMTP password", options="--password-env or --password-stdin"
    )


@app.command()
def configure(
    ctx: typer.Context,
    provider: Annotated[
        str, typer.Option("--provider", help="resend, sendgrid, or smtp (your own mail server).")
    ],
    sender: Annotated[
        str,
        typer.Option(
            "--from",
            metavar="ADDRESS",
            help='The sender, e.g. "Opulon <keys@example.com>" (a domain the provider lets you '
            "send from).",
        ),
    ],
    public_url: Annotated[
        str | None,
        typer.Option(
            "--public-url",
            metavar="URL",
            help="The gateway's public URL, as key holders reach it, e.g. https://api.example.com; "
            "the emails name it. Needed to send keys.",
        ),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env", help="Read the Resend or SendGrid API key from this variable."
        ),
    ] = None,
    api_key_stdin: Annotated[
        bool,
        typer.Option(
            "--api-key-stdin", help="Read the Resend or SendGrid API key from standard input."
        ),
    ] = False,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            metavar="URL",
            help=f"The provider's API root. Default: {DEFAULT_BASE_URLS['resend']} (Resend), "
            f"{DEFAULT_BASE_URLS['sendgrid']} (SendGrid; https://api.eu.sendgrid.com for its EU "
            "region).",
            show_default=False,
        ),
    ] = None,
    smtp_host: Annotated[
        str | None, typer.Option("--smtp-host", metavar="HOST", help="The SMTP server's host name.")
    ] = None,
    smtp_port: Annotated[
        int | None,
        typer.Option(
            "--smtp-port",
            metavar="PORT",
            help=f"The SMTP server's port. Default: {DEFAULT_SMTP_PORT}.",
        ),
    ] = None,
    smtp_starttls: Annotated[
        bool | None,
        typer.Option(
            "--smtp-starttls/--no-smtp-starttls",
            help="Encrypt the SMTP connection with STARTTLS, checking the server's certificate "
            "(default). Without it only for a server on this machine when a password is sent.",
            show_default=False,
        ),
    ] = None,
    smtp_user: Annotated[
        str | None,
        typer.Option("--smtp-user", metavar="USER", help="Log in to the SMTP server as this user."),
    ] = None,
    password_env: Annotated[
        str | None,
        typer.Option(
            "--password-env", metavar="VAR", help="Read the SMTP password from this variable."
        ),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the SMTP password from standard input."),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            help=f"How long to wait for the provider per attempt. Default: {DEFAULT_TIMEOUT:g}.",
            show_default=False,
        ),
    ] = DEFAULT_TIMEOUT,
) -> None:
    """Set up the email service (replacing any before); its API key or password is stored encrypted.

    Example: opulon email configure --provider smtp --from keys@example.com --smtp-host smtp.example.com --smtp-user keys --password-env SMTP_PASSWORD --public-url https://api.example.com
    """
    secret = _secret_for(provider, (api_key_env, api_key_stdin), (password_env, password_stdin))
    if smtp_starttls is not None and provider.strip().lower() in HTTP_PROVIDERS:
        raise InvalidInput("--smtp-starttls is for --provider smtp")
    with opened_store(ctx) as store:
        settings = EmailSettingsStore(store).configure(
            provider=provider,
            sender=sender,
            secret=secret,
            base_url=base_url,
            public_url=public_url,
            smtp_host=smtp_host,
            smtp_port=smtp_port,
            smtp_starttls=True if smtp_starttls is None else smtp_starttls,
            smtp_user=smtp_user,
            timeout=timeout,
        )
    console.print(f"Email goes through {_where(settings)} from {escape(settings.sender)}.")
    if settings.public_url is None:
        console.print(
            "[yellow]Note:[/] no --public-url: keys cannot be sent until the emails can name "
            "the gateway."
        )
    console.print("Check it with: opulon email test --to YOUR-ADDRESS", markup=False)


def _where(settings: EmailSettings) -> str:
    if settings.provider == "smtp":
        tls = "STARTTLS" if settings.smtp_starttls else "no TLS"
        user = f", as {settings.smtp_user}" if settings.smtp_user else ""
        return f"the SMTP server {settings.smtp_host}:{settings.smtp_port} ({tls}{user})"
    return f"{settings.provider_name} ({settings.base_url})"


@app.command()
def show(ctx: typer.Context, json: Json = False) -> None:
    """Show the email settings (never the API key or password)."""
    with opened_store(ctx) as store:
        settings = EmailSettingsStore(store).get()
    if json:
        print_json(settings.to_json() if settings else None)
        return
    if settings is None:
        console.print(
            "Email is not configured. Set it up: opulon email configure --provider ...",
            markup=False,
        )
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in settings.to_json().items():
        shown = value if value is not None else "-"
        if isinstance(value, bool):
            shown = "yes" if value else "no"
        table.add_row(label.replace("_", " "), escape(str(shown)))
    console.print(table)


def _mailer(store: Store) -> tuple[EmailSettings, Mailer]:
    stored = EmailSettingsStore(store)
    settings = stored.require()
    return settings, mailer_for(settings, stored.secret())


@app.command()
def test(
    ctx: typer.Context,
    to: Annotated[
        str, typer.Option("--to", metavar="ADDRESS", help="Where to send the test email.")
    ],
) -> None:
    """Send a test email (it holds no key).

    Example: opulon email test --to admin@example.com
    """
    from opulon.web.emails import settings_test_mail

    address = validate_address(to, what="--to address")
    with opened_store(ctx) as store:
        settings, mailer = _mailer(store)
    mailer.send(settings_test_mail(address, settings))
    console.print(f"Sent a test email to {escape(address)} through {_where(settings)}.")


@app.command()
def remove(ctx: typer.Context, yes: Yes = False) -> None:
    """Remove the email settings and their stored API key or password."""
    with opened_store(ctx) as store:
        stored = EmailSettingsStore(store)
        settings = stored.require()
        confirm(
            f"Remove the email settings ({settings.provider_name}) and their stored secret?", yes
        )
        stored.remove()
    console.print("Removed the email settings; keys can no longer be sent by email.")


# -- key delivery, for opulon keys create/rotate --send and opulon keys send -----------------

Delivery = tuple[EmailSettings, Mailer]


class KeyNotSent(OpulonError):
    """A key's email failed; the message says what happened and how to send it later."""


def delivery_for(store: Store, email: str | None, *, no_email: str) -> Delivery:
    """Check, before a key changes, that it can be sent: one line saying what is missing."""
    from opulon.web.emails import public_url_of

    if not email:
        raise InvalidInput(no_email)
    settings, mailer = _mailer(store)
    public_url_of(settings)
    return settings, mailer


def send_key(delivery: Delivery, record: KeyRecord, full_key: str, *, done: str = "") -> str:
    """Email ``full_key`` to its owner and return the line that says so.

    When the mail fails, KeyNotSent says what was ``done`` (``created op-ul-...``) all the
    same, and how to send the key later.
    """
    from opulon.web.emails import key_mail

    settings, mailer = delivery
    try:
        mailer.send(key_mail(record, full_key, settings))
    except MailError as exc:
        lead = f"{done}, but the email failed" if done else f"did not send {record.prefix}"
        raise KeyNotSent(
            f"{lead}: {exc}; send it later with: opulon keys send {record.prefix}"
        ) from None
    return f"Sent {record.prefix} to {record.email} through {settings.provider_name}."
