"""What several commands share: the store from the global options, and confirmations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from opulon.errors import InvalidInput
from opulon.settings import Settings
from opulon.storage import Store, open_store


def settings_of(ctx: typer.Context) -> Settings:
    root = ctx.find_root()
    if isinstance(root.obj, Settings):
        return root.obj
    return Settings.resolve()


@contextmanager
def opened_store(ctx: typer.Context) -> Iterator[Store]:
    store = open_store(settings_of(ctx))
    try:
        yield store
    finally:
        store.close()


Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def confirm(question: str, yes: bool) -> None:
    """Ask before an irreversible change; refuse (one line) without a yes."""
    if yes:
        return
    try:
        confirmed = typer.confirm(question, default=False)
    except typer.Abort:  # no answer at all, e.g. no terminal
        confirmed = False
    if not confirmed:
        raise InvalidInput("not confirmed; nothing changed (pass --yes to skip the question)")
