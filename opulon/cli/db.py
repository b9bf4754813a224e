"""``opulon db``: the store itself."""

from __future__ import annotations

from typing import Annotated

import typer

from opulon.cli.common import settings_of
from opulon.cli.console import console, print_json

app = typer.Typer(
    rich_markup_mode=None,  # plain help, as gh and sqlite-utils print it: --limit LIMIT
    help="The store: move an installation from one database to another.",
    no_args_is_help=True,
)


@app.command("copy")
def copy(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Option(
            "--from",
            metavar="URL",
            help="The installation to copy: sqlite:///PATH/opulon.db or postgresql://...",
        ),
    ],
    target: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="An empty database to copy it into: postgresql://USER@HOST/DBNAME or "
            "sqlite:///PATH.",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows copied as JSON.")] = False,
) -> None:
    """Copy every key, provider, setting, sign-in and usage row into an empty database.

    The source is only read (after any migration this Opulon has for it). The master key does
    not move: every node that uses the target needs the same one (the key file in the data
    dir, or OPULON_MASTER_KEY).

    Example: opulon db copy --from sqlite:///var/lib/opulon/opulon.db --to postgresql://opulon@db.internal/opulon
    """
    from opulon.database_url import redact
    from opulon.store_copy import copy_store

    settings = settings_of(ctx)
    copied = copy_store(settings, source, target)
    if as_json:
        print_json({"from": redact(source), "to": redact(target), "rows": copied})
        return
    console.print(f"Copied into {redact(target)}:", markup=False)
    for table, count in copied.items():
        console.print(f"  {table:<17} {count:>10,} rows", markup=False)
    where = "OPULON_MASTER_KEY" if settings.master_key_text else str(settings.master_key_path)
    console.print(
        f"Every node that uses it needs the same master key ({where}).",
        markup=False,
    )
