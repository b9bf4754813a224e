from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from store_engines import ENGINES, postgres_schema

from opulon.settings import Settings
from opulon.storage import Store, open_store

# The store's behaviour tests: each runs on SQLite and on PostgreSQL (the ``engine`` fixture,
# which ``settings`` and ``store`` build on). Other modules test what stands on a store and
# run on SQLite alone; a test marked ``sqlite_only`` checks something only SQLite has.
BOTH_ENGINES = {
    "test_storage",
    "test_keys",
    "test_usage",
    "test_usage_journal",
    "test_reports",
    "test_sign_in",
    "test_email_settings",
    "test_site_settings",
    "test_cli_store",
    "test_cli_keys",
    "test_cli_providers",
    "test_cli_usage",
    "test_cli_email",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: checks what only the SQLite store has")
    config.addinivalue_line("markers", "postgresql_only: checks what only the PostgreSQL store has")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rpartition(".")[2]
    if metafunc.definition.get_closest_marker("postgresql_only"):
        metafunc.parametrize("engine", ["postgresql"], indirect=True)
    elif module in BOTH_ENGINES and not metafunc.definition.get_closest_marker("sqlite_only"):
        metafunc.parametrize("engine", ENGINES, indirect=True)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The store's engine: ``sqlite``, or ``postgresql`` where the module runs on both."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database_url(engine: str) -> Iterator[str | None]:
    """None for the SQLite file in the data dir; else a PostgreSQL schema of this test's."""
    if engine == "sqlite":
        yield None
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def database_from_env(database_url: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's store by OPULON_DATABASE_URL (for a module marked with
    ``pytestmark = pytest.mark.usefixtures("database_from_env")``)."""
    if database_url is not None:
        monkeypatch.setenv("OPULON_DATABASE_URL", database_url)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir; nothing touches the user's real one."""
    home = tmp_path / "home"
    monkeypatch.setenv("OPULON_HOME", str(home))
    monkeypatch.delenv("OPULON_MASTER_KEY", raising=False)
    monkeypatch.delenv("OPULON_DATABASE_URL", raising=False)
    return home


@pytest.fixture
def settings(isolated_home: Path, database_url: str | None) -> Settings:
    return Settings(home=isolated_home, database_url=database_url)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    opened = open_store(settings)
    yield opened
    opened.close()
