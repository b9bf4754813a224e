"""The master key and what is derived from it.

One 32-byte master key, never stored in the database, yields independent subkeys (HKDF-SHA256):
one for the keyed lookup hash of API keys, one for authenticated encryption (AES-256-GCM) of
secrets at rest, one for the check value that tells whether a master key fits a database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from opulon.errors import MasterKeyError
from opulon.settings import MASTER_KEY_ENV, Settings

_NONCE_BYTES = 12
_CHECK_PLAINTEXT = b"opulon master key check v1"


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(master)


class DecryptionError(Exception):
    """A ciphertext did not authenticate under this master key."""


class MasterKey:
    """Holds the master key's derived subkeys; the raw key itself is not kept."""

    __slots__ = ("_aead", "_lookup")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise MasterKeyError("the master key must be 32 bytes")
        self._lookup = _derive(raw, b"opulon/lookup-hash/v1")
        self._aead = AESGCM(_derive(raw, b"opulon/encryption/v1"))

    @staticmethod
    def generate_text() -> str:
        """A new random master key in its text form (URL-safe base64 of 32 bytes)."""
        return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()

    @classmethod
    def from_text(cls, text: str, *, source: str) -> MasterKey:
        stripped = text.strip()
        try:
            raw = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise MasterKeyError(
                f"{source} is not a valid master key: expected 32 bytes in URL-safe base64 "
                f'(44 characters), e.g. from: python -c "import base64,secrets;'
                f'print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())"'
            )
        return cls(raw)

    def lookup_hash(self, secret: str) -> bytes:
        """Keyed hash (HMAC-SHA256) of a secret, for lookups without storing the secret."""
        return hmac.new(self._lookup, secret.encode(), hashlib.sha256).digest()

    def encrypt(self, plaintext: bytes, *, context: bytes) -> bytes:
        """AES-256-GCM; ``context`` is authenticated, binding the ciphertext to its row."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context)

    def decrypt(self, token: bytes, *, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(token[:_NONCE_BYTES], token[_NONCE_BYTES:], context)
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError("ciphertext does not authenticate") from exc

    def check_value(self) -> bytes:
        """An encrypted check value, stored in the database at creation to recognise this key."""
        return self.encrypt(_CHECK_PLAINTEXT, context=b"opulon/check")

    def fits(self, stored_check: bytes) -> bool:
        """Whether this master key is the one that encrypted ``stored_check``."""
        try:
            return self.decrypt(stored_check, context=b"opulon/check") == _CHECK_PLAINTEXT
        except DecryptionError:
            return False


def load_master_key(settings: Settings, *, create: bool) -> MasterKey:
    """The master key from ``OPULON_MASTER_KEY``, else from ``master.key`` in the data dir.

    With ``create``, a missing key file is created with mode 0600.
    """
    if settings.master_key_text is not None:
        return MasterKey.from_text(settings.master_key_text, source=MASTER_KEY_ENV)
    path = settings.master_key_path
    if path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise MasterKeyError(
                f"cannot read the master key file {path}: {exc.strerror}"
            ) from None
        return MasterKey.from_text(text, source=f"the key file {path}")
    if not create:
        raise MasterKeyError(f"no master key: set {MASTER_KEY_ENV} or restore the key file {path}")
    text = MasterKey.generate_text()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    return MasterKey.from_text(text, source=f"the key file {path}")
