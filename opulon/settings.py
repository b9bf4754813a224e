"""Where Opulon keeps its files, and the knobs of the gateway.

Settings are plain values passed in; nothing here is read from a cached global, so tests and
the CLI each build the settings they need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import platformdirs

HOME_ENV = "OPULON_HOME"
MASTER_KEY_ENV = "OPULON_MASTER_KEY"
DATABASE_ENV = "OPULON_DATABASE_URL"
DB_NAME = "opulon.db"
MASTER_KEY_NAME = "master.key"


@dataclass(frozen=True, slots=True)
class Settings:
    """The data directory, the master key's source and the database."""

    home: Path
    master_key_text: str | None = None  # from OPULON_MASTER_KEY; None = use the key file
    # postgresql://... or sqlite:///path (OPULON_DATABASE_URL); None = opulon.db in ``home``.
    database_url: str | None = None

    @property
    def db_path(self) -> Path:
        """The SQLite file: ``opulon.db`` in the data dir, or the path of a ``sqlite:///`` URL."""
        if self.database_url is not None and self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite://")).expanduser()
        return self.home / DB_NAME

    @property
    def is_postgresql(self) -> bool:
        """Whether the store is a PostgreSQL database rather than a SQLite file."""
        return self.database_url is not None and not self.database_url.startswith("sqlite:")

    @property
    def master_key_path(self) -> Path:
        return self.home / MASTER_KEY_NAME

    @classmethod
    def resolve(
        cls,
        home: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        database: str | None = None,
    ) -> Settings:
        """Build settings from an explicit ``--home``, else ``OPULON_HOME``, else platformdirs;
        the database from an explicit ``--database``, else ``OPULON_DATABASE_URL``, else the
        SQLite file in the data dir."""
        env = os.environ if environ is None else environ
        chosen = home or env.get(HOME_ENV) or platformdirs.user_data_dir("opulon", appauthor=False)
        return cls(
            home=Path(chosen).expanduser().absolute(),
            master_key_text=env.get(MASTER_KEY_ENV) or None,
            database_url=database or env.get(DATABASE_ENV) or None,
        )


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How the gateway serves and talks to providers."""

    host: str = "127.0.0.1"
    port: int = 8000
    connect_timeout: float = 10.0
    read_timeout: float = 600.0  # whole non-streaming response
    stream_idle_timeout: float = 120.0  # longest silence between two stream chunks
    max_body_bytes: int = 32 * 1024 * 1024
    default_output_tokens: int = 1024  # reserved when a request names no max_tokens
    reload_interval: float = 0.25  # how often the server looks for CLI changes
    flush_interval: float = 0.02  # how often usage rows are written (small batches: short stalls)
    log_requests: bool = True
    # Proxies whose X-Forwarded-For names the client (for the look-up throttle only).
    trusted_proxies: tuple[str, ...] = ()
    # The Redis that several nodes share their limits through (None: this node's own).
    redis_url: str | None = None
    # While that Redis cannot be reached: "refuse" (503) or "local" (per-node limits).
    on_redis_failure: str = "refuse"
    # How long a reservation holds in Redis unrenewed: a dead node's requests free within it.
    redis_lease: float = 60.0
