"""``opulon keys ...``: create, inspect, change and delete API keys."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from opulon.cli.common import Yes, confirm, opened_store
from opulon.cli.console import console, escape, print_json
from opulon.errors import InvalidInput
from opulon.formatting import DATE, format_duration, grouped, iso, utc
from opulon.keys import KeyRecord, KeyStore
from opulon.limit_use import LimitState
from opulon.limits import (
    Limit,
    merge_limits,
    parse_budget,
    parse_expires,
    parse_limit,
    parse_limit_slot,
    parse_window,
)
from opulon.storage import Store
from opulon.usage import stored_limit_states

if TYPE_CHECKING:
    from opulon.cli.email import Delivery, KeyNotSent

app = typer.Typer(
    rich_markup_mode=None,  # plain help, as gh and sqlite-utils print it: --limit LIMIT
    help="Create, list, rotate and delete API keys.\n\nExample: opulon keys create --name alice --limit requests:60/1m",
    no_args_is_help=True,
)

Prefix = Annotated[str, typer.Argument(help="The key's display prefix, e.g. op-ul-e4st85dasf.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
LimitOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--limit",
        help="Rolling limit METRIC:AMOUNT/WINDOW, repeatable, e.g. requests:60/1m, tokens:1.5M/5h.",
        show_default=False,
    ),
]
ModelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--models",
        help="Allowed model globs, comma-separated or repeated, e.g. 'gpt-4o*,claude-*'. Default: all.",
        show_default=False,
    ),
]


def _models(values: list[str] | None) -> list[str]:
    return [part for value in values or [] for part in value.split(",")]


def _concurrency(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"invalid concurrency {text!r}: a whole number, e.g. 4") from None
    if value < 1:
        raise InvalidInput(f"invalid concurrency {text!r}: must be at least 1")
    return value


def _expires(text: str) -> float | None:
    if text.strip().lower() in ("never", "none"):
        return None
    return parse_expires(text).timestamp()


def _use_text(state: LimitState) -> str:
    label = str(state.limit) if not state.limit.is_budget else f"budget {state.limit}"
    text = f"{label}: {grouped(state.used)} used, {grouped(state.remaining)} left"
    if state.reset_seconds > 0:
        text += f", frees up in {format_duration(state.reset_seconds)}"
    return text


def _states(store: Store, record: KeyRecord) -> list[LimitState]:
    return stored_limit_states(store.db, record.id, record.limits)


def _limits_text(record: KeyRecord) -> str:
    parts = [str(limit) for limit in record.limits if not limit.is_budget]
    parts += [f"budget {limit}" for limit in record.limits if limit.is_budget]
    if record.concurrency:
        parts.append(f"concurrency {record.concurrency}")
    return ", ".join(parts) or "-"


def _status_style(status: str) -> str:
    return {"active": "green", "disabled": "yellow", "expired": "red"}.get(status, "")


def _print_new_key(record: KeyRecord, full_key: str, what: str) -> None:
    console.print(f"{what} key [bold]{record.prefix}[/] ({escape(record.name)}).")
    console.print("The full key is shown only this once; store it safely:\n")
    console.print(full_key, markup=False, soft_wrap=True)


SendOpt = Annotated[
    bool, typer.Option("--send", help="Email the key to its owner (see opulon email configure).")
]
NoShowOpt = Annotated[
    bool,
    typer.Option(
        "--no-show",
        help="With --send: do not print the full key, only email it (opulon keys send sends it "
        "again).",
    ),
]


def _delivery(
    store: Store, send: bool, no_show: bool, email: str | None, no_email: str
) -> Delivery | None:
    """The email delivery a --send asks for, checked before the key changes; None without it."""
    if no_show and not send:
        raise InvalidInput("--no-show needs --send: the key would be shown nowhere")
    if not send:
        return None
    from opulon.cli.email import delivery_for

    return delivery_for(store, email, no_email=no_email)


def _sent_or_failure(
    delivery: Delivery | None, record: KeyRecord, full_key: str, done: str
) -> tuple[str | None, KeyNotSent | None]:
    """Send the key if asked: (the line that says it was sent, None) or (None, the failure)."""
    if delivery is None:
        return None, None
    from opulon.cli.email import KeyNotSent, send_key

    try:
        return send_key(delivery, record, full_key, done=done), None
    except KeyNotSent as exc:
        return None, exc


def _report_new_key(
    record: KeyRecord,
    full_key: str,
    what: str,
    *,
    show: bool,
    sent: tuple[str | None, KeyNotSent | None],
    json: bool,
    extra: dict[str, Any] | None = None,
    after: str = "",
) -> None:
    """Print a new key (unless not to be shown), whether it was sent, and fail if that failed."""
    sent_line, failure = sent
    if json:
        data: dict[str, Any] = {"key": full_key} if show else {}
        data.update(record.to_json(), **(extra or {}))
        if sent_line is not None or failure is not None:
            data["sent"] = failure is None
        print_json(data)
    elif show:
        _print_new_key(record, full_key, what)
    else:
        console.print(
            f"{what} key [bold]{record.prefix}[/] ({escape(record.name)}); the full key is "
            "emailed to its owner, not shown."
        )
    if after and not json:
        console.print(after)
    if failure is not None:
        raise failure
    if sent_line and not json:
        console.print(escape(sent_line))


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for.")],
    email: Annotated[str | None, typer.Option("--email", help="Owner's email address.")] = None,
    limit: LimitOpt = None,
    budget: Annotated[
        str | None,
        typer.Option("--budget", help="Lifetime budget METRIC:AMOUNT, e.g. tokens:100M."),
    ] = None,
    concurrency: Annotated[
        str | None, typer.Option("--concurrency", help="Max simultaneous requests, e.g. 4.")
    ] = None,
    models: ModelsOpt = None,
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="Expiry: a duration (30d) or a date (2027-01-31)."),
    ] = None,
    send: SendOpt = False,
    no_show: NoShowOpt = False,
    json: Json = False,
) -> None:
    """Create a key and print it once; with --send, also email it to its owner.

    Example: opulon keys create --name alice --limit requests:60/1m --limit tokens:1M/1d
    Example: opulon keys create --name alice --email alice@example.com --send
    """
    limits: list[Limit] = [parse_limit(text) for text in limit or []]
    if budget is not None:
        limits.append(parse_budget(budget))
    with opened_store(ctx) as store:
        delivery = _delivery(
            store, send, no_show, email, "--send needs the owner's address: give --email ADDRESS"
        )
        record, full_key = KeyStore(store).create(
            name,
            email=email,
            limits=limits,
            concurrency=_concurrency(concurrency) if concurrency is not None else None,
            models=_models(models),
            expires_at=_expires(expires) if expires is not None else None,
        )
        sent = _sent_or_failure(delivery, record, full_key, f"created {record.prefix}")
    _report_new_key(record, full_key, "Created", show=not no_show, sent=sent, json=json)


@app.command("list")
def list_keys(ctx: typer.Context, json: Json = False) -> None:
    """List every key (never the secrets)."""
    with opened_store(ctx) as store:
        records = KeyStore(store).all()
        states = {record.id: _states(store, record) for record in records}
    if json:
        print_json(
            [
                {**record.to_json(), "usage": [s.to_json() for s in states[record.id]]}
                for record in records
            ]
        )
        return
    if not records:
        console.print("No keys yet. Create one: opulon keys create --name NAME")
        return
    now = time.time()
    table = Table(title=f"{len(records)} key{'s' if len(records) != 1 else ''}")
    table.add_column("prefix", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("expires", no_wrap=True)
    table.add_column("limits and use", overflow="fold")
    for record in records:
        state = record.state(now)
        table.add_row(
            record.prefix,
            escape(record.name),
            f"[{_status_style(state)}]{state}[/]",
            utc(record.created_at, DATE),
            utc(record.expires_at, DATE),
            _list_limits(record, states[record.id]),
        )
    console.print(table)


def _list_limits(record: KeyRecord, states: list[LimitState]) -> str:
    lines = [
        f"{'budget ' if s.limit.is_budget else ''}{s.limit}: {grouped(s.used)} used" for s in states
    ]
    if record.concurrency:
        lines.append(f"concurrency {record.concurrency}")
    return "\n".join(lines) or "-"


@app.command()
def show(ctx: typer.Context, prefix: Prefix, json: Json = False) -> None:
    """Show one key's settings and each limit's current use."""
    with opened_store(ctx) as store:
        record = KeyStore(store).get(prefix)
        states = _states(store, record)
    data = record.to_json()
    if json:
        print_json({**data, "usage": [s.to_json() for s in states]})
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    state = record.state(time.time())
    rows: list[tuple[str, Any]] = [
        ("prefix", record.prefix),
        ("name", escape(record.name)),
        ("email", escape(record.email or "-")),
        ("status", f"[{_status_style(state)}]{state}[/]"),
        ("created", utc(record.created_at)),
        ("expires", utc(record.expires_at)),
        ("models", escape(", ".join(data["models"]))),
        ("limits", _limits_text(record)),
        *(("use", _use_text(state)) for state in states),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    console.print(table)


@app.command()
def update(
    ctx: typer.Context,
    prefix: Prefix,
    name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
    email: Annotated[
        str | None, typer.Option("--email", help="New owner email; 'none' clears it.")
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            "--limit",
            metavar="LIMIT",
            help="Add a rolling limit METRIC:AMOUNT/WINDOW, or replace the one with the same "
            "metric and window; repeatable. The key's other limits stay.",
            show_default=False,
        ),
    ] = None,
    remove_limit: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-limit",
            metavar="METRIC/WINDOW",
            help="Remove the rolling limit on METRIC per WINDOW, e.g. requests/1m; repeatable.",
            show_default=False,
        ),
    ] = None,
    clear_limits: Annotated[
        bool, typer.Option("--clear-limits", help="Remove every rolling limit first.")
    ] = False,
    budget: Annotated[
        str | None, typer.Option("--budget", help="New lifetime budget; 'none' clears it.")
    ] = None,
    concurrency: Annotated[
        str | None, typer.Option("--concurrency", help="New max concurrency; 'none' clears it.")
    ] = None,
    models: ModelsOpt = None,
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="New expiry (30d, 2027-01-31); 'never' clears it."),
    ] = None,
) -> None:
    """Change a key's name, email, limits, models or expiry; what is not given stays.

    Example: opulon keys update op-ul-e4st85dasf --limit requests:120/1m --remove-limit tokens/1d
    """
    if remove_limit and clear_limits:
        raise InvalidInput("give either --remove-limit or --clear-limits, not both")
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if email is not None:
        changes["email"] = None if email.strip().lower() == "none" else email
    if concurrency is not None:
        changes["concurrency"] = _concurrency(concurrency)
    if models is not None:
        changes["models"] = _models(models)
    if expires is not None:
        changes["expires_at"] = _expires(expires)
    new_windows = [parse_limit(text) for text in limit or []]
    removed = [parse_limit_slot(text) for text in remove_limit or []]
    new_budget = None
    if budget is not None and budget.strip().lower() != "none":
        new_budget = parse_budget(budget)
    said: list[str] = []
    with opened_store(ctx) as store:
        keys = KeyStore(store)
        record = keys.get(prefix)
        if limit or removed or clear_limits or budget is not None:
            current = [] if clear_limits else list(record.limits)
            if clear_limits:
                said += [f"removed {lim}" for lim in record.limits if not lim.is_budget]
            windows, merged = merge_limits(current, new_windows, removed)
            said += merged
            kept_budget = [lim for lim in record.limits if lim.is_budget]
            if budget is not None:
                said += [f"removed budget {lim}" for lim in kept_budget if lim != new_budget]
                if new_budget is not None and new_budget not in kept_budget:
                    said.append(f"set budget {new_budget}")
                kept_budget = [new_budget] if new_budget else []
            changes["limits"] = [*windows, *kept_budget]
        if not changes:
            raise InvalidInput("nothing to update: give at least one option (see --help)")
        record = keys.update(record.prefix, **changes)
    for line in said:
        console.print(f"  {escape(line)}")
    console.print(f"Updated {record.prefix}: {_limits_text(record)}")


@app.command()
def rotate(
    ctx: typer.Context,
    prefix: Prefix,
    grace: Annotated[
        str | None,
        typer.Option(
            "--grace", help="Keep the old key working this long, e.g. 10m. Default: none."
        ),
    ] = None,
    send: SendOpt = False,
    no_show: NoShowOpt = False,
    json: Json = False,
) -> None:
    """Give a key a new secret and prefix; the record keeps its limits and usage history.

    With --send, the new key is emailed to its owner.
    """
    grace_seconds = parse_window(grace, context=f"--grace {grace!r}") if grace else 0
    with opened_store(ctx) as store:
        old = KeyStore(store).get(prefix)
        delivery = _delivery(
            store,
            send,
            no_show,
            old.email,
            f"{old.prefix} has no owner address to send to: set one with "
            f"opulon keys update {old.prefix} --email ADDRESS",
        )
        record, full_key = KeyStore(store).rotate(prefix, grace_seconds=grace_seconds)
        done = f"rotated {old.prefix} to {record.prefix}"
        sent = _sent_or_failure(delivery, record, full_key, done)
    previous = {
        "previous_prefix": old.prefix,
        "previous_valid_until": iso(time.time() + grace_seconds),
    }
    after = (
        f"\nThe old key keeps working for {grace}."
        if grace_seconds
        else "\nThe old key no longer works."
    )
    _report_new_key(
        record,
        full_key,
        f"Rotated {old.prefix} to",
        show=not no_show,
        sent=sent,
        json=json,
        extra=previous,
        after=after,
    )


@app.command()
def disable(ctx: typer.Context, prefix: Prefix) -> None:
    """Refuse a key until it is enabled again."""
    with opened_store(ctx) as store:
        record = KeyStore(store).set_status(prefix, "disabled")
    console.print(f"Disabled {record.prefix}.")


@app.command()
def enable(ctx: typer.Context, prefix: Prefix) -> None:
    """Accept a disabled key again."""
    with opened_store(ctx) as store:
        record = KeyStore(store).set_status(prefix, "active")
    console.print(f"Enabled {record.prefix}.")


@app.command()
def delete(ctx: typer.Context, prefix: Prefix, yes: Yes = False) -> None:
    """Delete a key and all its usage metadata."""
    with opened_store(ctx) as store:
        keys = KeyStore(store)
        record = keys.get(prefix)
        confirm(f"Delete {record.prefix} ({record.name}) and its usage history?", yes)
        keys.delete(record.prefix)
    console.print(f"Deleted {record.prefix} and its usage metadata.")


@app.command()
def reveal(ctx: typer.Context, prefix: Prefix, yes: Yes = False, json: Json = False) -> None:
    """Decrypt and print a key's full secret."""
    with opened_store(ctx) as store:
        keys = KeyStore(store)
        record = keys.get(prefix)
        confirm(f"Print the full key of {record.prefix} ({record.name})?", yes)
        full_key = keys.reveal(record.prefix)
    if json:
        print_json({"key": full_key, "prefix": record.prefix, "name": record.name})
    else:
        console.print(full_key, markup=False, soft_wrap=True)


@app.command("send")
def send_again(ctx: typer.Context, prefix: Prefix) -> None:
    """Email a key to its owner again (decrypted from its stored copy; not printed).

    Example: opulon keys send op-ul-e4st85dasf
    """
    from opulon.cli.email import delivery_for, send_key

    with opened_store(ctx) as store:
        keys = KeyStore(store)
        record = keys.get(prefix)
        delivery = delivery_for(
            store,
            record.email,
            no_email=f"{record.prefix} has no owner address to send to: set one with "
            f"opulon keys update {record.prefix} --email ADDRESS",
        )
        full_key = keys.reveal(record.prefix)
        line = send_key(delivery, record, full_key)
    console.print(escape(line))
