"""``opulon db copy``: an installation moves from SQLite to PostgreSQL (and back) without
losing a row."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_error, run_json
from store_engines import postgres_schema

from opulon.email_settings import EmailSettingsStore
from opulon.keys import KeyRecord, KeyStore
from opulon.limits import parse_budget, parse_limit
from opulon.providers import ProviderStore
from opulon.reports import build_report, resolve_query
from opulon.settings import Settings
from opulon.sign_in import SignIn
from opulon.site_settings import SiteSettingsStore
from opulon.storage import Store, open_store
from opulon.store_copy import COPIED_TABLES, table_columns
from opulon.usage import UsageRow, UsageWriter


@pytest.fixture
def postgres() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


def _fill(store: Store) -> dict[str, str]:
    """Something in every table; the full keys by name."""
    keys = KeyStore(store)
    alice, alice_key = keys.create(
        "alice",
        email="alice@example.org",
        limits=[parse_limit("requests:60/1m"), parse_budget("tokens:1M")],
        concurrency=3,
        models=["gpt-4o*"],
        expires_at=time.time() + 86400,
    )
    bob, _ = keys.create("bob", limits=[parse_limit("tokens:10k/1h")])
    bob, bob_key = keys.rotate(bob.prefix, grace_seconds=3600)
    carol, carol_key = keys.create("carol")
    keys.set_status(carol.prefix, "disabled")
    ProviderStore(store).add(
        "openai", kind="openai", base_url="https://api.openai.com/v1", api_key="sk-up-1",
        models=("gpt-*",), allow=frozenset({"files"}),
    )  # fmt: skip
    EmailSettingsStore(store).configure(
        provider="resend", sender="keys@example.org", secret="re_123456789",
        public_url="https://gateway.example.org",
    )  # fmt: skip
    SiteSettingsStore(store).configure(name="Example API", contact="ops@example.org")
    sign_in = SignIn(store.connect(), store.master_key)
    try:
        code = sign_in.issue_code("alice@example.org")
        assert code is not None and sign_in.issue_code("alice@example.org") is not None
        sign_in.verify("alice@example.org", code)
    finally:
        sign_in.close()
    writer = UsageWriter(store)
    rng = random.Random(7)
    records: list[KeyRecord] = [alice, bob, carol]
    now = time.time()
    for _ in range(1500):
        record = rng.choice(records)
        writer.add(
            UsageRow(record.id, record.prefix, now - rng.uniform(0, 5 * 86400),
                     rng.choice(["gpt-4o", "gpt-4o-mini"]), rng.choice([200, 429, 500]),
                     rng.lognormvariate(5, 1), rng.randrange(4000), rng.randrange(900))
        )  # fmt: skip
    writer.close()
    return {"alice": alice_key, "bob": bob_key, "carol": carol_key}


def _value(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return bytes(value) if isinstance(value, memoryview) else value


def _contents(settings: Settings) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every row of every copied table, as a multiset of values in the SQLite column order."""
    store = open_store(settings, create=False)
    try:
        contents = {}
        for table in COPIED_TABLES:
            columns = table_columns(store, table)
            rows = store.db.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
            contents[table] = Counter(tuple(_value(v) for v in row) for row in rows)
        return contents
    finally:
        store.close()


def test_an_installation_moves_to_postgresql_and_back_without_losing_a_row(
    isolated_home: Path, tmp_path: Path, postgres: str
) -> None:
    source_url = f"sqlite:///{isolated_home / 'opulon.db'}"
    source = open_store(Settings(home=isolated_home))
    full_keys = _fill(source)
    source.close()
    before = _contents(Settings(home=isolated_home))
    assert all(before.values()), {t: len(rows) for t, rows in before.items() if not rows}

    copied = run_json("db", "copy", "--from", source_url, "--to", postgres)
    assert copied["rows"] == {table: sum(rows.values()) for table, rows in before.items()}
    assert "hunter" not in str(copied)
    target_settings = Settings(home=isolated_home, database_url=postgres)
    assert _contents(target_settings) == before

    # The copy serves as the original did: keys, secrets, reports, new ids.
    target = open_store(target_settings)
    try:
        keys = KeyStore(target)
        ring = keys.keyring()
        now = time.time()
        for name, state in (("alice", "alice"), ("bob", "bob"), ("carol", None)):
            result = ring.authenticate(
                full_keys[name], target.master_key.lookup_hash(full_keys[name]), now
            )
            assert (result.name if isinstance(result, KeyRecord) else None) == state
        assert keys.reveal(full_keys["alice"][:16]) == full_keys["alice"]
        assert ProviderStore(target).get("openai").api_key == "sk-up-1"
        assert EmailSettingsStore(target).secret() == "re_123456789"
        query = resolve_query(since="7d", now=now)
        source = open_store(Settings(home=isolated_home))
        try:
            original = build_report(source, query, now=now).to_json()
        finally:
            source.close()
        copy_report = build_report(target, query, now=now).to_json()
        newest = max(record.id for record in keys.all())
        assert keys.create("dave")[0].id > newest
    finally:
        target.close()
    assert copy_report["totals"] == original["totals"]
    assert copy_report["groups"] == original["groups"]

    # And back into a new SQLite file, every row again.
    back = tmp_path / "back" / "opulon.db"
    run_json("db", "copy", "--from", postgres, "--to", f"sqlite:///{back}")
    again = _contents(Settings(home=isolated_home, database_url=f"sqlite:///{back}"))
    assert again["keys"] - before["keys"]  # dave, created on PostgreSQL
    for table in COPIED_TABLES:
        if table not in ("keys", "credentials"):
            assert again[table] == before[table], table


def test_a_copy_into_a_database_that_holds_data_is_refused(
    isolated_home: Path, postgres: str
) -> None:
    source_url = f"sqlite:///{isolated_home / 'opulon.db'}"
    run_json("keys", "create", "--name", "alice")
    run_json("db", "copy", "--from", source_url, "--to", postgres)
    run_json("keys", "create", "--name", "bob")
    line = run_error("db", "copy", "--from", source_url, "--to", postgres, code=1)
    assert "holds data already (1 in keys, 1 in credentials)" in line
    target = open_store(Settings(home=isolated_home, database_url=postgres))
    try:
        assert [record.name for record in KeyStore(target).all()] == ["alice"]
    finally:
        target.close()


@pytest.mark.parametrize(
    ("source", "target", "says"),
    [
        ("opulon.db", "TARGET", "invalid --from: it is not a database URL"),
        ("sqlite://relative.db", "TARGET", "a SQLite URL names an absolute path"),
        ("SOURCE", "mysql://root:hunter2@db/opulon", "invalid --to mysql://root@db/opulon"),
        ("SOURCE", "SOURCE", "give two databases"),
        ("sqlite:///nowhere/opulon.db", "TARGET", "no database at /nowhere/opulon.db"),
        ("SOURCE", "postgresql://u:hunter2@127.0.0.1:9/x", "cannot connect to the database "
         "postgresql://u@127.0.0.1:9/x"),
    ],
)  # fmt: skip
def test_bad_urls_are_one_line_errors(
    isolated_home: Path, postgres: str, source: str, target: str, says: str
) -> None:
    run_json("keys", "list")
    names = {"SOURCE": f"sqlite:///{isolated_home / 'opulon.db'}", "TARGET": postgres}
    line = run_error(
        "db", "copy", "--from", names.get(source, source), "--to", names.get(target, target)
    )
    assert says in line
    assert "hunter2" not in line
