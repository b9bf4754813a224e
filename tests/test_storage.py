from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from store_engines import MIGRATIONS_TABLE, IntegrityError, table_columns

from opulon.crypto import MasterKey
from opulon.errors import MasterKeyError
from opulon.settings import Settings
from opulon.storage import USAGE_COLUMNS, Store, migrations, open_store


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_migrations_build_the_schema_from_a_blank_database(store: Store) -> None:
    assert store.schema_version() == [m.name for m in migrations._migrations]
    assert store.unknown_migrations() == []
    tables = set(store.db.table_names())
    assert {"keys", "credentials", "limits", "providers", "usage", "meta"} <= tables


@pytest.mark.sqlite_only
def test_the_sqlite_file_is_in_wal_mode_with_foreign_keys(store: Store) -> None:
    assert migrations.pending(store.db) == []  # type: ignore[arg-type]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_postgresql_has_the_same_migrations_in_the_same_order() -> None:
    from opulon.store_postgres import migration_names

    assert migration_names() == [m.name for m in migrations._migrations]


def test_every_table_has_the_same_columns_on_both_engines(
    store: Store, isolated_home: Path
) -> None:
    sqlite = open_store(Settings(home=isolated_home / "other"))
    try:
        ours = set(store.db.table_names()) - {"_migrations", "_sqlite_migrations"}
        theirs = set(sqlite.db.table_names()) - {"_sqlite_migrations"}
        # PostgreSQL keeps the change counter in a table of its own, SQLite in ``meta``.
        assert ours - {"config_generation"} == theirs
        for table in theirs:
            assert table_columns(store, table) == table_columns(sqlite, table), table
    finally:
        sqlite.close()


def test_usage_table_holds_exactly_the_allowed_metadata(store: Store) -> None:
    # Privacy invariant 2: key id and prefix, timestamp, model, status, latency, tokens.
    # Adding a column here must be a deliberate act that changes this test.
    columns = table_columns(store, "usage")
    assert (
        columns
        == set(USAGE_COLUMNS)
        == {
            "key_id",
            "key_prefix",
            "ts",
            "model",
            "status",
            "latency_ms",
            "input_tokens",
            "output_tokens",
        }
    )


@pytest.mark.sqlite_only
def test_files_are_private(store: Store, settings: Settings) -> None:
    assert _mode(settings.db_path) == 0o600
    assert _mode(settings.master_key_path) == 0o600
    for suffix in ("-wal", "-shm"):
        extra = settings.db_path.with_name(settings.db_path.name + suffix)
        if extra.exists():
            assert _mode(extra) == 0o600
    assert _mode(settings.home) == 0o700


def test_reopening_runs_no_migration_twice(settings: Settings) -> None:
    open_store(settings).close()
    again = open_store(settings)
    names = again.schema_version()
    assert len(names) == len(set(names)) == len(migrations._migrations)
    again.close()


def test_wrong_master_key_is_refused(settings: Settings) -> None:
    env_key = MasterKey.generate_text()
    open_store(replace(settings, master_key_text=env_key)).close()
    wrong = replace(settings, master_key_text=MasterKey.generate_text())
    with pytest.raises(MasterKeyError, match="does not fit the database"):
        open_store(wrong)


def test_a_database_without_its_key_file_does_not_get_a_new_key(settings: Settings) -> None:
    open_store(settings).close()
    settings.master_key_path.unlink()
    with pytest.raises(MasterKeyError, match="no master key"):
        open_store(settings)
    assert not settings.master_key_path.exists()


def test_config_changes_bump_the_generation(store: Store) -> None:
    before = store.config_generation()
    store.db.execute(
        "INSERT INTO providers (name, kind, base_url, created_at) VALUES ('p', 'openai', 'x', 0)"
    )
    assert store.config_generation() > before


def test_stored_openai_base_urls_keep_reaching_the_same_urls_after_m005(
    settings: Settings,
) -> None:
    from opulon.providers import ProviderStore

    store = open_store(settings)
    # Rows as the schema before m005 held them: OpenAI base URLs without their /v1.
    for name, kind, url in (("o", "openai", "https://api.openai.com"),
                            ("g", "openai", "https://g.example/v1beta/openai"),
                            ("a", "anthropic", "https://api.anthropic.com")):  # fmt: skip
        store.db.execute(
            "INSERT INTO providers (name, kind, base_url, created_at) VALUES (?, ?, ?, 0)",
            [name, kind, url],
        )
    store.db.execute(
        f"DELETE FROM {MIGRATIONS_TABLE[store.engine]} "
        "WHERE name = 'm005_openai_base_url_is_the_api_root'"
    )
    store.close()
    store = open_store(settings)
    try:
        urls = {p.name: p.url_for("/v1/chat/completions") for p in ProviderStore(store).all()}
    finally:
        store.close()
    assert urls == {
        "o": "https://api.openai.com/v1/chat/completions",  # as before: base + /v1/...
        "g": "https://g.example/v1beta/openai/v1/chat/completions",
        "a": "https://api.anthropic.com/v1/chat/completions",
    }


def test_m006_holds_one_email_configuration_whose_changes_bump_the_generation(
    store: Store,
) -> None:
    columns = table_columns(store, "email_settings")
    assert columns == {
        "id",
        "provider",
        "sender",
        "base_url",
        "public_url",
        "smtp_host",
        "smtp_port",
        "smtp_starttls",
        "smtp_user",
        "timeout",
        "secret_ciphertext",
        "updated_at",
    }
    before = store.config_generation()
    insert = (
        "INSERT INTO email_settings (id, provider, sender, updated_at) VALUES (?, ?, 'a@b.c', 0)"
    )
    store.db.execute(insert, [1, "resend"])
    assert store.config_generation() > before
    with pytest.raises(IntegrityError):  # one row only
        store.db.execute(insert, [2, "resend"])
    store.db.execute("DELETE FROM email_settings")
    with pytest.raises(IntegrityError):  # a known provider only
        store.db.execute(insert, [1, "mailgun"])


def test_m007_keeps_sign_in_codes_and_sessions_as_keyed_hashes_times_and_counts(
    store: Store,
) -> None:
    def columns(table: str) -> set[str]:
        return table_columns(store, table)

    # No column for an address, a code or a token in clear: adding one must change this test.
    assert columns("sign_in_codes") == {
        "id",
        "address_hash",
        "code_hash",
        "created_at",
        "expires_at",
        "tries",
        "used_at",
    }
    assert columns("sign_in_sessions") == {"token_hash", "address_hash", "created_at", "expires_at"}
    names = [m.name for m in migrations._migrations]
    assert names.index("m007_sign_in") == names.index("m006_email_settings") + 1


def test_m008_holds_one_site_configuration_whose_changes_bump_the_generation(
    store: Store,
) -> None:
    columns = table_columns(store, "site_settings")
    assert columns == {
        "id",
        "name",
        "contact",
        "public_url",
        "policy_date",
        "gtm_id",
        "ga4_id",
        "meta_pixel_id",
        "updated_at",
    }
    # Nothing is configured in a new database: no analytics ID anywhere.
    assert store.db.execute("SELECT count(*) FROM site_settings").fetchone() == (0,)
    before = store.config_generation()
    insert = "INSERT INTO site_settings (id, name, updated_at) VALUES (?, 'Opulon API', 0)"
    store.db.execute(insert, [1])
    assert store.config_generation() > before
    with pytest.raises(IntegrityError):  # one row only
        store.db.execute(insert, [2])
    names = [m.name for m in migrations._migrations]
    assert names.index("m008_site_settings") == names.index("m007_sign_in") + 1


@pytest.mark.postgresql_only
def test_nodes_opening_a_blank_postgresql_at_once_migrate_it_once(settings: Settings) -> None:
    import threading

    open_store(replace(settings, database_url=None)).close()  # the shared master key file
    opened: list[Store] = []
    failed: list[BaseException] = []

    def node() -> None:
        try:
            opened.append(open_store(settings))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not failed and len(opened) == 4
        assert opened[0].schema_version() == [m.name for m in migrations._migrations]
        (checks,) = (
            opened[0].db.execute("SELECT count(*) FROM meta WHERE name = 'master_check'").fetchone()
        )
        assert checks == 1
    finally:
        for store in opened:
            store.close()


def test_a_database_url_is_shown_without_its_password() -> None:
    from opulon.database_url import redact

    assert redact("postgresql://opulon:s3cret@db:5432/opulon?sslmode=require") == (
        "postgresql://opulon@db:5432/opulon?sslmode=require"
    )
    assert redact("postgresql://db/opulon?user=o&password=s3cret") == (
        "postgresql://db/opulon?user=o&password=***"
    )
    assert redact("sqlite:///var/lib/opulon/opulon.db") == "sqlite:///var/lib/opulon/opulon.db"
