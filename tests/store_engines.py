"""The two engines the store's tests run on: SQLite and a real PostgreSQL.

Each PostgreSQL test gets a schema of its own (``opulon_t_<random>``) in the test database,
named by the URL's ``search_path`` and dropped afterwards, with whatever connection the test
left open to it; nothing it did not create is touched.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, quote, urlsplit

import psycopg
from services import postgres_url

from opulon.storage import Store

ENGINES = ("sqlite", "postgresql")
#: What a constraint violation raises, on either engine.
IntegrityError = (sqlite3.IntegrityError, psycopg.IntegrityError)
MIGRATIONS_TABLE = {"sqlite": "_sqlite_migrations", "postgresql": "_migrations"}


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A database URL whose connections work in a new, empty schema of the test PostgreSQL."""
    base = postgres_url()
    name = f"opulon_t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
        try:
            options = quote(f"-csearch_path={name}", safe="")
            joiner = "&" if "?" in base else "?"
            yield f"{base}{joiner}options={options}&application_name={name}"
        finally:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                [name],
            )
            admin.execute(f"DROP SCHEMA {name} CASCADE")


def table_columns(store: Store, table: str) -> set[str]:
    """The column names of one of the store's tables."""
    if store.engine == "sqlite":
        rows = store.db.execute(f"PRAGMA table_info({table})").fetchall()
        return {row[1] for row in rows}
    rows = store.db.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ?",
        [table],
    ).fetchall()
    return {row[0] for row in rows}


def cut_connections(url: str) -> int:
    """End every server connection made with ``url`` (as a database restart would); how many."""
    name = parse_qs(urlsplit(url).query)["application_name"][0]
    with psycopg.connect(postgres_url(), autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            [name],
        ).fetchone()
    return int(ended[0]) if ended else 0
