"""PostgreSQL as the store: a connection that takes the store's SQL as SQLite does, and the
same append-only migrations.

The modules write their SQL once, with SQLite's ``?`` placeholders; :class:`PgConnection`
hands it to psycopg with ``%s`` in their place, in autocommit outside :meth:`~PgConnection.atomic`
as the SQLite connection is. Sums of integer columns, which PostgreSQL answers as ``numeric``,
come back as Python ``int`` as they do from SQLite.

Every migration of :data:`opulon.storage.migrations` runs here under the same name, recorded
in ``_migrations`` (``migration_set``, ``name``, ``applied_at``, as sqlite-utils records them).
By default it is the SQLite migration itself: it runs against a recorder and its statements are
replayed with PostgreSQL's types (``INTEGER PRIMARY KEY`` → an identity, ``INTEGER`` →
``BIGINT``, ``REAL`` → ``DOUBLE PRECISION``, ``BLOB`` → ``BYTEA``), so a portable new migration
needs nothing here. What is not portable, the triggers, is written here in PL/pgSQL (a new
SQLite trigger without its counterpart stops the migration with :class:`NotPortable`):

* the configuration's change counter is one row of ``config_generation`` (SQLite keeps it in
  ``meta``, whose values have no fixed type), bumped by a statement-level trigger on every
  table the running gateways keep in memory;
* the rollups are kept by one statement-level trigger with a transition table: each batch the
  usage writer inserts (one ``COPY``) is rolled up in one grouped upsert per rollup table, so
  PostgreSQL keeps the trigger SQLite dropped in m003 for its cost per row.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import psycopg
from psycopg.adapt import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from opulon.database_url import redact
from opulon.errors import ConfigError

__all__ = [
    "NotPortable",
    "PgConnection",
    "Rows",
    "applied_migrations",
    "apply_migrations",
    "first_line",
    "is_initialised",
    "migration_names",
]

MIGRATION_SET = "opulon"
_MIGRATION_LOCK = 7_215_004_917  # pg_advisory_xact_lock key: nodes starting at once migrate in turn
# How long a connection may take to open, and a server that stops answering may hold a
# statement (TCP keepalives, and tcp_user_timeout for unacknowledged data), unless the URL
# says otherwise: the runtime polls the store from its event loop.
_CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "5000",
}
_RECONNECT_EVERY = 1.0  # seconds between attempts to open a lost connection again


class Rows(Protocol):
    """What a statement answers: rows to fetch or iterate over."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class _WholeNumberLoader(Loader):
    """``numeric`` as ``int`` when it is whole (sums of integer columns), else ``float``."""

    def load(self, data: Buffer) -> int | float:
        text = bytes(data).decode()
        return int(text) if text.lstrip("-").isdigit() else float(text)


@lru_cache(maxsize=2048)
def _placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def first_line(exc: BaseException) -> str:
    """The first line of a driver's message (its detail and hint lines follow)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _reason(exc: BaseException, url: str) -> str:
    """A driver's first line about ``url``, never holding its password."""
    line = first_line(exc)
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return line.replace(password, "***") if password else line


class PgConnection:
    """One connection to an Opulon PostgreSQL database (autocommit outside :meth:`atomic`).

    A connection lost meanwhile (the server restarted) is opened again at the next statement
    outside a transaction; the statement that found it lost fails as it would have.

    ``lazy_commit`` (the usage writer's): a commit returns before its WAL reaches the disk,
    as SQLite's ``synchronous=NORMAL`` in WAL mode does. A crash of the database server may
    lose the last fraction of a second of commits (a clean stop loses none), never corrupts.
    """

    engine = "postgresql"

    def __init__(self, url: str, *, read_only: bool = False, lazy_commit: bool = False) -> None:
        self.url = url
        self._read_only = read_only
        self._lazy_commit = lazy_commit
        self._lock = threading.RLock()
        self._failed_at = -_RECONNECT_EVERY
        self._depth = 0  # transactions open (atomic() inside atomic() is a savepoint)
        self._conn = self._open()

    def _open(self) -> psycopg.Connection[Any]:
        try:
            given = conninfo_to_dict(self.url)
        except psycopg.Error as exc:
            raise ConfigError(
                f"invalid database URL {redact(self.url)}: {_reason(exc, self.url)}"
            ) from None
        defaults = {
            name: value for name, value in _CONNECTION_DEFAULTS.items() if name not in given
        }
        try:
            conn = psycopg.connect(make_conninfo(self.url, **defaults), autocommit=True)
        except psycopg.Error as exc:
            self._failed_at = time.monotonic()
            raise ConfigError(
                f"cannot connect to the database {redact(self.url)}: {_reason(exc, self.url)}"
            ) from None
        conn.adapters.register_loader("numeric", _WholeNumberLoader)
        if self._read_only:
            conn.execute("SET default_transaction_read_only = on")
        if self._lazy_commit:
            conn.execute("SET synchronous_commit = off")
        return conn

    def _live(self) -> psycopg.Connection[Any]:
        conn = self._conn
        # Never inside a transaction: its statements must fail with it, not go on elsewhere.
        if (conn.closed or conn.broken) and not self._depth:
            # While the server cannot be reached, statements fail at once between attempts.
            if time.monotonic() - self._failed_at < _RECONNECT_EVERY:
                raise ConfigError(f"the database {redact(self.url)} cannot be reached")
            self._conn = conn = self._open()
        return conn

    def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Rows:
        """Run one statement; ``?`` marks each parameter, as in SQLite."""
        with self._lock:
            conn = self._live()
            if not parameters:
                return conn.execute(cast(Any, sql))
            return conn.execute(cast(Any, _placeholders(sql)), list(parameters))

    @contextmanager
    def atomic(self) -> Iterator[PgConnection]:
        """A transaction (a savepoint inside another), rolled back if the block raises."""
        with self._lock, self._live().transaction():
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1

    @contextmanager
    def immediate(self, lock: Sequence[str] = ()) -> Iterator[PgConnection]:
        """A transaction that first locks ``lock`` against other writers (SQLite's ``BEGIN
        IMMEDIATE``: one writer at a time, readers unhindered)."""
        with self.atomic():
            if lock:
                self.execute(f"LOCK TABLE {', '.join(lock)} IN SHARE ROW EXCLUSIVE MODE")
            yield self

    def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Append ``rows`` to ``table`` with one ``COPY`` (inside the caller's transaction)."""
        with self._lock, self._live().cursor() as cursor:
            statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
            with cursor.copy(cast(Any, statement)) as copy:
                for row in rows:
                    copy.write_row(row)

    def stream(self, sql: str, *, size: int = 2000) -> Iterator[tuple[Any, ...]]:
        """The rows of a query, fetched ``size`` at a time (a server-side cursor)."""
        with self.atomic(), self._conn.cursor(name="opulon_stream") as cursor:
            cursor.itersize = size
            cursor.execute(cast(Any, sql))
            yield from cursor

    def table_names(self) -> list[str]:
        """The tables of the schema the connection works in."""
        return [
            name
            for (name,) in self.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "ORDER BY tablename"
            )
        ]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# -- migrations ---------------------------------------------------------------------------


class _Recorder:
    """Stands in for a SQLite database while a migration runs: keeps what it executes."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> None:
        assert not parameters, "migrations run fixed statements"
        self.statements.append(" ".join(sql.split()))


def _create_table(statement: str) -> str:
    """A SQLite ``CREATE TABLE`` with PostgreSQL's types."""
    translated = re.sub(
        r"\bid INTEGER PRIMARY KEY\b(?! CHECK)",
        "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        statement,
    )
    translated = re.sub(r"\bINTEGER\b", "BIGINT", translated)
    translated = re.sub(r"\bREAL\b", "DOUBLE PRECISION", translated)
    translated = re.sub(r"\bBLOB\b", "BYTEA", translated)
    return translated.replace(" WITHOUT ROWID", "")


class NotPortable(Exception):
    """A SQLite migration holds a statement PostgreSQL needs written for it (a trigger)."""


def _replay(
    migration: Callable[[Any], None],
    conn: PgConnection,
    *,
    skip: tuple[str, ...] = (),
    own_triggers: bool = False,
) -> None:
    """Run the portable statements of a SQLite migration, skipping those ``skip`` starts;
    with ``own_triggers`` its triggers too (the PostgreSQL migration makes its own).

    A trigger the PostgreSQL migration does not say it replaces is :class:`NotPortable`: a
    new SQLite migration with one needs its PostgreSQL counterpart in :data:`_WRITTEN_HERE`.
    """
    recorder = _Recorder()
    migration(recorder)
    for statement in recorder.statements:
        if statement.startswith(skip):
            continue
        if statement.startswith(("CREATE TRIGGER", "DROP TRIGGER", "CREATE TEMP TRIGGER")):
            if own_triggers:
                continue
            raise NotPortable(f"{statement[:60]}...: write its PostgreSQL counterpart")
        if statement.startswith("CREATE TABLE"):
            statement = _create_table(statement)
        conn.execute(statement)


def _bumps_generation(conn: PgConnection, table: str) -> None:
    conn.execute(
        f"CREATE TRIGGER {table}_bumps_generation AFTER INSERT OR UPDATE OR DELETE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION opulon_bump_generation()"
    )


def _m001_initial(conn: PgConnection) -> None:
    from opulon import storage

    _replay(storage.m001_initial, conn, skip=("INSERT INTO meta",), own_triggers=True)
    conn.execute(
        "CREATE TABLE config_generation ("
        "id INTEGER PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL)"
    )
    conn.execute("INSERT INTO config_generation (id, value) VALUES (1, 0)")
    conn.execute(
        "CREATE FUNCTION opulon_bump_generation() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN UPDATE config_generation SET value = value + 1 WHERE id = 1; RETURN NULL; END $$"
    )
    for table in storage.CONFIG_TABLES:
        _bumps_generation(conn, table)


def _rollup_function() -> str:
    """The trigger function that rolls a statement's new rows up: one grouped upsert per
    rollup, its rows in key order, so that the writers of several nodes lock the rollup rows
    they share in the same order (never a deadlock)."""
    from opulon import storage

    buckets = len(storage.ROLLUP_LATENCY_COLUMNS)
    counts = ", ".join(f"count(*) FILTER (WHERE bucket = {i})" for i in range(buckets))
    bucket = storage._latency_bucket_sql("latency_ms")
    statements = []
    for table, period, seconds in storage.USAGE_ROLLUPS:
        start = f"floor(ts)::bigint - floor(ts)::bigint % {seconds}"
        statements.append(
            f"INSERT INTO {table} ({storage._rollup_columns(period)}) "
            f"SELECT {start}, key_id, key_prefix, model, status, count(*), sum(input_tokens), "
            f"sum(output_tokens), {counts} "
            f"FROM (SELECT *, {bucket} AS bucket FROM new_rows) AS inserted "
            f"GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 "
            f"{storage._rollup_conflict(period, table)};"
        )
    return (
        "CREATE FUNCTION opulon_usage_rolls_up() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN {' '.join(statements)} RETURN NULL; END $$"
    )


def _m002_usage_rollups(conn: PgConnection) -> None:
    from opulon import storage

    # The backfill from existing rows is SQLite's: a PostgreSQL store starts blank (or is
    # filled by opulon db copy, rollups included).
    _replay(storage.m002_usage_rollups, conn, skip=("INSERT INTO usage_",), own_triggers=True)
    conn.execute(_rollup_function())
    conn.execute(
        "CREATE TRIGGER usage_rolls_up AFTER INSERT ON usage REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION opulon_usage_rolls_up()"
    )


def _m003_usage_rollups_per_connection(conn: PgConnection) -> None:
    # SQLite's trigger rolled up row by row; PostgreSQL's rolls up a whole statement at once
    # and stays: the usage writer leaves the rollups to it.
    pass


def _m006_email_settings(conn: PgConnection) -> None:
    from opulon import storage

    _replay(storage.m006_email_settings, conn, own_triggers=True)
    _bumps_generation(conn, "email_settings")


def _m008_site_settings(conn: PgConnection) -> None:
    from opulon import storage

    _replay(storage.m008_site_settings, conn, own_triggers=True)
    _bumps_generation(conn, "site_settings")


# The migrations PostgreSQL needs written for it; every other one is its SQLite migration's
# own statements, replayed (see _replay).
_WRITTEN_HERE: dict[str, Callable[[PgConnection], None]] = {
    "m001_initial": _m001_initial,
    "m002_usage_rollups": _m002_usage_rollups,
    "m003_usage_rollups_per_connection": _m003_usage_rollups_per_connection,
    "m006_email_settings": _m006_email_settings,
    "m008_site_settings": _m008_site_settings,
}


def _migrations() -> list[tuple[str, Callable[[PgConnection], None]]]:
    """Every migration of :data:`opulon.storage.migrations`, in order, for PostgreSQL."""
    from opulon import storage

    def replayed(fn: Callable[[Any], None]) -> Callable[[PgConnection], None]:
        return lambda conn: _replay(fn, conn)

    return [
        (m.name, _WRITTEN_HERE.get(m.name) or replayed(m.fn))
        for m in storage.migrations._migrations
    ]


def migration_names() -> list[str]:
    return [name for name, _ in _migrations()]


def is_initialised(conn: PgConnection) -> bool:
    """Whether the database holds Opulon's tables (its migrations have run)."""
    (found,) = conn.execute("SELECT to_regclass('_migrations') IS NOT NULL").fetchone()
    return bool(found)


def applied_migrations(conn: PgConnection) -> list[str]:
    if not is_initialised(conn):
        return []
    return [
        name
        for (name,) in conn.execute(
            "SELECT name FROM _migrations WHERE migration_set = ? ORDER BY id", [MIGRATION_SET]
        )
    ]


def apply_migrations(conn: PgConnection) -> None:
    """Apply every pending migration, in one transaction (nodes starting together wait)."""
    with conn.atomic():
        conn.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations ("
            "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, migration_set TEXT NOT NULL, "
            "name TEXT NOT NULL, applied_at TEXT NOT NULL, UNIQUE (migration_set, name))"
        )
        applied = set(applied_migrations(conn))
        for name, migrate in _migrations():
            if name in applied:
                continue
            migrate(conn)
            conn.execute(
                "INSERT INTO _migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
                [MIGRATION_SET, name, str(datetime.datetime.now(datetime.UTC))],
            )
