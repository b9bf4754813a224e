"""Sign-in codes and sessions (opulon.sign_in) on a real database, with a clock of the test's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from opulon.sign_in import (
    CODE_LIFETIME,
    CODE_WINDOW,
    SESSION_LIFETIME,
    CodeRefusal,
    Session,
    SignIn,
    normalize_address,
    normalize_code,
)
from opulon.storage import Store

ADDRESS = "ada@example.org"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sign_in(store: Store, clock: Clock) -> Iterator[SignIn]:
    opened = SignIn(store.connect(), store.master_key, clock=clock)
    yield opened
    opened.close()


def _code(sign_in: SignIn, address: str = ADDRESS) -> str:
    code = sign_in.issue_code(address)
    assert code is not None
    return code


def _wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def test_a_code_signs_in_once(sign_in: SignIn) -> None:
    code = _code(sign_in)
    assert len(code) == 6 and code.isdigit()
    session = sign_in.verify(ADDRESS, code)
    assert isinstance(session, Session)
    assert sign_in.session_address(session.token) == sign_in.hasher.address(ADDRESS)
    assert sign_in.verify(ADDRESS, code) is CodeRefusal.NO_CODE  # single use


def test_a_code_is_for_its_address_only(sign_in: SignIn) -> None:
    code = _code(sign_in)
    assert sign_in.verify("eve@example.org", code) is CodeRefusal.NO_CODE
    assert isinstance(sign_in.verify(ADDRESS, code), Session)


def test_a_code_expires_after_ten_minutes(sign_in: SignIn, clock: Clock) -> None:
    code = _code(sign_in)
    clock.now += CODE_LIFETIME - 1
    other = _code(sign_in)
    clock.now += 1
    assert sign_in.verify(ADDRESS, code) is CodeRefusal.WRONG  # gone; the newer one waits
    clock.now += CODE_LIFETIME
    assert sign_in.verify(ADDRESS, other) is CodeRefusal.NO_CODE


def test_five_wrong_tries_lock_the_code(sign_in: SignIn) -> None:
    code = _code(sign_in)
    answers = [sign_in.verify(ADDRESS, _wrong(code)) for _ in range(5)]
    assert answers == [CodeRefusal.WRONG] * 4 + [CodeRefusal.LOCKED]
    assert sign_in.verify(ADDRESS, code) is CodeRefusal.LOCKED  # the right one, too late
    # A new code works again, and the locked one stays locked.
    fresh = _code(sign_in)
    assert sign_in.verify(ADDRESS, code) is CodeRefusal.WRONG
    assert isinstance(sign_in.verify(ADDRESS, fresh), Session)


def test_wrong_tries_count_against_every_waiting_code(sign_in: SignIn) -> None:
    codes = [_code(sign_in) for _ in range(3)]
    guesses = [g for g in (f"{n:06d}" for n in range(20)) if g not in codes][:5]
    assert [sign_in.verify(ADDRESS, g) for g in guesses][-1] is CodeRefusal.LOCKED
    assert all(sign_in.verify(ADDRESS, code) is CodeRefusal.LOCKED for code in codes)


def test_at_most_three_codes_per_address_per_fifteen_minutes(sign_in: SignIn, clock: Clock) -> None:
    assert all(sign_in.issue_code(ADDRESS) for _ in range(3))
    assert sign_in.issue_code(ADDRESS) is None
    assert sign_in.issue_code("other@example.org") is not None
    clock.now += CODE_WINDOW - 1
    assert sign_in.issue_code(ADDRESS) is None
    clock.now += 1
    assert sign_in.issue_code(ADDRESS) is not None


def test_a_used_code_still_counts_towards_the_three(sign_in: SignIn) -> None:
    for _ in range(3):
        assert isinstance(sign_in.verify(ADDRESS, _code(sign_in)), Session)
    assert sign_in.issue_code(ADDRESS) is None


def test_a_session_ends_after_thirty_minutes_or_on_sign_out(sign_in: SignIn, clock: Clock) -> None:
    first = sign_in.verify(ADDRESS, _code(sign_in))
    second = sign_in.verify(ADDRESS, _code(sign_in))
    assert isinstance(first, Session) and isinstance(second, Session)
    assert first.token != second.token
    assert first.expires_at == clock.now + SESSION_LIFETIME
    sign_in.end_session(first.token)
    assert sign_in.session_address(first.token) is None
    clock.now += SESSION_LIFETIME - 1
    assert sign_in.session_address(second.token) is not None
    clock.now += 1
    assert sign_in.session_address(second.token) is None
    assert sign_in.session_address("") is None and sign_in.session_address("x" * 500) is None


def _dump(store: Store) -> bytes:
    """Every value of every table, as text."""
    if store.engine == "sqlite":
        return "\n".join(store.db.conn.iterdump()).encode()  # type: ignore[union-attr]
    return repr(
        [store.db.execute(f"SELECT * FROM {table}").fetchall() for table in store.db.table_names()]
    ).encode()


def test_only_keyed_hashes_are_stored(sign_in: SignIn, store: Store, clock: Clock) -> None:
    code = _code(sign_in)
    session = sign_in.verify(ADDRESS, code)
    assert isinstance(session, Session)
    dump = _dump(store)
    if store.engine == "sqlite":
        raw = store.settings.db_path.read_bytes()
        wal = store.settings.db_path.with_name("opulon.db-wal")
        raw += wal.read_bytes() if wal.exists() else b""
        for needle in (ADDRESS.encode(), session.token.encode(), code.encode()):
            assert needle not in raw
    # The code's six digits may occur by chance among the bytes; never as a stored value.
    codes = store.db.execute("SELECT address_hash, code_hash FROM sign_in_codes").fetchall()
    sessions = store.db.execute("SELECT token_hash, address_hash FROM sign_in_sessions").fetchall()
    assert codes and sessions
    for value in (*codes[0], *sessions[0]):
        assert isinstance(value, bytes) and len(value) == 32
    assert session.token.encode() not in dump and ADDRESS.encode() not in dump
    # Spent codes and ended sessions leave the tables once they count for nothing.
    clock.now += SESSION_LIFETIME
    assert sign_in.issue_code("other@example.org") is not None
    assert store.db.execute("SELECT count(*) FROM sign_in_sessions").fetchone()[0] == 0
    assert store.db.execute("SELECT count(*) FROM sign_in_codes").fetchone()[0] == 1


def test_the_hashes_depend_on_the_master_key(sign_in: SignIn, settings: object) -> None:
    from opulon.crypto import MasterKey
    from opulon.sign_in import SignInHasher

    other = SignInHasher(MasterKey(b"\x01" * 32))
    assert other.address(ADDRESS) != sign_in.hasher.address(ADDRESS)
    assert sign_in.hasher.address(ADDRESS) != sign_in.hasher.token(ADDRESS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" Ada@Example.ORG ", "ada@example.org"), ("nobody", None), ("a@b", None),
     ("a b@c.d", None), ("x@" + "y" * 260 + ".org", None), ("", None)],
)  # fmt: skip
def test_addresses_are_compared_trimmed_and_in_lower_case(text: str, expected: str | None) -> None:
    assert normalize_address(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("123456", "123456"), (" 123 456 ", "123456"), ("123-456", "123456"), ("12345", None),
     ("1234567", None), ("12345a", None), ("١٢٣٤٥٦", None)],
)  # fmt: skip
def test_codes_are_six_digits(text: str, expected: str | None) -> None:
    assert normalize_code(text) == expected
