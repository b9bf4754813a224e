from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from opulon.settings import Settings
from opulon.storage import Store, open_store


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir; nothing touches the user's real one."""
    home = tmp_path / "home"
    monkeypatch.setenv("OPULON_HOME", str(home))
    monkeypatch.delenv("OPULON_MASTER_KEY", raising=False)
    return home


@pytest.fixture
def settings(isolated_home: Path) -> Settings:
    return Settings(home=isolated_home)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    opened = open_store(settings)
    yield opened
    opened.close()
