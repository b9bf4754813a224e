"""Opulon API keys: minting, encrypted storage, lookup and lifecycle.

A key reads ``op-ul-`` + 10 lowercase alphanumerics (the display prefix, shown everywhere) +
a secret of 40 base62 characters. The database keeps the prefix, a keyed hash of the whole
key (for lookup, compared in constant time) and the whole key encrypted under the master key
(for ``reveal``). The plain key is shown once, at creation or rotation.
"""

from __future__ import annotations

import functools
import hmac
import json
import re
import secrets
import string
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase
from typing import Any

from opulon.crypto import DecryptionError
from opulon.errors import InvalidInput, NotFound, OpulonError
from opulon.formatting import iso
from opulon.limits import Limit
from opulon.storage import Store

KEY_MARK = "op-ul-"
PREFIX_LENGTH = len(KEY_MARK) + 10
SECRET_LENGTH = 40
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY_RE = re.compile(r"op-ul-[a-z0-9]{10}[A-Za-z0-9]{32,128}")
_PREFIX_RE = re.compile(r"op-ul-[a-z0-9]{10}")
# One plain address: no display name, no list, nothing a mail header would read otherwise.
_EMAIL_PART = r"[^@\s,;<>\"'()\[\]\\\x00-\x1f\x7f]+"
_EMAIL_RE = re.compile(rf"{_EMAIL_PART}@{_EMAIL_PART}\.{_EMAIL_PART}")


class Refusal(Enum):
    """Why a presented key is not accepted; the value is the message for the key holder."""

    MALFORMED = "the API key is malformed: Opulon keys start with op-ul-"
    UNKNOWN = "the API key is not known to this gateway"
    EXPIRED = "the API key has expired"
    DISABLED = "the API key is disabled"
    ROTATED_OUT = "the API key was rotated; use the new key"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key's configuration, without its secret."""

    id: int
    prefix: str
    name: str
    email: str | None
    created_at: float
    expires_at: float | None
    status: str  # "active" | "disabled"
    models: tuple[str, ...]
    limits: tuple[Limit, ...]
    concurrency: int | None

    def state(self, now: float) -> str:
        """``active``, ``disabled`` or ``expired`` at ``now``."""
        if self.status != "active":
            return self.status
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def allows_model(self, model: str) -> bool:
        return not self.models or _matches_any(self.models, model)

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "name": self.name,
            "email": self.email,
            "status": self.state(time.time()),
            "created": iso(self.created_at),
            "expires": iso(self.expires_at) if self.expires_at is not None else None,
            "models": list(self.models) or ["*"],
            "limits": [str(limit) for limit in self.limits if not limit.is_budget],
            "budget": next((str(limit) for limit in self.limits if limit.is_budget), None),
            "concurrency": self.concurrency,
        }


@functools.lru_cache(maxsize=4096)
def _matches_any(patterns: tuple[str, ...], model: str) -> bool:
    return any(fnmatchcase(model, pattern) for pattern in patterns)


@dataclass(frozen=True, slots=True)
class _Credential:
    key_id: int
    lookup_hash: bytes
    valid_until: float | None


@dataclass(frozen=True, slots=True)
class KeyRing:
    """An in-memory snapshot of every key, for authenticating without SQL per request."""

    records: dict[int, KeyRecord]
    credentials: dict[str, _Credential] = field(repr=False)

    def authenticate(self, raw_key: str, lookup_hash: bytes, now: float) -> KeyRecord | Refusal:
        """The key's record, or why it is refused. ``lookup_hash`` is the keyed hash of ``raw_key``."""
        if not is_well_formed(raw_key):
            return Refusal.MALFORMED
        credential = self.credentials.get(raw_key[:PREFIX_LENGTH])
        if credential is None or not hmac.compare_digest(credential.lookup_hash, lookup_hash):
            return Refusal.UNKNOWN
        record = self.records.get(credential.key_id)
        if record is None:
            return Refusal.UNKNOWN
        if credential.valid_until is not None and now >= credential.valid_until:
            return Refusal.ROTATED_OUT
        state = record.state(now)
        if state == "disabled":
            return Refusal.DISABLED
        if state == "expired":
            return Refusal.EXPIRED
        return record

    def valid_until(self, raw_key: str) -> float | None:
        """When an accepted key's credential stops working (rotation grace), or None."""
        credential = self.credentials.get(raw_key[:PREFIX_LENGTH])
        return credential.valid_until if credential else None

    def by_prefix(self, prefix: str) -> KeyRecord | None:
        credential = self.credentials.get(prefix)
        return self.records.get(credential.key_id) if credential else None


def is_well_formed(raw_key: str) -> bool:
    return _KEY_RE.fullmatch(raw_key) is not None


def malformed_reason(raw_key: str) -> str:
    """What is wrong with a key that is not well formed, for its holder (never echoing it)."""
    lead = "the API key is malformed: "
    if not raw_key.startswith(KEY_MARK):
        return lead + "Opulon keys start with op-ul-"
    prefix = raw_key[len(KEY_MARK) : PREFIX_LENGTH]
    if len(prefix) < 10 or not all(ch in _PREFIX_ALPHABET for ch in prefix):
        return lead + "after op-ul- come 10 lowercase letters or digits, then the secret"
    secret = raw_key[PREFIX_LENGTH:]
    if not all(ch in _SECRET_ALPHABET for ch in secret):
        return lead + (
            "it holds a character other than a letter or a digit (a space or a quote copied "
            "with it?)"
        )
    shortest, longest = PREFIX_LENGTH + 32, PREFIX_LENGTH + 128
    if len(raw_key) < shortest:
        return lead + f"it is cut short ({len(raw_key)} characters; a key has at least {shortest})"
    return lead + f"it is too long ({len(raw_key)} characters; a key has at most {longest})"


def mint() -> tuple[str, str]:
    """A new (prefix, full key) pair."""
    prefix = KEY_MARK + "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(10))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    return prefix, prefix + secret


def validate_email(email: str) -> str:
    if not _EMAIL_RE.fullmatch(email):
        raise InvalidInput(f"invalid email {email!r}")
    return email


def validate_models(patterns: Iterable[str]) -> tuple[str, ...]:
    cleaned = tuple(p.strip() for p in patterns if p.strip())
    for pattern in cleaned:
        if any(ch.isspace() for ch in pattern):
            raise InvalidInput(f"invalid model pattern {pattern!r}: no spaces")
    return () if cleaned == ("*",) else cleaned


def validate_limits(limits: Sequence[Limit]) -> tuple[Limit, ...]:
    seen: set[tuple[str, int | None]] = set()
    for limit in limits:
        ident = (limit.metric, limit.window_seconds)
        if ident in seen:
            what = "budget" if limit.is_budget else "limit"
            raise InvalidInput(f"duplicate {what} for {limit}: give each metric and window once")
        seen.add(ident)
    return tuple(limits)


_UNSET: Any = object()


class KeyStore:
    """Key lifecycle on top of a :class:`~opulon.storage.Store`."""

    def __init__(self, store: Store) -> None:
        self._db = store.db
        self._master = store.master_key

    # -- reading -----------------------------------------------------------------------------

    def _records(self, where: str = "", params: Sequence[Any] = ()) -> list[KeyRecord]:
        rows = self._db.execute(
            "SELECT k.id, c.prefix, k.name, k.email, k.created_at, k.expires_at, k.status, "
            "k.models, k.concurrency FROM keys k JOIN credentials c "
            f"ON c.key_id = k.id AND c.valid_until IS NULL {where} ORDER BY k.id",
            list(params),
        ).fetchall()
        limits: dict[int, list[Limit]] = {}
        for key_id, metric, amount, window in self._db.execute(
            "SELECT key_id, metric, amount, window_seconds FROM limits ORDER BY id"
        ).fetchall():
            limits.setdefault(key_id, []).append(Limit(metric, amount, window))
        return [
            KeyRecord(
                id=row[0],
                prefix=row[1],
                name=row[2],
                email=row[3],
                created_at=row[4],
                expires_at=row[5],
                status=row[6],
                models=tuple(json.loads(row[7])),
                limits=tuple(limits.get(row[0], ())),
                concurrency=row[8],
            )
            for row in rows
        ]

    def all(self) -> list[KeyRecord]:
        return self._records()

    def get(self, prefix: str) -> KeyRecord:
        """The key whose current display prefix is ``prefix``; :class:`NotFound` otherwise."""
        prefix = prefix.strip()
        if not _PREFIX_RE.fullmatch(prefix[:PREFIX_LENGTH]):
            raise InvalidInput(f"invalid key prefix {prefix!r}: expected op-ul- and 10 characters")
        found = self._records("WHERE c.prefix = ?", [prefix[:PREFIX_LENGTH]])
        if not found:
            old = self._db.execute(
                "SELECT 1 FROM credentials WHERE prefix = ?", [prefix[:PREFIX_LENGTH]]
            ).fetchone()
            hint = " (it was rotated; use the new prefix)" if old else ""
            raise NotFound(f"no key with prefix {prefix[:PREFIX_LENGTH]}{hint}")
        return found[0]

    def keyring(self) -> KeyRing:
        """A snapshot of every key and every credential still recognised."""
        records = {record.id: record for record in self._records()}
        credentials = {
            prefix: _Credential(key_id, bytes(lookup_hash), valid_until)
            for prefix, key_id, lookup_hash, valid_until in self._db.execute(
                "SELECT prefix, key_id, lookup_hash, valid_until FROM credentials"
            ).fetchall()
        }
        return KeyRing(records, credentials)

    # -- changing ----------------------------------------------------------------------------

    def _insert_credential(self, key_id: int, now: float) -> tuple[str, str]:
        for _ in range(10):
            prefix, full_key = mint()
            exists = self._db.execute(
                "SELECT 1 FROM credentials WHERE prefix = ?", [prefix]
            ).fetchone()
            if not exists:
                break
        else:  # pragma: no cover - 36^10 prefixes make this practically impossible
            raise OpulonError("could not mint a unique key prefix")
        self._db.execute(
            "INSERT INTO credentials (key_id, prefix, lookup_hash, ciphertext, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                key_id,
                prefix,
                self._master.lookup_hash(full_key),
                self._master.encrypt(full_key.encode(), context=prefix.encode()),
                now,
            ],
        )
        return prefix, full_key

    def _replace_limits(self, key_id: int, limits: Sequence[Limit]) -> None:
        self._db.execute("DELETE FROM limits WHERE key_id = ?", [key_id])
        for limit in limits:
            self._db.execute(
                "INSERT INTO limits (key_id, metric, amount, window_seconds) VALUES (?, ?, ?, ?)",
                [key_id, limit.metric, limit.amount, limit.window_seconds],
            )

    def create(
        self,
        name: str,
        *,
        email: str | None = None,
        limits: Sequence[Limit] = (),
        concurrency: int | None = None,
        models: Sequence[str] = (),
        expires_at: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """Create a key; returns its record and the full key, which is not shown again."""
        name = _validate_name(name)
        checked_limits = validate_limits(limits)
        model_patterns = validate_models(models)
        if email is not None:
            validate_email(email)
        now = time.time()
        with self._db.atomic():
            ((key_id,),) = self._db.execute(
                "INSERT INTO keys (name, email, created_at, expires_at, models, concurrency) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                [name, email, now, expires_at, json.dumps(model_patterns), concurrency],
            ).fetchall()
            prefix, full_key = self._insert_credential(key_id, now)
            self._replace_limits(key_id, checked_limits)
        return self.get(prefix), full_key

    def update(
        self,
        prefix: str,
        *,
        name: str = _UNSET,
        email: str | None = _UNSET,
        limits: Sequence[Limit] = _UNSET,
        concurrency: int | None = _UNSET,
        models: Sequence[str] = _UNSET,
        expires_at: float | None = _UNSET,
    ) -> KeyRecord:
        """Change what is given; leave the rest. ``None`` clears an optional field."""
        record = self.get(prefix)
        changes: dict[str, Any] = {}
        if name is not _UNSET:
            changes["name"] = _validate_name(name)
        if email is not _UNSET:
            changes["email"] = validate_email(email) if email is not None else None
        if concurrency is not _UNSET:
            changes["concurrency"] = concurrency
        if models is not _UNSET:
            changes["models"] = json.dumps(validate_models(models))
        if expires_at is not _UNSET:
            changes["expires_at"] = expires_at
        checked_limits = validate_limits(limits) if limits is not _UNSET else None
        with self._db.atomic():
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)
                self._db.execute(
                    f"UPDATE keys SET {assignments} WHERE id = ?", [*changes.values(), record.id]
                )
            if checked_limits is not None:
                self._replace_limits(record.id, checked_limits)
        return self.get(record.prefix)

    def rotate(self, prefix: str, *, grace_seconds: float = 0) -> tuple[KeyRecord, str]:
        """Issue a new secret and prefix for the same key record.

        The old key stops working at once, or after ``grace_seconds``.
        """
        record = self.get(prefix)
        now = time.time()
        with self._db.atomic():
            # Only the current secret is ever revealed; the old ciphertext is not kept.
            self._db.execute(
                "UPDATE credentials SET valid_until = ?, ciphertext = NULL "
                "WHERE key_id = ? AND valid_until IS NULL",
                [now + max(0.0, grace_seconds), record.id],
            )
            new_prefix, full_key = self._insert_credential(record.id, now)
        return self.get(new_prefix), full_key

    def set_status(self, prefix: str, status: str) -> KeyRecord:
        record = self.get(prefix)
        self._db.execute("UPDATE keys SET status = ? WHERE id = ?", [status, record.id])
        return self.get(record.prefix)

    def delete(self, prefix: str) -> KeyRecord:
        """Delete a key with its credentials, limits and usage metadata."""
        record = self.get(prefix)
        with self._db.atomic():
            self._db.execute("DELETE FROM usage WHERE key_id = ?", [record.id])
            self._db.execute("DELETE FROM keys WHERE id = ?", [record.id])
        return record

    def reveal(self, prefix: str) -> str:
        """Decrypt and return the current full key."""
        record = self.get(prefix)
        row = self._db.execute(
            "SELECT ciphertext FROM credentials WHERE prefix = ?", [record.prefix]
        ).fetchone()
        try:
            return self._master.decrypt(bytes(row[0]), context=record.prefix.encode()).decode()
        except (DecryptionError, TypeError):
            raise OpulonError(
                f"the stored key {record.prefix} cannot be decrypted with this master key"
            ) from None


def _validate_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned:
        raise InvalidInput("a key needs a non-empty --name")
    if len(cleaned) > 200:
        raise InvalidInput("a key name has at most 200 characters")
    return cleaned


__all__ = [
    "KEY_MARK",
    "KeyRecord",
    "KeyRing",
    "KeyStore",
    "Refusal",
    "is_well_formed",
    "mint",
]
