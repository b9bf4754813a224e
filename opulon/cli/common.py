"""What several commands share: opening the store from the global options."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

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
