from __future__ import annotations

import time

import pytest

from opulon.errors import InvalidInput, NotFound
from opulon.keys import KeyRecord, KeyStore, Refusal, is_well_formed, mint
from opulon.limits import parse_budget, parse_limit
from opulon.settings import Settings
from opulon.storage import Store


def authenticate(store: Store, raw_key: str, now: float | None = None) -> KeyRecord | Refusal:
    """As the gateway does: a snapshot of the key ring, and the presented key's keyed hash."""
    ring = KeyStore(store).keyring()
    moment = time.time() if now is None else now
    return ring.authenticate(raw_key, store.master_key.lookup_hash(raw_key), moment)


def _insert_usage(store: Store, record: KeyRecord, count: int) -> None:
    for i in range(count):
        store.db.execute(
            "INSERT INTO usage VALUES (?, ?, ?, 'gpt-4o', 200, 12.5, 10, 20)",
            [record.id, record.prefix, time.time() - i],
        )


def test_minted_keys_follow_the_format() -> None:
    prefix, full = mint()
    assert prefix.startswith("op-ul-") and len(prefix) == 16
    assert prefix[6:].isalnum() and prefix[6:] == prefix[6:].lower()
    secret = full[16:]
    assert len(secret) >= 32 and secret.isalnum()
    assert is_well_formed(full)
    assert len({mint()[1] for _ in range(200)}) == 200


def test_a_created_key_authenticates(store: Store) -> None:
    keys = KeyStore(store)
    record, full = keys.create("alice", limits=[parse_limit("requests:60/1m")])
    found = authenticate(store, full)
    assert isinstance(found, KeyRecord)
    assert found.id == record.id
    assert found.limits == (parse_limit("requests:60/1m"),)


@pytest.mark.parametrize(
    ("presented", "reason"),
    [
        ("sk-not-ours", Refusal.MALFORMED),
        ("op-ul-short", Refusal.MALFORMED),
        ("", Refusal.MALFORMED),
    ],
)
def test_malformed_keys_are_refused(store: Store, presented: str, reason: Refusal) -> None:
    assert authenticate(store, presented) is reason


def test_unknown_and_tampered_keys_are_refused(store: Store) -> None:
    keys = KeyStore(store)
    _, full = keys.create("alice")
    _, other_full = mint()
    assert authenticate(store, other_full) is Refusal.UNKNOWN
    tampered = full[:-1] + ("a" if full[-1] != "a" else "b")
    assert authenticate(store, tampered) is Refusal.UNKNOWN


def test_disabled_and_expired_keys_are_refused(store: Store) -> None:
    keys = KeyStore(store)
    record, full = keys.create("alice", expires_at=time.time() + 60)
    keys.set_status(record.prefix, "disabled")
    assert authenticate(store, full) is Refusal.DISABLED
    keys.set_status(record.prefix, "active")
    assert isinstance(authenticate(store, full), KeyRecord)
    assert authenticate(store, full, now=time.time() + 61) is Refusal.EXPIRED


def test_rotation_gives_a_new_key_and_keeps_the_record(store: Store) -> None:
    keys = KeyStore(store)
    record, old_key = keys.create("alice", limits=[parse_limit("tokens:1M/5h")], concurrency=2)
    _insert_usage(store, record, 3)
    rotated, new_key = keys.rotate(record.prefix)
    assert new_key != old_key and rotated.prefix != record.prefix
    assert rotated.id == record.id
    assert rotated.limits == record.limits and rotated.concurrency == 2
    assert authenticate(store, old_key) is Refusal.ROTATED_OUT
    assert isinstance(authenticate(store, new_key), KeyRecord)
    assert (
        store.db.execute("SELECT count(*) FROM usage WHERE key_id = ?", [record.id]).fetchone()[0]
        == 3
    )
    assert keys.reveal(rotated.prefix) == new_key


def test_rotation_grace_keeps_the_old_key_until_it_ends(store: Store) -> None:
    keys = KeyStore(store)
    record, old_key = keys.create("alice")
    _, new_key = keys.rotate(record.prefix, grace_seconds=600)
    now = time.time()
    assert isinstance(authenticate(store, old_key, now=now + 599), KeyRecord)
    assert authenticate(store, old_key, now=now + 601) is Refusal.ROTATED_OUT
    assert isinstance(authenticate(store, new_key, now=now + 601), KeyRecord)


def test_delete_removes_the_key_and_its_usage(store: Store) -> None:
    keys = KeyStore(store)
    record, full = keys.create("alice", limits=[parse_budget("tokens:100M")])
    keep, _ = keys.create("bob")
    _insert_usage(store, record, 5)
    _insert_usage(store, keep, 2)
    keys.delete(record.prefix)
    assert authenticate(store, full) is Refusal.UNKNOWN
    assert (
        store.db.execute("SELECT count(*) FROM usage WHERE key_id = ?", [record.id]).fetchone()[0]
        == 0
    )
    assert (
        store.db.execute("SELECT count(*) FROM limits WHERE key_id = ?", [record.id]).fetchone()[0]
        == 0
    )
    assert store.db.execute("SELECT count(*) FROM usage").fetchone()[0] == 2
    with pytest.raises(NotFound):
        keys.get(record.prefix)


def test_update_changes_only_what_is_given(store: Store) -> None:
    keys = KeyStore(store)
    record, _ = keys.create("alice", email="a@example.com", models=["gpt-4o*"])
    updated = keys.update(record.prefix, limits=[parse_limit("requests:5/1s")], name="Alice")
    assert updated.name == "Alice" and updated.email == "a@example.com"
    assert updated.models == ("gpt-4o*",)
    assert updated.allows_model("gpt-4o-mini") and not updated.allows_model("claude-3")
    cleared = keys.update(record.prefix, email=None, models=["*"])
    assert cleared.email is None and cleared.allows_model("anything")


def test_bad_values_are_refused(store: Store) -> None:
    keys = KeyStore(store)
    with pytest.raises(InvalidInput, match="non-empty --name"):
        keys.create("  ")
    for email in ("not-an-email", "a,b@x.com", "A <a@x.com>", "a\x00@x.com", '"a"@x.com'):
        with pytest.raises(InvalidInput, match="invalid email"):
            keys.create("x", email=email)
    with pytest.raises(InvalidInput, match="duplicate limit"):
        keys.create("x", limits=[parse_limit("requests:1/1m"), parse_limit("requests:2/1m")])
    with pytest.raises(InvalidInput, match="invalid key prefix"):
        keys.get("nope")
    assert keys.all() == []


def test_the_database_never_holds_a_key_in_clear(store: Store, settings: Settings) -> None:
    keys = KeyStore(store)
    record, full = keys.create("alice")
    _, rotated = keys.rotate(record.prefix, grace_seconds=60)
    secret_parts = [full, full[16:], rotated, rotated[16:]]
    # Every value of every table, as the database answers it...
    for table in store.db.table_names():
        for row in store.db.execute(f"SELECT * FROM {table}").fetchall():
            for value in row:
                data = value if isinstance(value, bytes) else str(value).encode()
                for secret in secret_parts:
                    assert secret.encode() not in data, table
    if store.engine == "sqlite":  # ...and every byte of its files
        store.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        for path in settings.home.iterdir():
            data = path.read_bytes()
            for secret in secret_parts:
                assert secret.encode() not in data, path.name


@pytest.mark.parametrize(
    ("presented", "says"),
    [
        ("sk-proj-abc", "Opulon keys start with op-ul-"),
        ("op-ul-ABCDEFGHIJ" + "x" * 40, "10 lowercase letters or digits"),
        ("op-ul-abcdefghij" + "x" * 20 + " " + "x" * 19, "other than a letter or a digit"),
        ("op-ul-abcdefghij" + "x" * 30, "cut short (46 characters; a key has at least 48)"),
        ("op-ul-abcdefghij" + "x" * 200, "too long (216 characters; a key has at most 144)"),
    ],
)
def test_a_malformed_key_is_told_what_is_wrong_without_being_echoed(
    presented: str, says: str
) -> None:
    from opulon.keys import is_well_formed, malformed_reason

    assert not is_well_formed(presented)
    reason = malformed_reason(presented)
    assert says in reason and presented not in reason
    assert len(presented) < 26 or presented[16:26] not in reason
