"""The gateway's live state, behind the few operations the HTTP layer calls.

The HTTP layer (``opulon/gateway/``) calls :class:`Runtime` only: :meth:`~Runtime.authenticate`
a key, find the provider of a request (:meth:`~Runtime.provider_for`), :meth:`~Runtime.admit`
it against the key's limits, :meth:`~Runtime.settle` what it used, :meth:`~Runtime.record`
its metadata, and report a key's :meth:`~Runtime.tightest` windows and
:meth:`~Runtime.key_status`. It never reaches into the key ring, the provider table, the
limiter or the usage store behind them.

No SQL runs per request: authentication uses an in-memory :class:`~opulon.keys.KeyRing`,
routing a :class:`~opulon.providers.ProviderTable`, admission an
:class:`~opulon.limiter_redis.AsyncLimiter`: this node's in-memory
:class:`~opulon.limiter.Limiter`, or with ``--redis`` the :class:`~opulon.limiter_redis.RedisLimiter`
that several nodes share (one atomic script per admission and settlement). A change made by
the CLI bumps a generation counter in the database (by trigger); the server polls that
counter a few times a second and rebuilds what changed. The limiter and the usage store are
parts handed in, so another implementation plugs in here without touching the HTTP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opulon.email_settings import EmailSettings, EmailSettingsStore
from opulon.errors import ConfigError, OpulonError
from opulon.key_status_data import KeyStatus, build_status
from opulon.keys import PREFIX_LENGTH, KeyRecord, KeyRing, KeyStore, Refusal, is_well_formed
from opulon.limiter import Limiter, Ticket, Tightest
from opulon.limiter import Refusal as LimitRefusal
from opulon.limiter_redis import (
    AsyncLimiter,
    FallbackLimiter,
    LocalLimiter,
    RedisLimiter,
    SharedLimiterUnavailable,
    stored_usage,
)
from opulon.limits import Usage
from opulon.mail import Mail, MailError, load_mailer
from opulon.providers import Provider, ProviderStore, ProviderTable
from opulon.settings import GatewaySettings, Settings
from opulon.sign_in import CodeRefusal, Session, SignIn, normalize_address
from opulon.site_settings import SiteSettings, load_site_settings
from opulon.storage import Store, open_store
from opulon.usage import UsageRow
from opulon.usage_journal import JOURNAL_DIR, UsageJournal
from opulon.usage_store import DatabaseUsageStore, UsageStore

log = logging.getLogger("opulon.gateway")

_ACCEPTED_CACHE_SIZE = 10_000
_RECHECK_EVERY = 0.01  # an unknown key looks for new keys in the store at most this often
_MAX_MAILS_WAITING = 100  # sign-in codes being sent in the background, at most
_MAIL_THREADS = 4  # mails sent at once; the others wait their turn
# Rate-limit headers may lag the newest requests by 5 ms; refusals are always exact.
SUMMARY_MAX_AGE = 0.005
# What the installation's Redis prefix is a keyed hash of (a label no API key can equal).
_NAMESPACE_LABEL = "opulon/redis-namespace/v1"
_READY_EVERY = 1.0  # seconds between two looks of /healthz at the database and Redis
_READY_TIMEOUT = 2.0  # seconds /healthz waits for the database before saying it is not ready


def _reason(exc: Exception) -> str:
    """What went wrong, for the log: the message of an error Opulon raised on purpose (never
    a key or an address), else only the kind of error."""
    return (
        str(exc)
        if isinstance(exc, OpulonError) and not isinstance(exc, MailError)
        else (type(exc).__name__)
    )


class _StoredHistory:
    """The usage store as the shared limiter's source of history: rows still waiting in
    memory are written first, so that a rebuilt count includes this node's latest."""

    def __init__(self, usage: UsageStore) -> None:
        self._usage = usage

    def window_history(self, key_id: int, since: float) -> list[tuple[float, int, int]]:
        with contextlib.suppress(Exception):  # a failed write keeps its rows for the writer
            self._usage.flush()
        return self._usage.window_history(key_id, since)

    def lifetime_usage(self, key_id: int) -> Usage:
        return self._usage.lifetime_usage(key_id)


def _installation_tag(store: Store, purpose: str) -> str:
    """A keyed hash, under the master key, of ``purpose`` and a random id the store keeps
    (made on first use): the same on every node of the store, another for any other store,
    a copy made with ``db copy`` included."""
    # Another node may have made it first: the stored one wins.
    store.db.execute(
        "INSERT INTO meta (name, value) VALUES ('installation', ?) ON CONFLICT DO NOTHING",
        [secrets.token_hex(16).encode()],
    )
    (stored,) = store.db.execute("SELECT value FROM meta WHERE name = 'installation'").fetchone()
    return store.master_key.lookup_hash(f"{purpose}:{bytes(stored).hex()}").hex()


def redis_namespace(store: Store) -> str:
    """The prefix of this installation's names in Redis: the same on every node of its
    store, and another for any other installation that shares the Redis (so two never count
    each other's keys, whose ids may be equal)."""
    return "opulon:" + _installation_tag(store, _NAMESPACE_LABEL)[:12] + ":"


def open_journal(store: Store) -> UsageJournal:
    """This process's usage journal, in the data dir, for the rows of ``store`` alone (a
    node started on another store never writes them there)."""
    directory = store.settings.home / JOURNAL_DIR
    try:
        return UsageJournal(directory, store=_installation_tag(store, "usage-journal")[:24])
    except OSError as exc:
        raise ConfigError(
            f"cannot keep the usage journal in {directory}: {exc.strerror or exc}"
        ) from None


def build_limiter(
    gateway: GatewaySettings,
    usage: UsageStore,
    clock: Callable[[], float],
    namespace: str = "opulon:",
) -> AsyncLimiter:
    """This node's limiter: its own counts, or Redis's shared ones where ``redis_url`` is set
    (with this node's own counts while Redis is down, if the operator chose ``local``)."""
    local = LocalLimiter(Limiter(clock, summary_max_age=SUMMARY_MAX_AGE))
    if not gateway.redis_url:
        return local
    history = _StoredHistory(usage)
    shared = RedisLimiter.from_url(
        gateway.redis_url,
        history,
        clock=clock,
        lease=gateway.redis_lease,
        prefix=namespace,
        summary_max_age=SUMMARY_MAX_AGE,
    )
    if gateway.on_redis_failure == "local":
        return FallbackLimiter(shared, local, history)
    return shared


def _key_tag(record: KeyRecord) -> str:
    """The key's creation time to the microsecond: it tells the key from an earlier one with
    the same id (SQLite reuses the id of the newest key once it is deleted)."""
    return format(int(record.created_at * 1_000_000), "x")


def _mail_service(email: EmailSettings | None) -> str | None:
    """Who delivers the emails, as the policy names it."""
    if email is None:
        return None
    if email.provider == "smtp":
        return "The mail server of this gateway's operator (SMTP)"
    return email.provider_name


@dataclass(slots=True)
class _Snapshot:
    """What one reload read from the database, to be put in place at once."""

    generation: int
    keyring: KeyRing
    providers: ProviderTable
    site: SiteSettings
    email: EmailSettings | None
    email_ok: bool
    history: dict[int, tuple[list[Any], Usage]] = field(default_factory=dict)


class Runtime:
    """Everything a request needs, in memory, behind a narrow set of operations."""

    def __init__(
        self,
        settings: Settings,
        gateway: GatewaySettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        limiter: AsyncLimiter | None = None,
        usage: UsageStore | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway or GatewaySettings()
        self.clock = clock
        self._store: Store = open_store(settings)
        self._usage: UsageStore = usage or DatabaseUsageStore(
            self._store, self._store.db, journal=open_journal(self._store)
        )
        if limiter is None:
            shared = self.gateway.redis_url is not None
            namespace = redis_namespace(self._store) if shared else "opulon:"
            limiter = build_limiter(self.gateway, self._usage, clock, namespace)
        self._limiter: AsyncLimiter = limiter
        # The in-memory limiter, where it is this node's own: its history loads at once.
        self._local = self._limiter.limiter if isinstance(self._limiter, LocalLimiter) else None
        self._background: set[asyncio.Task[Any]] = set()
        self._ready_at = -_READY_EVERY
        self._not_ready: str | None = None
        self._db_probe: asyncio.Future[int] | None = None
        self._keyring = KeyRing({}, {})
        self._owners: dict[bytes, list[KeyRecord]] | None = None  # keys by owner address hash
        self._providers = ProviderTable(())
        self.site = SiteSettings()  # the website's settings, read again with every change
        self.mail_service: str | None = None  # who delivers the emails, as the policy names it
        self._email: EmailSettings | None = None
        self._email_ok = False
        self._lookup_hash = self._store.master_key.lookup_hash
        # Keys that passed the keyed-hash check under the current snapshot (memory only).
        self._accepted: dict[str, tuple[KeyRecord, float | None]] = {}
        self._generation = -1
        self._recheck: asyncio.Task[None] | None = None
        self._rechecked_at = 0.0
        # Sign-in codes and sessions, on a connection of their own (used from threads).
        self._sign_in = SignIn(self._store.connect(), self._store.master_key, clock=clock)
        self._mails: set[asyncio.Task[None]] = set()
        self._mail_pool = ThreadPoolExecutor(_MAIL_THREADS, thread_name_prefix="opulon-mail")
        self.reload()

    # -- per request: authenticate, route, admit, settle, record -------------------------------

    async def authenticate(self, raw_key: str) -> KeyRecord | Refusal:
        """The key's record or why it is refused; no SQL, and no HMAC for a key seen before.

        An unknown key may have been created a moment ago: it waits for one look at the
        store's change counter (shared with every other unknown key, see :meth:`_look_again`).
        """
        result = self._authenticate(raw_key)
        if result is Refusal.UNKNOWN:
            await self._look_again()
            result = self._authenticate(raw_key)
        return result

    @property
    def providers(self) -> tuple[Provider, ...]:
        """Every configured provider, in routing order."""
        return self._providers.providers

    def provider_for(
        self, model: str | None, kind: str, family: str | None = None
    ) -> Provider | None:
        """The provider of ``kind`` that serves ``model`` (any model where None).

        With a stateful ``family``, only a provider that has it turned on.
        """
        if family is None:
            return None if model is None else self._providers.route(model, kind)
        for provider in self._providers.providers:
            if (
                provider.kind == kind
                and provider.allows(family)
                and (model is None or provider.serves(model))
            ):
                return provider
        return None

    async def admit(
        self, key_id: int, expected: Usage, *, flexible_output: bool = False
    ) -> Ticket | LimitRefusal:
        """Reserve a request's expected cost against every limit of the key, or say why not.

        Raises :class:`~opulon.limiter_redis.SharedLimiterUnavailable` when the shared
        limiter's Redis cannot be reached (and the operator chose no local fallback).
        """
        return await self._limiter.admit(key_id, expected, flexible_output=flexible_output)

    async def settle(self, ticket: Ticket, actual: Usage) -> None:
        """Replace the reservation by what the request used."""
        await self._limiter.settle(ticket, actual)

    def record(self, row: UsageRow) -> None:
        """Keep one request's metadata (written in batches, off the request path)."""
        self._usage.add(row)

    def tightest(self, key_id: int, fresh: bool = False) -> Tightest | None:
        """The key's tightest windows, for its answers' rate-limit headers."""
        return self._limiter.tightest(key_id, fresh=fresh)

    # -- for the key holder's status page -------------------------------------------------

    def status_record(self, raw_key: str) -> KeyRecord | Refusal:
        """The key's record if the key is genuine (even if disabled or expired), else why not.

        A disabled or expired key is still its holder's to look at; other refusals stand.
        """
        result = self._authenticate(raw_key)
        if result is Refusal.DISABLED or result is Refusal.EXPIRED:
            record = self._keyring.by_prefix(raw_key[:PREFIX_LENGTH])
            return record if record is not None else Refusal.UNKNOWN
        return result

    async def key_status(self, record: KeyRecord) -> KeyStatus:
        """What the key holder may see of their key: state, limits with use, usage by day."""
        # Rows still waiting in memory belong on the page: write them first.
        with contextlib.suppress(Exception):  # a failed write keeps its rows for the writer
            await asyncio.to_thread(self._usage.flush)
        now = self.clock()
        days, recent = await asyncio.to_thread(self._usage.key_usage, record.id, now)
        limiter = self._limiter
        states = await limiter.states(record.id)
        in_flight = await limiter.in_flight(record.id)
        return build_status(record, states, in_flight, days, recent, now)

    # -- signing in with a mailed code, on the status page ----------------------------------

    def email_enabled(self) -> bool:
        """Whether email is configured, so that codes (and keys) can be mailed (as of the
        last reload: pages ask without a database read)."""
        return self._email_ok

    def public_url(self) -> str | None:
        """The gateway's public URL for what the mails say (the email settings' own, else the
        site's)."""
        email = self._email
        return email.public_url if email is not None and email.public_url else self.site.public_url

    async def send_sign_in_code(self, address: str, compose: Callable[[str, str], Mail]) -> bool:
        """Issue a code for the (normalised) ``address``; False when it had its share already.

        The code is mailed (``compose(to, code)``, in the background) only if keys belong to
        the address; either way the caller learns the same, in the same time.
        """
        code = await asyncio.to_thread(self._sign_in.issue_code, address)
        if code is None:
            return False
        owners = self._records_of(self._sign_in.hasher.address(address))
        if owners and owners[0].email:
            self._mail_later(compose(owners[0].email, code))
        return True

    async def sign_in(self, address: str, code: str) -> Session | CodeRefusal:
        """A session for the (normalised) address if ``code`` is one of its codes, else why not."""
        return await asyncio.to_thread(self._sign_in.verify, address, code)

    async def session_keys(self, token: str) -> list[KeyRecord] | None:
        """The keys of a signed-in session's address, or None if the session is not live."""
        address_hash = await asyncio.to_thread(self._sign_in.session_address, token)
        return None if address_hash is None else self._records_of(address_hash)

    async def end_session(self, token: str) -> None:
        """Sign out."""
        await asyncio.to_thread(self._sign_in.end_session, token)

    async def send_key_again(
        self, token: str, prefix: str, compose: Callable[[KeyRecord, str, EmailSettings], Mail]
    ) -> bool:
        """Mail a key of the session's address to it again (``compose(record, key, settings)``).

        False when the session is not live, the key is not the address's, or the mail was
        not sent; why is logged without the address or the key.
        """
        records = await self.session_keys(token)
        record = next((r for r in records or () if r.prefix == prefix), None)
        if record is None:
            return False
        settings = self._email
        if settings is None:
            log.error("key %s was not sent: email is not configured", record.prefix)
            return False
        try:
            key = await asyncio.to_thread(KeyStore(self._store).reveal, record.prefix)
            mail = compose(record, key, settings)
        except Exception as exc:
            log.error("key %s was not sent: %s", record.prefix, _reason(exc))
            return False
        sent = await self._send(mail)
        if sent:
            log.info("key %s sent again to its owner", record.prefix)
        return sent

    def _records_of(self, address_hash: bytes) -> list[KeyRecord]:
        """The keys whose owner address hashes to ``address_hash``, in key order."""
        owners = self._owners
        if owners is None:
            # Built once per key-ring snapshot, not an HMAC per key on every page.
            owners = {}
            for record in sorted(self._keyring.records.values(), key=lambda r: r.id):
                address = normalize_address(record.email) if record.email else None
                if address is not None:
                    owners.setdefault(self._sign_in.hasher.address(address), []).append(record)
            self._owners = owners
        return list(owners.get(address_hash, ()))

    def _mail_later(self, mail: Mail) -> None:
        if len(self._mails) >= _MAX_MAILS_WAITING:
            log.error("a sign-in code was not sent: too many mails waiting")
            return
        task = asyncio.get_running_loop().create_task(self._send_code(mail))
        self._mails.add(task)
        task.add_done_callback(self._mails.discard)

    async def _send_code(self, mail: Mail) -> None:
        if await self._send(mail):
            log.info("a sign-in code was sent")

    async def _send(self, mail: Mail) -> bool:
        # The mailer's message may name the address: only the kind of failure is logged.
        try:
            mailer = load_mailer(self._store)
            if mailer is None:
                log.error("a mail was not sent: email is not configured")
                return False
            # Mail has threads of its own: a slow provider never holds up the sign-in's database
            # work (on the default pool), nor makes one address's answer slower than another's.
            await asyncio.get_running_loop().run_in_executor(self._mail_pool, mailer.send, mail)
        except MailError as exc:
            reason = re.sub(re.escape(mail.to), "[the address]", str(exc), flags=re.IGNORECASE)
            log.error("a mail was not sent: %s", reason)
            return False
        except Exception as exc:
            log.error("a mail was not sent: %s", type(exc).__name__)
            return False
        return True

    # -- keeping in step with the database -------------------------------------------------

    def reload(self, *, force: bool = False) -> bool:
        """Rebuild keys, providers and limits if the CLI changed them; True if it did."""
        snapshot = self._read_config(force)
        if snapshot is None:
            return False
        self._apply(snapshot)
        return True

    async def refresh(self) -> bool:
        """:meth:`reload` with its database reads in a thread: a database that is slow or
        gone holds up no request meanwhile. The new state is put in place on the loop."""
        snapshot = await asyncio.to_thread(self._read_config, False)
        if snapshot is None:
            return False
        self._apply(snapshot)
        return True

    def _read_config(self, force: bool) -> _Snapshot | None:
        """Everything a reload reads, or None when nothing changed (any thread)."""
        generation = self._store.config_generation()
        if generation == self._generation and not force:
            return None
        keyring = KeyStore(self._store).keyring()
        email, email_ok = self._email_settings()
        snapshot = _Snapshot(
            generation,
            keyring,
            ProviderStore(self._store).table(),
            load_site_settings(self._store),
            email,
            email_ok,
        )
        if self._local is not None:
            # The stored history of every key whose limits are new, read now (so that a new
            # window never admits on an empty count while its history is on the way).
            old = self._keyring.records
            changed = [
                record
                for record in keyring.records.values()
                if record.limits
                and (record.id not in old or old[record.id].limits != record.limits)
            ]
            snapshot.history = self._history_of(changed)
        return snapshot

    def _history_of(self, records: Iterable[KeyRecord]) -> dict[int, tuple[list[Any], Usage]]:
        records = list(records)
        if not records:
            return {}
        # Rows still waiting in memory belong in the history being rebuilt.
        self._usage.flush()
        now = self.clock()
        found = {}
        for record in records:
            windows = [lim.window_seconds for lim in record.limits if lim.window_seconds]
            budget = any(lim.is_budget for lim in record.limits)
            found[record.id] = stored_usage(self._usage, record.id, windows, budget, now)
        return found

    def _apply(self, snapshot: _Snapshot) -> None:
        """Put a snapshot in place (on the loop, with no await: requests see all or none)."""
        keyring, limiter = snapshot.keyring, self._limiter
        need_history: list[KeyRecord] = []
        for record in keyring.records.values():
            tag = _key_tag(record)
            if limiter.configure(record.id, record.limits, record.concurrency, tag=tag):
                need_history.append(record)
        for key_id in limiter.keys() - keyring.records.keys():
            if self._local is not None:
                self._local.forget(key_id)
            else:
                self._in_background(limiter.forget(key_id), "forgetting a deleted key's limits")
        if need_history and self._local is not None:
            missing = [r for r in need_history if r.id not in snapshot.history]
            history = {**snapshot.history, **self._history_of(missing)}
            for record in need_history:
                events, lifetime = history[record.id]
                self._local.load_history(record.id, events, lifetime)
        self._keyring = keyring
        self._providers = snapshot.providers
        self.site = snapshot.site
        self._email, self._email_ok = snapshot.email, snapshot.email_ok
        self.mail_service = _mail_service(snapshot.email)
        self._owners = None
        self._accepted = {}  # keys accepted under the old snapshot are checked again
        # Only now: a reload that failed halfway is tried again at the next look.
        self._generation = snapshot.generation

    def _email_settings(self) -> tuple[EmailSettings | None, bool]:
        """The stored email settings, and whether a mailer can be made of them."""
        try:
            email = EmailSettingsStore(self._store).get()
        except Exception:  # the policy then names no mail service; sending says what is wrong
            email = None
        try:
            usable = load_mailer(self._store) is not None
        except Exception as exc:  # a broken configuration offers no sign-in, and says why
            log.error("the email settings cannot be used: %s", type(exc).__name__)
            usable = False
        return email, usable

    def start(self, flush_interval: float) -> None:
        """Begin writing usage rows, and renewing the shared limiter's leases, in the
        background (the latter needs the running event loop)."""
        self._usage.start(flush_interval)
        with contextlib.suppress(RuntimeError):  # no loop: nothing shared to renew
            self._in_background(self._limiter.keep_leases(), "renewing the leases")
            shared = getattr(self._limiter, "shared", self._limiter)
            if isinstance(shared, RedisLimiter):
                self._in_background(self._sweep(shared), "removing deleted keys' counts")

    @property
    def limits_kind(self) -> str:
        """How this node counts right now, for /healthz: "shared", "this node's", or "this
        node's while Redis is down" (the local fallback in use)."""
        if self._local is not None:
            return "this node's"
        if isinstance(self._limiter, FallbackLimiter) and self._limiter.degraded:
            return "this node's while Redis is down"
        return "shared"

    async def ready(self) -> str | None:
        """Why this node cannot serve requests right now (None: it can): the store or the
        shared limiter's Redis does not answer. Asked at most once a second; the answer
        names no address (the log has the details)."""
        now = time.monotonic()
        if now - self._ready_at < _READY_EVERY:
            return self._not_ready
        self._ready_at = now
        self._not_ready = await self._look_ready()
        return self._not_ready

    async def _look_ready(self) -> str | None:
        # One look at the database at a time, and an answer within a bound: a database that
        # hangs leaves one thread waiting on it, not one per health check.
        probe = self._db_probe
        if probe is None or probe.done():
            probe = self._db_probe = asyncio.ensure_future(
                asyncio.to_thread(self._store.config_generation)
            )
        try:
            await asyncio.wait_for(asyncio.shield(probe), _READY_TIMEOUT)
        except TimeoutError:
            log.error("health check: the database did not answer within %gs", _READY_TIMEOUT)
            return "the database does not answer"
        except Exception as exc:
            log.error("health check: the database does not answer: %s", _reason(exc))
            return "the database does not answer"
        # With the local fallback chosen, a Redis outage is not one of this node's: it serves.
        if isinstance(self._limiter, RedisLimiter):
            try:
                await self._limiter.server()
            except SharedLimiterUnavailable as exc:
                log.error("health check: %s", exc)
                return "the shared limiter's Redis does not answer"
        return None

    async def _sweep(self, shared: RedisLimiter) -> None:
        """Remove from Redis the counts of keys deleted while no node ran to forget them."""
        live = {key_id: _key_tag(record) for key_id, record in self._keyring.records.items()}
        removed = await shared.sweep(live)
        if removed:
            log.info("removed %d names of deleted keys from Redis", removed)

    async def close_limiter(self) -> None:
        """Stop renewing leases and release the shared limiter's connections."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._limiter.close()

    def _in_background(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("%s failed: %s", what, _reason(exc))

        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:
            work.close()
            raise
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> int:
        """Write every waiting usage row and close the database; the rows written."""
        waiting = self._usage.pending
        for task in self._mails:
            task.cancel()
        self._usage.close()
        self._sign_in.close()
        self._mail_pool.shutdown(wait=False, cancel_futures=True)
        self._store.close()
        return waiting

    # -- internals -------------------------------------------------------------------------

    def _authenticate(self, raw_key: str) -> KeyRecord | Refusal:
        known = self._accepted.get(raw_key)
        if known is not None:
            record, valid_until = known
            now = self.clock()
            if (valid_until is None or now < valid_until) and record.state(now) == "active":
                return record
        if not is_well_formed(raw_key):
            return Refusal.MALFORMED
        result = self._keyring.authenticate(raw_key, self._lookup_hash(raw_key), self.clock())
        if isinstance(result, KeyRecord):
            if len(self._accepted) >= _ACCEPTED_CACHE_SIZE:
                self._accepted.clear()
            self._accepted[raw_key] = (result, self._keyring.valid_until(raw_key))
        return result

    async def _look_again(self) -> None:
        """Wait for one look at the store's change counter made after this call.

        Requests with unknown keys share the look, and looks are at least
        :data:`_RECHECK_EVERY` apart: a flood of unknown keys costs at most a hundred cheap
        queries a second, and each of its requests waits a few milliseconds.
        """
        task = self._recheck
        if task is None:
            task = self._recheck = asyncio.get_running_loop().create_task(self._look_once())
        # A database that hangs leaves the key unknown after a while, not the request waiting.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), _READY_TIMEOUT)

    async def _look_once(self) -> None:
        try:
            wait = self._rechecked_at + _RECHECK_EVERY - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.refresh()
            except Exception as exc:
                log.error("reloading the configuration failed: %s", type(exc).__name__)
        finally:
            self._rechecked_at = time.monotonic()
            self._recheck = None
