"""Moving an installation from one database to another (``opulon db copy``), every row of it.

The target is opened as any store is (its migrations run, so it has the schema the source's
Opulon knows) and must hold no data yet. Every table is copied as it is, in one transaction of
the target: keys with their ids, credentials, limits, providers, the email and site settings,
sign-in codes and sessions, the usage rows and their rollups (copied, not recomputed: the
target's rollup trigger is off while they go in). The master key does not move: the target
is checked against the same one, and every node that uses the target needs it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import replace
from itertools import islice
from typing import Any

from opulon.database_url import check_database_url, redact
from opulon.errors import Conflict, InvalidInput
from opulon.settings import Settings
from opulon.storage import Connection, Store, immediate, open_store

__all__ = ["COPIED_TABLES", "copy_store", "row_counts", "table_columns"]

#: Every table that holds an installation's data, parents before children.
COPIED_TABLES = (
    "keys",
    "credentials",
    "limits",
    "providers",
    "email_settings",
    "site_settings",
    "sign_in_codes",
    "sign_in_sessions",
    "usage",
    "usage_hourly",
    "usage_daily",
)
# Not copied: meta (each store's own, its installation id included) and usage_journals (how
# far this store holds the rows of each gateway process's journal: a copy, being another
# installation, never writes those journals).
# Tables whose ids the database assigns: PostgreSQL's counters go on from the copied ids.
_IDENTITY_TABLES = ("keys", "credentials", "limits", "providers", "sign_in_codes")
_CHUNK = 2000


def table_columns(store: Store, table: str) -> list[str]:
    if store.engine == "sqlite":
        return [row[1] for row in store.db.execute(f"PRAGMA table_info({table})").fetchall()]
    return [
        name
        for (name,) in store.db.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
    ]


def row_counts(store: Store) -> dict[str, int]:
    """How many rows each copied table holds."""
    return {
        table: int(store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        for table in COPIED_TABLES
    }


def _rows(store: Store, table: str, columns: Sequence[str]) -> Iterator[Sequence[Any]]:
    sql = f"SELECT {', '.join(columns)} FROM {table}"
    if store.engine == "sqlite":
        yield from store.db.execute(sql)
    else:
        from opulon.store_postgres import PgConnection

        assert isinstance(store.db, PgConnection)
        yield from store.db.stream(sql)


def _copy_tables(source: Store, target: Connection) -> None:
    if isinstance(target, sqlite3.Connection):
        with immediate(target):
            for table in COPIED_TABLES:
                columns = table_columns(source, table)
                marks = ", ".join("?" for _ in columns)
                insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
                rows = _rows(source, table, columns)
                while chunk := list(islice(rows, _CHUNK)):
                    target.executemany(insert, chunk)
        return
    with target.atomic():
        # The rollups are copied as they are: rolling the copied rows up again would count
        # them twice.
        target.execute("ALTER TABLE usage DISABLE TRIGGER usage_rolls_up")
        for table in COPIED_TABLES:
            columns = table_columns(source, table)
            target.copy_rows(table, columns, _rows(source, table, columns))
        target.execute("ALTER TABLE usage ENABLE TRIGGER usage_rolls_up")
        for table in _IDENTITY_TABLES:
            target.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"coalesce(max(id), 0) + 1, false) FROM {table}"
            )


def copy_store(settings: Settings, source_url: str, target_url: str) -> dict[str, int]:
    """Copy every row of the installation at ``source_url`` into the empty database at
    ``target_url``; the rows copied per table.

    :class:`InvalidInput` for a bad URL or the same database twice, :class:`Conflict` when
    the target holds data already (nothing is written to it then).
    """
    source_url = check_database_url(source_url, option="--from")
    target_url = check_database_url(target_url, option="--to")
    if redact(source_url) == redact(target_url):
        raise InvalidInput(f"--from and --to both name {redact(source_url)}: give two databases")
    source = open_store(replace(settings, database_url=source_url), create=False)
    try:
        target = open_store(replace(settings, database_url=target_url))
        try:
            held = {table: count for table, count in row_counts(target).items() if count}
            if held:
                listed = ", ".join(f"{count} in {table}" for table, count in held.items())
                raise Conflict(
                    f"the target database {target.location} holds data already ({listed}): "
                    "copy into a new, empty database"
                )
            # A connection of its own: on SQLite, without the store's rollup trigger.
            conn = target.connect()
            try:
                _copy_tables(source, conn)
            finally:
                conn.close()
            copied = row_counts(target)
        finally:
            target.close()
        expected = row_counts(source)
    finally:
        source.close()
    if copied != expected:  # pragma: no cover - one transaction copies all or nothing
        raise Conflict(f"the copy holds {copied} rows where the source holds {expected}")
    return copied
