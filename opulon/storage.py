"""The store: opening it safely, and its append-only schema migrations.

The store is the SQLite file in the data dir (the default), or a PostgreSQL database that
several gateway nodes share (``--database postgresql://...``, see
:mod:`opulon.store_postgres`, which applies the same migrations under the same names). Both
take the same SQL, with ``?`` placeholders. Every table that holds secrets holds them
encrypted (see :mod:`opulon.crypto`); the master key stays in the data dir or the environment,
never in the database. The ``usage`` table holds exactly the metadata the privacy policy
names, and nothing else.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from sqlite_utils import Database, Migrations

from opulon.crypto import MasterKey, load_master_key
from opulon.database_url import check_database_url, redact
from opulon.errors import ConfigError, MasterKeyError
from opulon.settings import MASTER_KEY_ENV, Settings

if TYPE_CHECKING:
    from opulon.store_postgres import PgConnection

#: The store's own connection: sqlite-utils' database, or a PostgreSQL connection.
SqlDatabase: TypeAlias = "Database | PgConnection"
#: Another connection to the store, for a writer or reader of its own (see Store.connect).
Connection: TypeAlias = "sqlite3.Connection | PgConnection"

migrations = Migrations("opulon")

# The columns of one usage row: privacy invariant 2, plus the internal key id.
USAGE_COLUMNS = (
    "key_id",
    "key_prefix",
    "ts",
    "model",
    "status",
    "latency_ms",
    "input_tokens",
    "output_tokens",
)

CONFIG_TABLES = ("keys", "credentials", "limits", "providers")


@migrations()
def m001_initial(db: Database) -> None:
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB)")
    db.execute(
        """
        CREATE TABLE keys (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            email TEXT,
            created_at REAL NOT NULL,
            expires_at REAL,
            status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
            models TEXT NOT NULL DEFAULT '[]',
            concurrency INTEGER
        )
        """
    )
    # One row per key secret ever issued. The current one has valid_until NULL; a rotated-out
    # one keeps its prefix and hash so it is recognised (and refused, after any grace period).
    db.execute(
        """
        CREATE TABLE credentials (
            id INTEGER PRIMARY KEY,
            key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
            prefix TEXT NOT NULL UNIQUE,
            lookup_hash BLOB NOT NULL,
            ciphertext BLOB,
            created_at REAL NOT NULL,
            valid_until REAL
        )
        """
    )
    db.execute("CREATE INDEX credentials_key ON credentials(key_id)")
    db.execute(
        """
        CREATE TABLE limits (
            id INTEGER PRIMARY KEY,
            key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
            metric TEXT NOT NULL,
            amount INTEGER NOT NULL CHECK (amount > 0),
            window_seconds INTEGER
        )
        """
    )
    db.execute("CREATE INDEX limits_key ON limits(key_id)")
    db.execute(
        """
        CREATE TABLE providers (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL CHECK (kind IN ('openai', 'anthropic')),
            base_url TEXT NOT NULL,
            api_key_ciphertext BLOB,
            models TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE usage (
            key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
            key_prefix TEXT NOT NULL,
            ts REAL NOT NULL,
            model TEXT NOT NULL,
            status INTEGER NOT NULL,
            latency_ms REAL NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX usage_key_ts ON usage(key_id, ts)")
    db.execute("CREATE INDEX usage_ts ON usage(ts)")
    # A running server polls this counter to pick up changes made by the CLI.
    db.execute("INSERT INTO meta (name, value) VALUES ('config_generation', 0)")
    for table in CONFIG_TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            db.execute(
                f"""
                CREATE TRIGGER {table}_{event.lower()}_bumps_generation AFTER {event} ON {table}
                BEGIN
                    UPDATE meta SET value = value + 1 WHERE name = 'config_generation';
                END
                """
            )


# Upper bounds (ms) of the latency histogram kept in the rollups: 1, 1.5, 2, 3, 4, 5 and 7 per
# decade from 1 ms to 1000 s. Bucket 0 holds latencies below 1 ms, bucket ``i`` those in
# ``[bounds[i - 1], bounds[i])``, the last one everything from 1000 s up. Part of the schema:
# other bounds need a new migration.
ROLLUP_LATENCY_BOUNDS_MS: tuple[float, ...] = (
    *(m * 10**e for e in range(6) for m in (1, 1.5, 2, 3, 4, 5, 7)),
    1_000_000,
)
ROLLUP_LATENCY_COLUMNS = tuple(f"lat{i:02d}" for i in range(len(ROLLUP_LATENCY_BOUNDS_MS) + 1))
# (table, period column, period length in seconds) of each rollup of ``usage``.
USAGE_ROLLUPS = (("usage_hourly", "hour_ts", 3600), ("usage_daily", "day_ts", 86400))


def _latency_bucket_sql(expr: str, low: int = 0, high: int = len(ROLLUP_LATENCY_BOUNDS_MS)) -> str:
    """A nested CASE giving the histogram bucket of ``expr``: a binary search, a few tests deep."""
    if low == high:
        return str(low)
    middle = (low + high + 1) // 2
    bound = ROLLUP_LATENCY_BOUNDS_MS[middle - 1]
    below = _latency_bucket_sql(expr, low, middle - 1)
    above = _latency_bucket_sql(expr, middle, high)
    return f"CASE WHEN {expr} < {bound!r} THEN {below} ELSE {above} END"


@migrations()
def m002_usage_rollups(db: Database) -> None:
    # Hourly and daily rollups of ``usage``, for reports over long spans (UTC hours and days).
    # They aggregate the same metadata and nothing more, and go with their key (ON DELETE
    # CASCADE). One trigger keeps both in step with every row inserted; usage rows are only
    # ever deleted with their key.
    names = ", ".join(ROLLUP_LATENCY_COLUMNS)
    histogram = ",\n".join(f"{column} INTEGER NOT NULL" for column in ROLLUP_LATENCY_COLUMNS)
    bucket_sums = ", ".join(f"sum(bucket = {i})" for i in range(len(ROLLUP_LATENCY_COLUMNS)))
    for table, period, seconds in USAGE_ROLLUPS:
        db.execute(
            f"""
            CREATE TABLE {table} (
                {period} INTEGER NOT NULL,
                key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
                key_prefix TEXT NOT NULL,
                model TEXT NOT NULL,
                status INTEGER NOT NULL,
                requests INTEGER NOT NULL,
                input_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                {histogram},
                PRIMARY KEY ({period}, key_id, model, status, key_prefix)
            ) WITHOUT ROWID
            """
        )
        db.execute(f"CREATE INDEX {table}_key ON {table}(key_id, {period})")
        start = "CAST({ts} AS INTEGER) - CAST({ts} AS INTEGER) % " + str(seconds)
        columns = (
            f"{period}, key_id, key_prefix, model, status, requests, input_tokens, "
            f"output_tokens, {names}"
        )
        db.execute(
            f"""
            INSERT INTO {table} ({columns})
            SELECT {start.format(ts="ts")}, key_id, key_prefix, model, status, count(*),
                   sum(input_tokens), sum(output_tokens), {bucket_sums}
            FROM (SELECT *, {_latency_bucket_sql("latency_ms")} AS bucket FROM usage)
            GROUP BY 1, 2, 3, 4, 5
            """
        )
    db.execute(f"CREATE TRIGGER usage_rolls_up AFTER INSERT ON usage BEGIN {_rollup_upserts()} END")


def _rollup_columns(period: str) -> str:
    names = ", ".join(ROLLUP_LATENCY_COLUMNS)
    return (
        f"{period}, key_id, key_prefix, model, status, requests, input_tokens, "
        f"output_tokens, {names}"
    )


def _rollup_conflict(period: str, table: str) -> str:
    # The stored row's columns are named with their table: PostgreSQL finds a bare name
    # ambiguous beside ``excluded``'s.
    sums = ("requests", "input_tokens", "output_tokens", *ROLLUP_LATENCY_COLUMNS)
    updates = ", ".join(f"{column} = {table}.{column} + excluded.{column}" for column in sums)
    return f"ON CONFLICT ({period}, key_id, model, status, key_prefix) DO UPDATE SET {updates}"


def _rollup_upserts() -> str:
    """Statements that roll one inserted ``usage`` row (``NEW``) up into both rollups."""
    bucket_flags = ", ".join(f"bucket = {i}" for i in range(len(ROLLUP_LATENCY_COLUMNS)))
    statements = []
    for table, period, seconds in USAGE_ROLLUPS:
        start = f"CAST(NEW.ts AS INTEGER) - CAST(NEW.ts AS INTEGER) % {seconds}"
        statements.append(
            f"INSERT INTO {table} ({_rollup_columns(period)}) "
            f"SELECT {start}, NEW.key_id, NEW.key_prefix, NEW.model, NEW.status, 1, "
            f"NEW.input_tokens, NEW.output_tokens, {bucket_flags} "
            f"FROM (SELECT {_latency_bucket_sql('NEW.latency_ms')} AS bucket) WHERE true "
            f"{_rollup_conflict(period, table)};"
        )
    return " ".join(statements)


def rollup_upsert_sql(table: str, period: str, groups: int = 1) -> str:
    """An upsert adding ``groups`` pre-aggregated rows (one parameter per column) into a rollup."""
    count = 8 + len(ROLLUP_LATENCY_COLUMNS)
    row = "(" + ", ".join("?" for _ in range(count)) + ")"
    values = ", ".join(row for _ in range(groups))
    return (
        f"INSERT INTO {table} ({_rollup_columns(period)}) VALUES {values} "
        f"{_rollup_conflict(period, table)}"
    )


@migrations()
def m003_usage_rollups_per_connection(db: Database) -> None:
    # Rolling up row by row in a trigger doubled the cost of the gateway's metadata writes.
    # The gateway's writer now adds each batch to the rollups itself (usage.UsageWriter);
    # every other connection opened by open_store() gets the same trigger as a TEMP trigger.
    db.execute("DROP TRIGGER usage_rolls_up")


@migrations()
def m004_provider_allowed_families(db: Database) -> None:
    # Stateful provider APIs (files, batches, stored responses, ...) a provider is allowed to
    # serve: a JSON list of family names, none by default.
    db.execute("ALTER TABLE providers ADD COLUMN allow TEXT NOT NULL DEFAULT '[]'")


@migrations()
def m005_openai_base_url_is_the_api_root(db: Database) -> None:
    # An OpenAI-kind base URL used to be stored without its /v1 and joined with the request
    # path; it is now the API root the operator gave. Adding /v1 keeps every stored provider
    # reaching exactly the URLs it reached before.
    db.execute("UPDATE providers SET base_url = base_url || '/v1' WHERE kind = 'openai'")


@migrations()
def m006_email_settings(db: Database) -> None:
    # The one email configuration (opulon.email_settings): at most one row. The provider's
    # API key or SMTP password is kept only as AES-GCM ciphertext under the master key.
    db.execute(
        """
        CREATE TABLE email_settings (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            provider TEXT NOT NULL CHECK (provider IN ('resend', 'sendgrid', 'smtp')),
            sender TEXT NOT NULL,
            base_url TEXT,
            public_url TEXT,
            smtp_host TEXT,
            smtp_port INTEGER,
            smtp_starttls INTEGER NOT NULL DEFAULT 1,
            smtp_user TEXT,
            timeout REAL NOT NULL DEFAULT 10,
            secret_ciphertext BLOB,
            updated_at REAL NOT NULL
        )
        """
    )
    # A running server sees a change within its reload interval, as with keys and providers.
    for event in ("INSERT", "UPDATE", "DELETE"):
        db.execute(
            f"""
            CREATE TRIGGER email_settings_{event.lower()}_bumps_generation
            AFTER {event} ON email_settings
            BEGIN
                UPDATE meta SET value = value + 1 WHERE name = 'config_generation';
            END
            """
        )


@migrations()
def m007_sign_in(db: Database) -> None:
    # One-time sign-in codes and the sessions they open on /key-status (opulon.sign_in). Only
    # keyed hashes of the address, the code and the session token, with times and counts.
    db.execute(
        """
        CREATE TABLE sign_in_codes (
            id INTEGER PRIMARY KEY,
            address_hash BLOB NOT NULL,
            code_hash BLOB NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            tries INTEGER NOT NULL DEFAULT 0,
            used_at REAL
        )
        """
    )
    db.execute("CREATE INDEX sign_in_codes_address ON sign_in_codes(address_hash, created_at)")
    db.execute(
        """
        CREATE TABLE sign_in_sessions (
            token_hash BLOB PRIMARY KEY,
            address_hash BLOB NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID
        """
    )


@migrations()
def m008_site_settings(db: Database) -> None:
    # The public website's settings (opulon.site_settings): at most one row, every column
    # optional. No analytics ID is set until the operator gives one.
    db.execute(
        """
        CREATE TABLE site_settings (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            name TEXT,
            contact TEXT,
            public_url TEXT,
            policy_date TEXT,
            gtm_id TEXT,
            ga4_id TEXT,
            meta_pixel_id TEXT,
            updated_at REAL NOT NULL
        )
        """
    )
    for event in ("INSERT", "UPDATE", "DELETE"):
        db.execute(
            f"""
            CREATE TRIGGER site_settings_{event.lower()}_bumps_generation
            AFTER {event} ON site_settings
            BEGIN
                UPDATE meta SET value = value + 1 WHERE name = 'config_generation';
            END
            """
        )


@migrations()
def m009_usage_journals(db: Database) -> None:
    # How far into each gateway process's usage journal (opulon.usage_journal) the usage
    # table holds the rows, written in the same transaction as the rows.
    db.execute(
        """
        CREATE TABLE usage_journals (
            journal TEXT PRIMARY KEY,
            seq INTEGER NOT NULL
        )
        """
    )


def install_rollup_trigger(conn: sqlite3.Connection) -> None:
    """Roll up rows inserted through ``conn`` one by one (for every writer but the gateway's)."""
    conn.execute(
        "CREATE TEMP TRIGGER IF NOT EXISTS usage_rolls_up AFTER INSERT ON main.usage "
        f"BEGIN {_rollup_upserts()} END"
    )


@contextmanager
def _private_umask() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def connect(
    path: Path | str,
    *,
    timeout: float = 30,
    foreign_keys: bool = True,
    read_only: bool = False,
) -> sqlite3.Connection:
    """A connection to an Opulon database, set up as every part of Opulon uses one.

    WAL (readers never wait for the writer), ``synchronous=NORMAL``, autocommit (each
    caller opens its own transactions), usable from any thread. ``foreign_keys`` off only
    for the usage writer, which checks a batch's keys itself; ``read_only`` for readers.
    """
    conn = sqlite3.connect(
        str(path), timeout=timeout, check_same_thread=False, isolation_level=None
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    if read_only:
        conn.execute("PRAGMA query_only=ON")
    return conn


def is_sqlite(conn: Connection | SqlDatabase) -> bool:
    """Whether ``conn`` is a SQLite connection (else a PostgreSQL one)."""
    return isinstance(conn, sqlite3.Connection | Database)


@contextmanager
def immediate(conn: Connection, lock: tuple[str, ...] = ()) -> Iterator[Connection]:
    """A write transaction that holds the write lock from its start: SQLite's ``BEGIN
    IMMEDIATE``; on PostgreSQL a transaction that first locks the tables ``lock`` names."""
    if isinstance(conn, sqlite3.Connection):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    else:
        with conn.immediate(lock):
            yield conn


@dataclass(slots=True)
class Store:
    """An open Opulon database and the master key that fits it."""

    db: SqlDatabase
    master_key: MasterKey
    settings: Settings

    @property
    def engine(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "sqlite" if isinstance(self.db, Database) else "postgresql"

    @property
    def location(self) -> str:
        """Where the data is, for people: the SQLite file, or the URL without its password."""
        if isinstance(self.db, Database):
            return str(self.settings.db_path)
        return redact(self.db.url)

    def config_generation(self) -> int:
        """The change counter every change to keys, providers and settings bumps."""
        if isinstance(self.db, Database):
            sql = "SELECT value FROM meta WHERE name = 'config_generation'"
        else:
            sql = "SELECT value FROM config_generation WHERE id = 1"
        row = self.db.execute(sql).fetchone()
        return int(row[0])

    def connect(
        self, *, foreign_keys: bool = True, read_only: bool = False, lazy_commit: bool = False
    ) -> Connection:
        """Another connection to the same database, for a writer or reader of its own.

        ``foreign_keys`` off (SQLite) and ``lazy_commit`` on (PostgreSQL: commits do not wait
        for the disk, as SQLite's WAL mode does not) are for the usage writer.
        """
        if isinstance(self.db, Database):
            return connect(self.settings.db_path, foreign_keys=foreign_keys, read_only=read_only)
        from opulon.store_postgres import PgConnection

        return PgConnection(self.db.url, read_only=read_only, lazy_commit=lazy_commit)

    def schema_version(self) -> list[str]:
        if not isinstance(self.db, Database):
            from opulon.store_postgres import applied_migrations

            return applied_migrations(self.db)
        return [m.name for m in migrations.applied(self.db)]

    def unknown_migrations(self) -> list[str]:
        """Migrations applied by a newer Opulon than this one."""
        known = {m.name for m in migrations._migrations}
        return [name for name in self.schema_version() if name not in known]

    def close(self) -> None:
        self.db.close()


def open_store(settings: Settings, *, create: bool = True) -> Store:
    """Open (and with ``create``, initialise) the database ``settings`` names: the SQLite file
    in ``settings.home`` by default, else ``settings.database_url``.

    The data dir is created mode 0700, a SQLite database and its WAL files mode 0600. A
    master key that does not fit an existing database is refused with :class:`MasterKeyError`.
    """
    if settings.database_url is not None:
        check_database_url(settings.database_url)
    if settings.is_postgresql:
        return _open_postgresql(settings, create=create)
    path = settings.db_path
    exists = path.exists()
    if not exists and not create:
        raise ConfigError(
            f"no database at {path}: run a command that creates it, e.g. opulon keys list"
        )
    _make_home(settings)
    # A database that exists was made with some master key; never mint a new one for it.
    master_key = load_master_key(settings, create=not exists)
    try:
        with _private_umask():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not exists:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
            conn = connect(str(path))
            db = Database(conn)
            migrations.apply(db)
            install_rollup_trigger(conn)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot open the database {path}: {exc}") from None
    stored = db.execute("SELECT value FROM meta WHERE name = 'master_check'").fetchone()
    if stored is None:
        db.execute(
            "INSERT INTO meta (name, value) VALUES ('master_check', ?)", [master_key.check_value()]
        )
    elif not master_key.fits(stored[0]):
        db.close()
        raise _misfit(settings, str(path))
    return Store(db=db, master_key=master_key, settings=settings)


def _make_home(settings: Settings) -> None:
    try:
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create the data dir {settings.home}: {exc.strerror}") from None


def _misfit(settings: Settings, where: str) -> MasterKeyError:
    source = MASTER_KEY_ENV if settings.master_key_text else str(settings.master_key_path)
    return MasterKeyError(
        f"the master key from {source} does not fit the database {where}: "
        "it was created with a different key"
    )


def _open_postgresql(settings: Settings, *, create: bool) -> Store:
    from opulon.store_postgres import PgConnection, apply_migrations, is_initialised

    url = settings.database_url
    assert url is not None
    conn = PgConnection(url)
    try:
        initialised = is_initialised(conn)
        if not create and not initialised:
            raise ConfigError(
                f"the database {redact(url)} holds no Opulon tables: run a command that "
                "creates them, e.g. opulon keys list"
            )
        if initialised:
            # Another installation's database is refused before any migration touches it.
            found = conn.execute("SELECT value FROM meta WHERE name = 'master_check'").fetchone()
            if found is not None:
                _make_home(settings)
                if not load_master_key(settings, create=False).fits(bytes(found[0])):
                    raise _misfit(settings, redact(url))
        apply_migrations(conn)
        stored = conn.execute("SELECT value FROM meta WHERE name = 'master_check'").fetchone()
        _make_home(settings)
        # The master key never goes into the database: each node has it in its data dir or
        # environment. Only a database that no key fits yet may have one minted for it.
        master_key = load_master_key(settings, create=stored is None)
        if stored is None:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('master_check', ?) "
                "ON CONFLICT (name) DO NOTHING",
                [master_key.check_value()],
            )
            stored = conn.execute("SELECT value FROM meta WHERE name = 'master_check'").fetchone()
        if not master_key.fits(bytes(stored[0])):
            raise _misfit(settings, redact(url))
    except BaseException:
        conn.close()
        raise
    return Store(db=conn, master_key=master_key, settings=settings)
