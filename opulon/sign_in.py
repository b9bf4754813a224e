"""Signing in on ``/key-status`` with a one-time code sent to a key's owner address.

A key holder names an email address and receives a 6-digit code: valid for
:data:`CODE_LIFETIME` seconds, good for one sign-in, locked after :data:`MAX_WRONG_TRIES` wrong
tries, and at most :data:`CODES_PER_WINDOW` of them per address per :data:`CODE_WINDOW`
seconds. A right code opens a session of :data:`SESSION_LIFETIME` seconds, named by a random
token that the browser holds in a cookie.

Nothing of it is stored in clear: the tables hold a keyed hash (HMAC-SHA256 under a subkey of
the master key) of the address, of the code and of the session token, with times and counts.
Codes are issued and counted for any address, whether or not a key belongs to it, so that
nothing a caller sees tells the two apart; whether a mail goes out is the caller's business.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum

from opulon.crypto import MasterKey
from opulon.storage import Connection, immediate

CODE_DIGITS = 6
CODE_LIFETIME = 600.0
MAX_WRONG_TRIES = 5
CODES_PER_WINDOW = 3
CODE_WINDOW = 900.0
SESSION_LIFETIME = 1800.0
MAX_ADDRESS_LENGTH = 254
# The sign-in subkey: the keyed lookup hash of a label no API key can equal (keys start with
# op-ul-), so it is a subkey of the master key independent of every key's lookup hash.
_SUBKEY_LABEL = "opulon/sign-in/v1"
_ADDRESS_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_CODE_RE = re.compile(r"[0-9]{6}")


def normalize_address(text: str) -> str | None:
    """The address as compared and hashed (trimmed, lower case), or None if it is not one."""
    address = text.strip().lower()
    if len(address) > MAX_ADDRESS_LENGTH or not _ADDRESS_RE.fullmatch(address):
        return None
    return address


def normalize_code(text: str) -> str | None:
    """The six digits of a code as typed (spaces and dashes allowed), or None."""
    code = "".join(ch for ch in text if ch not in " -\t")
    return code if _CODE_RE.fullmatch(code) else None


class CodeRefusal(Enum):
    """Why a code does not sign in; the value is the message for the person."""

    WRONG = "that code is not right; check the latest mail and type it again"
    LOCKED = "too many wrong tries: that code is locked. Ask for a new code"
    NO_CODE = "no code is waiting for this address, or it has expired. Ask for a new code"


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in session: the token (for the cookie only) and when it ends."""

    token: str
    expires_at: float


class SignInHasher:
    """The keyed hashes of addresses, codes and session tokens."""

    __slots__ = ("_key",)

    def __init__(self, master: MasterKey) -> None:
        self._key = master.lookup_hash(_SUBKEY_LABEL)

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._key, b"\0".join(parts), hashlib.sha256).digest()

    def address(self, address: str) -> bytes:
        """The hash of a normalised address."""
        return self._mac(b"address", address.encode())

    def code(self, address_hash: bytes, code: str) -> bytes:
        """The hash of a code, bound to the address it was issued for."""
        return self._mac(b"code", address_hash, code.encode())

    def token(self, token: str) -> bytes:
        """The hash of a session token."""
        return self._mac(b"session", token.encode())


class SignIn:
    """Codes and sessions in the database, on a connection of their own (thread-safe).

    ``clock`` gives the time in seconds since the epoch; tests pass their own.
    """

    def __init__(
        self,
        conn: Connection,
        master: MasterKey,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = conn
        self.hasher = SignInHasher(master)
        self._clock = clock
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    # -- codes -------------------------------------------------------------------------------

    def issue_code(self, address: str) -> str | None:
        """A new code for a normalised ``address``, or None when it had its share already."""
        address_hash = self.hasher.address(address)
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        with self._lock, self._transaction() as conn:
            now = self._clock()
            self._prune(conn, now)
            (recent,) = conn.execute(
                "SELECT count(*) FROM sign_in_codes WHERE address_hash = ? AND created_at > ?",
                [address_hash, now - CODE_WINDOW],
            ).fetchone()
            if recent >= CODES_PER_WINDOW:
                return None
            conn.execute(
                "INSERT INTO sign_in_codes (address_hash, code_hash, created_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                [address_hash, self.hasher.code(address_hash, code), now, now + CODE_LIFETIME],
            )
        return code

    def verify(self, address: str, code: str) -> Session | CodeRefusal:
        """Sign in with a code: a new session, or why not.

        Every code of the address still waiting is tried; a right one is used up together
        with the others, a wrong one counts against each of them.
        """
        address_hash = self.hasher.address(address)
        presented = self.hasher.code(address_hash, code)
        with self._lock, self._transaction() as conn:
            now = self._clock()
            rows = conn.execute(
                "SELECT id, code_hash, tries FROM sign_in_codes WHERE address_hash = ? "
                "AND used_at IS NULL AND expires_at > ?",
                [address_hash, now],
            ).fetchall()
            open_codes = [(row[0], bytes(row[1])) for row in rows if row[2] < MAX_WRONG_TRIES]
            if not open_codes:
                return CodeRefusal.LOCKED if rows else CodeRefusal.NO_CODE
            matched = False
            for _, stored in open_codes:
                matched |= hmac.compare_digest(stored, presented)
            ids = [code_id for code_id, _ in open_codes]
            marks = ", ".join("?" for _ in ids)
            if not matched:
                conn.execute(
                    f"UPDATE sign_in_codes SET tries = tries + 1 WHERE id IN ({marks})", ids
                )
                left = max(row[2] for row in rows if row[0] in ids) + 1
                return CodeRefusal.LOCKED if left >= MAX_WRONG_TRIES else CodeRefusal.WRONG
            conn.execute(
                "UPDATE sign_in_codes SET used_at = ? WHERE address_hash = ? AND used_at IS NULL",
                [now, address_hash],
            )
            token = secrets.token_urlsafe(32)
            expires_at = now + SESSION_LIFETIME
            conn.execute(
                "INSERT INTO sign_in_sessions (token_hash, address_hash, created_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                [self.hasher.token(token), address_hash, now, expires_at],
            )
        return Session(token, expires_at)

    # -- sessions ----------------------------------------------------------------------------

    def session_address(self, token: str) -> bytes | None:
        """The address hash of a live session, or None (unknown, ended or expired)."""
        if not token or len(token) > 100:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT address_hash FROM sign_in_sessions WHERE token_hash = ? AND expires_at > ?",
                [self.hasher.token(token), self._clock()],
            ).fetchone()
        return bytes(row[0]) if row else None

    def end_session(self, token: str) -> None:
        """Sign out: the session is gone from the database."""
        if not token or len(token) > 100:
            return
        with self._lock:
            self._conn.execute(
                "DELETE FROM sign_in_sessions WHERE token_hash = ?", [self.hasher.token(token)]
            )

    # -- internals ---------------------------------------------------------------------------

    def _transaction(self) -> AbstractContextManager[Connection]:
        # One writer at a time, on every node: counting codes and adding one is one step.
        return immediate(self._conn, lock=("sign_in_codes", "sign_in_sessions"))

    @staticmethod
    def _prune(conn: Connection, now: float) -> None:
        # A code counts against its address for CODE_WINDOW and works for CODE_LIFETIME (the
        # shorter); after both it is gone, as is every session that has ended.
        conn.execute(
            "DELETE FROM sign_in_codes WHERE created_at <= ? AND expires_at <= ?",
            [now - CODE_WINDOW, now],
        )
        conn.execute("DELETE FROM sign_in_sessions WHERE expires_at <= ?", [now])
