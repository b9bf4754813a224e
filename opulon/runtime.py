"""The gateway's live state: keys, providers and limits held in memory, kept in step with
the database, plus the usage writer.

No SQL runs per request: authentication uses an in-memory :class:`~opulon.keys.KeyRing`,
routing a :class:`~opulon.providers.ProviderTable`, admission the :class:`~opulon.limiter.Limiter`.
A change made by the CLI bumps a generation counter in the database (by trigger); the server
polls that counter a few times a second and rebuilds what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from opulon.keys import PREFIX_LENGTH, KeyRecord, KeyRing, KeyStore, Refusal, is_well_formed
from opulon.limiter import Limiter, Usage
from opulon.providers import ProviderStore, ProviderTable
from opulon.settings import GatewaySettings, Settings
from opulon.status_view import KeyStatus, build_status, read_usage
from opulon.storage import Store, open_store
from opulon.usage import UsageRow, UsageWriter, lifetime_usage, window_history

_ACCEPTED_CACHE_SIZE = 10_000


class Runtime:
    """Everything a request needs, in memory."""

    def __init__(
        self,
        settings: Settings,
        gateway: GatewaySettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.gateway = gateway or GatewaySettings()
        self.clock = clock
        self.store: Store = open_store(settings)
        self.writer = UsageWriter(settings.db_path)
        # Rate-limit headers may lag the newest requests by 5 ms; refusals are always exact.
        self.limiter = Limiter(clock, header_max_age=0.005)
        self.keyring = KeyRing({}, {})
        self.providers = ProviderTable(())
        self._lookup_hash = self.store.master_key.lookup_hash
        # Keys that passed the keyed-hash check under the current snapshot (memory only).
        self._accepted: dict[str, tuple[KeyRecord, float | None]] = {}
        self._generation = -1
        self.reload()

    # -- per request --------------------------------------------------------------------

    def authenticate(self, raw_key: str) -> KeyRecord | Refusal:
        """The key's record or why it is refused; no SQL, and no HMAC for a key seen before."""
        known = self._accepted.get(raw_key)
        if known is not None:
            record, valid_until = known
            now = self.clock()
            if (valid_until is None or now < valid_until) and record.state(now) == "active":
                return record
        if not is_well_formed(raw_key):
            return Refusal.MALFORMED
        result = self.keyring.authenticate(raw_key, self._lookup_hash(raw_key), self.clock())
        if isinstance(result, KeyRecord):
            if len(self._accepted) >= _ACCEPTED_CACHE_SIZE:
                self._accepted.clear()
            self._accepted[raw_key] = (result, self.keyring.valid_until(raw_key))
        return result

    def record(self, row: UsageRow) -> None:
        self.writer.add(row)

    # -- for the key holder's status page -------------------------------------------------

    def status_record(self, raw_key: str) -> KeyRecord | Refusal:
        """The key's record if the key is genuine (even if disabled or expired), else why not.

        A disabled or expired key is still its holder's to look at; other refusals stand.
        """
        result = self.authenticate(raw_key)
        if result is Refusal.DISABLED or result is Refusal.EXPIRED:
            record = self.keyring.by_prefix(raw_key[:PREFIX_LENGTH])
            return record if record is not None else Refusal.UNKNOWN
        return result

    async def key_status(self, record: KeyRecord) -> KeyStatus:
        """What the key holder may see of their key: state, limits with use, usage by day."""
        # Rows still waiting in memory belong on the page: write them first.
        with contextlib.suppress(Exception):  # a failed write keeps its rows for the writer
            await asyncio.to_thread(self.writer.flush)
        now = self.clock()
        days, recent = await asyncio.to_thread(read_usage, self.settings.db_path, record.id, now)
        return build_status(
            record,
            self.limiter.states(record.id),
            self.limiter.in_flight(record.id),
            days,
            recent,
            now,
        )

    # -- keeping in step with the database -------------------------------------------------

    def reload(self, *, force: bool = False) -> bool:
        """Rebuild keys, providers and limits if the CLI changed them; True if it did."""
        generation = self.store.config_generation()
        if generation == self._generation and not force:
            return False
        self._generation = generation
        keyring = KeyStore(self.store).keyring()
        providers = ProviderStore(self.store).table()
        need_history: list[KeyRecord] = []
        for record in keyring.records.values():
            if self.limiter.configure(record.id, record.limits, record.concurrency):
                need_history.append(record)
        for key_id in self.limiter.keys() - keyring.records.keys():
            self.limiter.forget(key_id)
        if need_history:
            # Rows still waiting in memory belong in the history being rebuilt.
            self.writer.flush()
            now = self.clock()
            for record in need_history:
                windows = [lim.window_seconds for lim in record.limits if lim.window_seconds]
                events = (
                    window_history(self.store.db, record.id, now - max(windows)) if windows else []
                )
                has_budget = any(lim.is_budget for lim in record.limits)
                lifetime = lifetime_usage(self.store.db, record.id) if has_budget else Usage(0)
                self.limiter.load_history(record.id, events, lifetime)
        self.keyring = keyring
        self.providers = providers
        self._accepted = {}  # keys accepted under the old snapshot are checked again
        return True

    def close(self) -> None:
        """Write every waiting usage row and close the database."""
        self.writer.close()
        self.store.close()
