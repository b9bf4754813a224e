"""The runtime as the HTTP layer sees it: authenticate, route, admit, settle, reload.

Its parts are plugged in as the server does (an in-memory limiter, usage in the SQLite file)
or replaced by a part that fails on purpose: the seam another implementation would use.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from opulon.keys import KeyRecord, KeyStore, Refusal
from opulon.limiter import Ticket
from opulon.limits import Usage, parse_limit
from opulon.runtime import Runtime
from opulon.settings import Settings
from opulon.storage import Store, open_store
from opulon.usage_store import SqliteUsageStore


class FailingFlush(SqliteUsageStore):
    """The SQLite usage store, but its next flush fails (a full disk, a locked file)."""

    def __init__(self, db_path: Path, db: Database) -> None:
        super().__init__(db_path, db)
        self.fail_next = False

    def flush(self) -> int:
        if self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("disk I/O error")
        return super().flush()


def test_a_reload_that_fails_halfway_is_tried_again_at_the_next_look(
    settings: Settings, store: Store
) -> None:
    usage = FailingFlush(settings.db_path, store.db)
    runtime = Runtime(settings, usage=usage)
    try:
        keys = KeyStore(store)
        _, old = keys.create("old")
        assert runtime.reload()
        assert isinstance(asyncio.run(runtime.authenticate(old)), KeyRecord)
        # The admin disables a key and creates one with a window: its history is loaded,
        # which flushes the usage store first, and that fails.
        keys.set_status(old[:16], "disabled")
        _, new = keys.create("new", limits=[parse_limit("requests:5/1m")])
        usage.fail_next = True
        with pytest.raises(sqlite3.OperationalError):
            runtime.reload()
        # The next look does not take the change as seen: it loads it.
        assert runtime.reload()
        assert asyncio.run(runtime.authenticate(old)) is Refusal.DISABLED
        record = asyncio.run(runtime.authenticate(new))
        assert isinstance(record, KeyRecord)
        assert isinstance(asyncio.run(runtime.admit(record.id, Usage())), Ticket)
    finally:
        runtime.close()


def test_a_key_created_a_moment_ago_is_known_without_waiting_for_the_poll(
    settings: Settings, store: Store
) -> None:
    runtime = Runtime(settings)
    try:
        _, key = KeyStore(store).create("fresh")
        record = asyncio.run(runtime.authenticate(key))
        assert isinstance(record, KeyRecord) and record.name == "fresh"
    finally:
        runtime.close()


def test_admission_and_settlement_go_through_the_limiter_part(
    settings: Settings, store: Store
) -> None:
    runtime = Runtime(settings)
    try:
        record, _ = KeyStore(store).create("two", limits=[parse_limit("requests:2/1m")])
        runtime.reload()

        async def run() -> list[object]:
            first = await runtime.admit(record.id, Usage())
            second = await runtime.admit(record.id, Usage())
            third = await runtime.admit(record.id, Usage())
            assert isinstance(first, Ticket)
            await runtime.settle(first, Usage(0, 0, 0))  # did not count after all
            fourth = await runtime.admit(record.id, Usage())
            return [first, second, third, fourth]

        results = asyncio.run(run())
        assert [isinstance(r, Ticket) for r in results] == [True, True, False, True]
        summary = runtime.tightest(record.id, fresh=True)
        assert summary is not None and summary.requests is not None
        assert (summary.requests.limit, summary.requests.remaining) == (2, 0)
    finally:
        runtime.close()


def test_the_redis_namespace_is_the_stores_own_and_a_copys_is_another(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    from opulon.runtime import redis_namespace
    from opulon.store_copy import copy_store

    first = redis_namespace(store)
    assert first == redis_namespace(store)  # every node of the store: the same
    assert re.fullmatch(r"opulon:[0-9a-f]{12}:", first)
    again = open_store(settings)
    try:
        assert redis_namespace(again) == first
    finally:
        again.close()
    target = f"sqlite:///{tmp_path / 'copy' / 'opulon.db'}"
    copy_store(settings, f"sqlite:///{settings.db_path}", target)
    copied = open_store(Settings(home=settings.home, database_url=target))
    try:
        assert redis_namespace(copied) != first  # same master key, another installation
    finally:
        copied.close()
