from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from opulon.crypto import DecryptionError, MasterKey, load_master_key
from opulon.errors import MasterKeyError
from opulon.settings import Settings


def test_encryption_round_trips_and_is_bound_to_its_context() -> None:
    key = MasterKey.from_text(MasterKey.generate_text(), source="test")
    token = key.encrypt(b"secret", context=b"row-1")
    assert b"secret" not in token
    assert key.decrypt(token, context=b"row-1") == b"secret"
    with pytest.raises(DecryptionError):
        key.decrypt(token, context=b"row-2")
    other = MasterKey.from_text(MasterKey.generate_text(), source="test")
    with pytest.raises(DecryptionError):
        other.decrypt(token, context=b"row-1")


def test_lookup_hash_is_keyed() -> None:
    a = MasterKey.from_text(MasterKey.generate_text(), source="test")
    b = MasterKey.from_text(MasterKey.generate_text(), source="test")
    assert a.lookup_hash("x") == a.lookup_hash("x")
    assert a.lookup_hash("x") != b.lookup_hash("x")


def test_check_value_recognises_only_its_own_key() -> None:
    a = MasterKey.from_text(MasterKey.generate_text(), source="test")
    b = MasterKey.from_text(MasterKey.generate_text(), source="test")
    assert a.fits(a.check_value())
    assert not b.fits(a.check_value())


def test_key_file_is_created_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "h")
    load_master_key(settings, create=True)
    assert stat.S_IMODE(os.stat(settings.master_key_path).st_mode) == 0o600
    # The same file gives the same key.
    again = load_master_key(settings, create=False)
    assert again.fits(load_master_key(settings, create=False).check_value())


@pytest.mark.parametrize(
    "text", ["", "short", "A" * 44, "not base64 at all!!!!!!!!!!!!!!!!!!!!!!!!!!"]
)
def test_malformed_master_key_is_refused_clearly(text: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, master_key_text=text or " ")
    with pytest.raises(MasterKeyError, match="not a valid master key"):
        load_master_key(settings, create=True)


def test_missing_key_file_without_create_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="no master key"):
        load_master_key(Settings(home=tmp_path), create=False)
