"""The usage store the running gateway writes to and reads its history from.

:class:`UsageStore` is the part the runtime depends on; :class:`DatabaseUsageStore` keeps the
rows in the installation's store (its SQLite file or its PostgreSQL database), written in
batches off the request path by a :class:`~opulon.usage.UsageWriter`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

from opulon.key_status_data import DayUsage, RecentRequest, read_usage, read_usage_on
from opulon.limits import Usage
from opulon.storage import Connection, SqlDatabase, Store
from opulon.usage import UsageRow, UsageWriter, lifetime_usage, window_history
from opulon.usage_journal import UsageJournal

log = logging.getLogger("opulon.gateway")


class UsageStore(Protocol):
    """Where the metadata of every answered request goes, and the history read back."""

    @property
    def pending(self) -> int:
        """Rows taken and not yet written."""
        ...

    def start(self, interval: float) -> None:
        """Begin writing waiting rows every ``interval`` seconds, off the request path."""

    def add(self, row: UsageRow) -> None:
        """Take one row; cheap, never blocks on the database."""

    def flush(self) -> int:
        """Write every waiting row now; the number written."""
        ...

    def close(self) -> None:
        """Write every waiting row and release the store."""

    def window_history(self, key_id: int, since: float) -> list[tuple[float, int, int]]:
        """(timestamp, input tokens, output tokens) of the key's requests since ``since``."""
        ...

    def lifetime_usage(self, key_id: int) -> Usage:
        """Everything the key has used."""
        ...

    def key_usage(self, key_id: int, now: float) -> tuple[list[DayUsage], list[RecentRequest]]:
        """The key's tokens per day and last requests, for its holder's status page."""
        ...


class DatabaseUsageStore:
    """Usage rows in the installation's store.

    ``where`` is the store (either engine), or the path of its SQLite file; ``db`` the store's
    connection, for the history read at (re)configuration. With a ``journal`` every row is
    on disk from the moment it is added (see :mod:`opulon.usage_journal`).
    """

    def __init__(
        self, where: Path | Store, db: SqlDatabase, *, journal: UsageJournal | None = None
    ) -> None:
        self._where = where
        self._db = db
        self._writer = UsageWriter(where, journal)
        if journal is not None:
            # Rows of a process that died on this data dir go in before anything reads the
            # store's history (the limits' windows and budgets, at the runtime's start).
            try:
                self._writer.write_orphans()
            except Exception as exc:  # their files stay: the writer's next look tries again
                log.error("writing the rows of a stopped node failed (%s)", type(exc).__name__)
        # PostgreSQL: one read-only connection kept for the status pages, not one per page.
        self._reader: Connection | None = None
        self._reader_lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._writer.pending

    def start(self, interval: float) -> None:
        self._writer.start(interval)

    def add(self, row: UsageRow) -> None:
        self._writer.add(row)

    def flush(self) -> int:
        return self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def window_history(self, key_id: int, since: float) -> list[tuple[float, int, int]]:
        return window_history(self._db, key_id, since)

    def lifetime_usage(self, key_id: int) -> Usage:
        return lifetime_usage(self._db, key_id)

    def key_usage(self, key_id: int, now: float) -> tuple[list[DayUsage], list[RecentRequest]]:
        where = self._where
        if not isinstance(where, Store) or where.engine == "sqlite":
            return read_usage(where, key_id, now)
        with self._reader_lock:
            if self._reader is None:
                self._reader = where.connect(read_only=True)
            return read_usage_on(self._reader, key_id, now)


# The name it had while SQLite was the only engine.
SqliteUsageStore = DatabaseUsageStore
