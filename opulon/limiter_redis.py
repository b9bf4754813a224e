"""Rolling limits shared by several gateway nodes through Redis.

:class:`RedisLimiter` enforces what :class:`opulon.limiter.Limiter` enforces on one node
(rolling windows folded at ``window / 1000``, lifetime budgets, concurrency; a refusal for
good wins over a window refusal, which wins over concurrency; a flexible output shrinks to
the room left; a settlement belongs to its reservation's moment), with the state in Redis, so
that any number of nodes admit exactly what one node would, with one node's bounds (a tokens
limit overshoots by at most what admitted requests use beyond their reservations). Each step
is one atomic Lua script (``opulon/lua/``; the data layout is described atop ``common.lua``):
admit checks every window, budget and concurrency of the key and reserves all or nothing;
settle adjusts the reservation; renew extends leases; seed builds missing state from the
stored usage. A key's limits travel as script arguments with every call, so nothing about
configuration is kept in step in Redis. Every call costs O(limits) amortised; all of a key's
data shares the hash tag ``{k<id>}`` (one Redis Cluster slot). The calls a node makes in one
turn of its event loop travel in one pipeline.

Time is the calling node's clock, passed into the scripts (never Redis ``TIME``), so the
nodes' clocks must agree (NTP). With clocks up to ``d`` seconds apart, usage leaves a window
up to ``d`` early or late (on top of folding's one resolution late) and a lease runs out up to
``d`` early or late; NTP keeps ``d`` to milliseconds.

Leases: every reservation carries one (:data:`DEFAULT_LEASE`). A node renews the leases of
its requests in flight (:meth:`RedisLimiter.renew`, every third of a lease with
:meth:`RedisLimiter.keep_leases`). A reservation whose lease ran out (its node died) stops
holding a concurrency slot at once, and the next call for its key releases what it reserved
in every window and in the lifetime totals: an unsettled request counts nothing, as on one
node whose counters are rebuilt from the stored rows after a restart (its row was never
written). So a dead node's requests in flight are undercounted by what they really used,
at most. A node that lives on after all gets its reservations back at its next renewal,
and a request Redis no longer holds counts what it used, from its moment, when it settles.

Rebuilding: when Redis lacks a key's state (first use, a Redis restart, a limit added), a
script says so, the node reads the key's stored usage through its :class:`HistorySource`,
seeds with a script that builds only what is still missing (two nodes seeding at once count
the history once) and tries again. The rows other nodes have not written yet (a usage
writer's batch, about a second of their traffic) are not in that history: the rebuilt
counts may miss them, the one bound of a rebuild. Requests in flight across a Redis restart
are missing from the rebuilt counts and slots until their node's next renewal (at most a
third of a lease) puts them back; meanwhile concurrency may admit that many more.

Configuration changes: Redis keeps every window some node configured in the last two
minutes up to date (a node still on the old limits counts in the new window too), so nodes
that pick up a change a moment apart agree; a window no node wants for two minutes is
dropped, and added again it is seeded afresh. A key's data expires a day after its last use
(beyond its longest window); a later request seeds it again.

Redis itself: run it with ``maxmemory-policy noeviction``. A window or budget evicted is
seeded again from the stored rows (with the bound above); evicted leases and reservations
come back with their nodes' next renewal. On Redis Cluster each script declares the key's meta key and reaches the
rest of the key's data by name under the same hash tag, so in the same slot.

When Redis cannot be reached, :meth:`RedisLimiter.admit` raises
:class:`SharedLimiterUnavailable` within about a second (connect and reply timeouts of 0.5 s,
one retry, two seconds at most in all); a settlement that fails is logged, kept and made
with the next renewal. A call is tried once more after a lost connection, which every script
allows: an admission is known by its ticket id, a settlement by a mark kept ten minutes.
:class:`FallbackLimiter` admits with per-node limits meanwhile, for operators who choose
that, and says so loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from asyncio import Future
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from opulon.database_url import redact_query
from opulon.errors import OpulonError
from opulon.limit_use import LimitState, limit_state
from opulon.limiter import (
    RESOLUTION_DIVISOR,
    Limiter,
    Refusal,
    Ticket,
    Tightest,
    WindowUse,
    budget_refusal,
    concurrency_refusal,
    too_large_refusal,
    window_refusal,
)
from opulon.limits import Limit, Usage

__all__ = [
    "DEFAULT_LEASE",
    "AsyncLimiter",
    "FallbackLimiter",
    "HistorySource",
    "LocalLimiter",
    "RedisLimiter",
    "SharedLimiterUnavailable",
    "SharedTicket",
    "fold_events",
    "redacted_url",
    "stored_usage",
]

log = logging.getLogger("opulon.limiter")

_TAG_RE = re.compile(r"[0-9A-Za-z]{0,32}")
_SWEEP_DEADLINE = 60.0  # seconds a start's sweep of deleted keys may take
#: Seconds a reservation holds without renewal: how long a dead node's requests hold on.
DEFAULT_LEASE = 60.0
#: Socket and connect timeout of the Redis connection: an unreachable Redis fails fast.
DEFAULT_TIMEOUT = 0.5
#: Seconds a key's data stays in Redis after its last use, beyond its longest window.
IDLE_TTL = 86400

# Metric codes as the scripts know them (``value`` in opulon/lua/common.lua).
_CODES = {"requests": 0, "tokens": 1, "input_tokens": 2, "output_tokens": 3}
_REQUESTS = 0
_ADMITTED, _REFUSED, _NEEDS_SEED = 0, 1, 2  # what a reply's first word says
_WINDOW, _TOO_LARGE, _BUDGET, _CONCURRENCY = 1, 2, 3, 4  # a refusal's kind, its second
_NONE = b"-"  # a reply's word for "none"
_SEED_ATTEMPTS = 3
_MAX_UNSETTLED = 10_000
# What counts as Redis being unavailable (as opposed to a bug in a script).
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    OutOfMemoryError,
    OSError,
    TimeoutError,
)


class _Call:
    """A script call on its way: what to send, its caller's future, when to give up."""

    __slots__ = ("args", "deadline", "future", "keys", "reloaded", "resent", "script")

    def __init__(
        self, script: AsyncScript, keys: list[str], args: list[Any], future: Future[Any]
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.future = future
        self.deadline = 0.0  # the event loop's time its batch fails at (0: not sent yet)
        self.resent = False  # sent again after a lost connection
        self.reloaded = False  # sent again after NOSCRIPT


class _Load:
    """A SCRIPT LOAD sent ahead of a call that Redis answered NOSCRIPT."""

    __slots__ = ("script",)

    def __init__(self, script: AsyncScript) -> None:
        self.script = script


class _Link:
    """The limiter's own connection: what was written on it, in order, awaits its reply."""

    __slots__ = ("closed", "conn", "loading", "reader", "waiting", "writer")

    def __init__(self, conn: AbstractConnection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer
        self.waiting: deque[_Call | _Load] = deque()
        self.loading: set[AsyncScript] = set()  # scripts whose SCRIPT LOAD is on its way
        self.reader: asyncio.Task[None] | None = None
        self.closed = False


class SharedLimiterUnavailable(OpulonError):
    """The shared limiter's Redis cannot be reached, so no request can be admitted exactly."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"the shared limiter's Redis at {url} cannot be reached: {reason}")
        self.url = url
        self.reason = reason


class HistorySource(Protocol):
    """Where a key's stored usage is read back from (the usage store's two reads).

    Called on the event loop, rarely: the first time a key is used after Redis lost its
    state, or a limit was added. An implementation may write its own waiting rows first.
    """

    def window_history(self, key_id: int, since: float) -> list[tuple[float, int, int]]:
        """(timestamp, input tokens, output tokens) of the key's requests since ``since``."""
        ...

    def lifetime_usage(self, key_id: int) -> Usage:
        """Everything the key has used."""
        ...


def stored_usage(
    source: HistorySource, key_id: int, windows: Sequence[int], budget: bool, now: float
) -> tuple[list[tuple[float, int, int]], Usage]:
    """What a key's windows (their lengths) and budget need of its stored usage: its rows
    since the longest window began, and its lifetime totals where it has a budget."""
    events = source.window_history(key_id, now - max(windows)) if windows else []
    lifetime = source.lifetime_usage(key_id) if budget else Usage(0)
    return events, lifetime


class AsyncLimiter(Protocol):
    """What both engines offer the runtime: the in-memory one and the shared one."""

    def configure(
        self, key_id: int, limits: Sequence[Limit], concurrency: int | None, *, tag: str = ""
    ) -> bool:
        """Set a key's limits; True when the caller must :meth:`load_history` for it.

        ``tag`` tells this key from an earlier one with the same id (a store that reuses the
        id of a deleted key): its shared counts are the new key's own."""
        ...

    async def load_history(
        self, key_id: int, events: Iterable[tuple[float, int, int]], lifetime: Usage
    ) -> None:
        """Rebuild a key's windows and lifetime totals from stored usage."""

    async def forget(self, key_id: int) -> None:
        """Drop a deleted key."""

    def keys(self) -> set[int]:
        """The keys configured."""
        ...

    async def admit(
        self, key_id: int, expected: Usage, *, flexible_output: bool = False
    ) -> Ticket | Refusal:
        """Reserve the expected cost of a request, or say why not."""
        ...

    async def settle(self, ticket: Ticket, actual: Usage) -> None:
        """Replace a reservation by what the request used; never raises for the engine."""

    async def in_flight(self, key_id: int) -> int:
        """Requests of the key admitted and not yet settled."""
        ...

    async def states(self, key_id: int) -> list[LimitState]:
        """Every limit of the key with what is used and left."""
        ...

    def tightest(self, key_id: int, *, fresh: bool = False) -> Tightest | None:
        """The key's tightest windows as of its last admission here, for rate-limit headers."""
        ...

    async def summary(self, key_id: int) -> Tightest | None:
        """The key's tightest windows now."""
        ...

    async def renew(self) -> int:
        """Extend the leases of this node's requests in flight; how many were extended."""
        ...

    async def keep_leases(self) -> None:
        """Renew the leases periodically until cancelled (returns at once without leases)."""

    async def close(self) -> None:
        """Release connections."""


class LocalLimiter:
    """The in-memory :class:`~opulon.limiter.Limiter` behind the asynchronous interface."""

    def __init__(self, limiter: Limiter | None = None) -> None:
        self.limiter = limiter or Limiter()

    def configure(
        self, key_id: int, limits: Sequence[Limit], concurrency: int | None, *, tag: str = ""
    ) -> bool:
        return self.limiter.configure(key_id, limits, concurrency)

    async def load_history(
        self, key_id: int, events: Iterable[tuple[float, int, int]], lifetime: Usage
    ) -> None:
        self.limiter.load_history(key_id, events, lifetime)

    async def forget(self, key_id: int) -> None:
        self.limiter.forget(key_id)

    def keys(self) -> set[int]:
        return self.limiter.keys()

    async def admit(
        self, key_id: int, expected: Usage, *, flexible_output: bool = False
    ) -> Ticket | Refusal:
        return self.limiter.admit(key_id, expected, flexible_output=flexible_output)

    async def settle(self, ticket: Ticket, actual: Usage) -> None:
        self.limiter.settle(ticket, actual)

    async def in_flight(self, key_id: int) -> int:
        return self.limiter.in_flight(key_id)

    async def states(self, key_id: int) -> list[LimitState]:
        return self.limiter.states(key_id)

    def tightest(self, key_id: int, *, fresh: bool = False) -> Tightest | None:
        return self.limiter.tightest(key_id, fresh=fresh)

    async def summary(self, key_id: int) -> Tightest | None:
        return self.limiter.tightest(key_id, fresh=True)

    async def renew(self) -> int:
        return 0

    async def keep_leases(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass(slots=True, eq=False)
class SharedTicket(Ticket):
    """A reservation held in Redis: a :class:`~opulon.limiter.Ticket` with its id there."""

    ticket_id: str = ""


def redacted_url(url: str) -> str:
    """``url`` without its password (nor a ``?password=`` parameter), fit for a message or a
    log line."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a Redis URL that cannot be read)"
    if parts.query:
        parts = parts._replace(query=redact_query(parts.query))
    if parts.password is None:
        return urlunsplit(parts)
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" if user else f"***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def fold_events(
    seconds: int, events: Iterable[tuple[float, int, int]], now: float
) -> list[tuple[float, float, int, int, int]]:
    """Stored rows as a window of ``seconds`` holds them: entries (start, ts, r, i, o).

    Rows (timestamp, input, output) count one request each; those that have left the window
    at ``now`` are skipped; the rest fold exactly as :class:`opulon.limiter.Limiter` folds
    them (into the newest entry when within the resolution of its first event), so a seed
    sends at most about :data:`~opulon.limiter.RESOLUTION_DIVISOR` entries per window.
    """
    resolution = seconds / RESOLUTION_DIVISOR
    entries: list[list[Any]] = []
    for ts, input_tokens, output_tokens in sorted(events, key=lambda row: row[0]):
        if now - ts >= seconds:
            continue
        if entries:
            last = entries[-1]
            if ts - last[0] <= resolution or ts <= last[1]:
                if ts > last[1]:
                    last[1] = ts
                last[2] += 1
                last[3] += input_tokens
                last[4] += output_tokens
                continue
        entries.append([ts, ts, 1, input_tokens, output_tokens])
    return [(e[0], e[1], e[2], e[3], e[4]) for e in entries]


class _Config:
    """One key's limits as the scripts take them, computed once per configuration."""

    __slots__ = (
        "concurrency",
        "has_budget",
        "key_id",
        "keys",
        "limit_text",
        "limits",
        "prefix",
        "windows",
    )

    def __init__(
        self,
        root: str,
        key_id: int,
        limits: Sequence[Limit],
        concurrency: int | None,
        tag: str = "",
    ) -> None:
        self.key_id = key_id
        self.limits = tuple(limits)
        self.concurrency = concurrency
        self.prefix = f"{root}{{k{key_id}.{tag}}}:" if tag else f"{root}{{k{key_id}}}:"
        self.windows = tuple(
            sorted({lim.window_seconds for lim in limits if lim.window_seconds is not None})
        )
        self.has_budget = any(lim.window_seconds is None for lim in limits)
        # The one key declared, for Redis Cluster's routing: the scripts reach the key's
        # other data under the same hash tag, so in the same slot.
        self.keys = [self.prefix + "m"]
        self.limit_text = " ".join(
            f"{_CODES[lim.metric]} {lim.amount} {lim.window_seconds or 0}" for lim in self.limits
        )


class RedisLimiter:
    """Rolling windows, lifetime budgets and concurrency of every key, shared through Redis.

    ``history`` reads a key's stored usage when Redis lacks its state; ``clock`` is the
    node's clock (see the module's note on clocks); ``prefix`` starts every Redis key name
    (no braces: the hash tag follows it); ``lease`` is how long a reservation holds without
    :meth:`renew`; ``summary_max_age``: how long the tightest windows kept from an admission
    serve the rate-limit headers before the next admission's replace them.
    """

    def __init__(
        self,
        redis: Redis,
        history: HistorySource,
        *,
        url: str = "redis://",
        clock: Callable[[], float] = time.time,
        prefix: str = "opulon:",
        lease: float = DEFAULT_LEASE,
        deadline: float = 2.0,
        summary_max_age: float = 0.0,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix {prefix!r} may not contain braces")
        if lease <= 0:
            raise ValueError(f"the lease must be positive, not {lease}")
        self.redis = redis
        self._history = history
        self.url = redacted_url(url)
        self.clock = clock
        self.prefix = prefix
        self.lease = lease
        self._deadline = deadline
        self._summary_max_age = summary_max_age
        self._configs: dict[int, _Config] = {}
        self._tags: dict[int, str] = {}  # the last tag each key id was configured with
        self._summaries: dict[int, Tightest] = {}
        self._open: dict[str, SharedTicket] = {}  # this node's reservations, for renewal
        # Settlements that failed, tried again with the next renewal (at most _MAX_UNSETTLED).
        self._unsettled: dict[str, tuple[SharedTicket, Usage]] = {}
        # Settlements of this turn of the event loop, by key, sent together at its end.
        self._settling: dict[int, list[tuple[SharedTicket, Usage, Future[Any]]]] = {}
        self._node = os.urandom(6).hex()
        self._serial = itertools.count(1)
        self._failing = False
        self._queue: list[_Call] = []  # script calls waiting for the end of this turn
        # The script calls' own connection (see _queued), made on first use.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._pending: list[_Call] = []  # calls waiting for the connection to be made
        self._connecting: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the oldest call's deadline
        self._admit = self._script(redis, "admit")
        self._settle = self._script(redis, "settle")
        self._seed = self._script(redis, "seed")
        self._peek = self._script(redis, "peek")
        self._forget = self._script(redis, "forget")
        self._renew = self._script(redis, "renew")

    @classmethod
    def from_url(
        cls,
        url: str,
        history: HistorySource,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> RedisLimiter:
        """A limiter on its own connection pool to ``url`` (``redis://`` or ``rediss://``).

        Connecting waits at most ``timeout`` seconds, and a failed call is tried once more
        (every script is safe to run twice), so an unreachable Redis is reported within about
        a second. The script calls go on a connection of the limiter's own, made by the
        pool (AUTH, TLS and the database as for any other), written a turn of the event loop
        at a time and answered in order; one timer watches the oldest call's deadline, not
        one per reply in the client: the client's per-command machinery cost more CPU than
        anything else on the client's side.
        """
        client = Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, history, url=url, **options)

    @staticmethod
    def _script(redis: Redis, name: str) -> AsyncScript:
        # Loaded with SCRIPT LOAD and called with EVALSHA; redis-py loads it again on
        # NOSCRIPT (after a Redis restart or SCRIPT FLUSH).
        folder = resources.files("opulon") / "lua"
        source = (folder / "common.lua").read_text() + (folder / f"{name}.lua").read_text()
        return redis.register_script(source)

    # -- configuration ---------------------------------------------------------------

    def configure(
        self, key_id: int, limits: Sequence[Limit], concurrency: int | None, *, tag: str = ""
    ) -> bool:
        """Set or replace a key's limits and maximum concurrency, on this node (``tag``: see
        :meth:`AsyncLimiter.configure`).

        Returns ``False``: Redis asks for the stored history itself when it lacks some
        (through the ``history`` source), so the caller never needs to load it.
        """
        for limit in limits:
            if limit.metric not in _CODES:
                raise ValueError(f"unknown metric {limit.metric!r} in limit {limit}")
            if limit.window_seconds is not None and limit.window_seconds <= 0:
                raise ValueError(f"window of limit {limit} must be positive")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"a key's tag is letters and digits, not {tag!r}")
        self._tags[key_id] = tag
        self._configs[key_id] = _Config(self.prefix, key_id, limits, concurrency, tag)
        self._summaries.pop(key_id, None)
        return False

    async def load_history(
        self, key_id: int, events: Iterable[tuple[float, int, int]], lifetime: Usage
    ) -> None:
        """Replace the key's windows and lifetime totals in Redis by stored usage.

        As :meth:`opulon.limiter.Limiter.load_history`: the reservations of requests in
        flight (on any node) are kept. Not needed in normal operation (Redis seeds what it
        lacks); it overwrites what other nodes counted and have not written yet.
        """
        config = self._config(key_id)
        await self._seed_key(config, config.windows, config.has_budget, events, lifetime, True)

    async def forget(self, key_id: int) -> None:
        """Drop the key here and its data in Redis; its open tickets settle as no-ops."""
        config = self._configs.pop(key_id, None) or self._config(key_id)
        self._summaries.pop(key_id, None)
        for ticket_id, ticket in list(self._open.items()):
            if ticket.key_id == key_id:
                del self._open[ticket_id]
        await self._call(self._forget, config.keys, [config.prefix, repr(self.clock())])

    async def sweep(self, live: dict[int, str]) -> int:
        """Delete what Redis keeps of keys that no longer exist; how many names went.

        ``live`` maps each existing key's id to its tag (see :meth:`configure`). A key
        deleted while no node ran was never forgotten: its counts would stay until they
        expire. Names of ids above every live id are left alone (a key created meanwhile).
        """
        if not live:
            return 0
        newest = max(live)
        pattern = f"{self.prefix}{{k*"
        stale: list[str] = []
        async with asyncio.timeout(_SWEEP_DEADLINE):
            names = [raw async for raw in self.redis.scan_iter(match=pattern, count=1000)]
        for raw in names:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            tag_start, tag_end = name.find("{k"), name.find("}")
            if tag_start < 0 or tag_end < tag_start:
                continue
            key_id_text, _, tag = name[tag_start + 2 : tag_end].partition(".")
            if not key_id_text.isdigit():
                continue
            key_id = int(key_id_text)
            if key_id <= newest and live.get(key_id) != tag:
                stale.append(name)
        for first in range(0, len(stale), 500):
            await self._call_command(self.redis.unlink(*stale[first : first + 500]))
        return len(stale)

    def keys(self) -> set[int]:
        """Keys configured on this node."""
        return set(self._configs)

    def limits_of(self, key_id: int) -> tuple[Limit, ...]:
        """The key's limits as configured on this node (none for a key never configured)."""
        config = self._configs.get(key_id)
        return () if config is None else config.limits

    # -- the request path ----------------------------------------------------------------

    async def admit(
        self, key_id: int, expected: Usage, *, flexible_output: bool = False
    ) -> Ticket | Refusal:
        """Admit a request and reserve its expected cost, or say why not, in one script.

        Semantics as :meth:`opulon.limiter.Limiter.admit`, across every node. Raises
        :class:`SharedLimiterUnavailable` when Redis cannot be reached.
        """
        config = self._config(key_id)
        ticket_id = f"{self._node}.{next(self._serial)}"
        for _ in range(_SEED_ATTEMPTS):
            now = self.clock()
            args = [
                config.prefix,
                repr(now),
                ticket_id,
                f"{expected.requests} {expected.input_tokens} {expected.output_tokens}",
                1 if flexible_output else 0,
                config.concurrency or 0,
                repr(now + self.lease),
                self._ttl(config),
                config.limit_text,
            ]
            reply = (await self._call(self._admit, config.keys, args)).split()
            status = int(reply[0])
            if status == _NEEDS_SEED:
                await self._seed_missing(config, reply)
                continue
            if status == _ADMITTED:
                self._remember(key_id, config, reply, 3, now, fresh=False)
                reserved = Usage(expected.requests, expected.input_tokens, _count(reply[1]))
                ticket = SharedTicket(key_id, reserved, now, ticket_id=ticket_id)
                self._open[ticket_id] = ticket
                return ticket
            self._remember(key_id, config, reply, 7, now)
            return self._refusal(config, reply)
        raise SharedLimiterUnavailable(self.url, "the key's state could not be rebuilt")

    async def settle(self, ticket: Ticket, actual: Usage) -> None:
        """Replace a reservation by the request's real usage; a second call does nothing.

        Never raises for Redis: a failure is logged and the settlement tried again with the
        next :meth:`renew` (if Redis stays away longer than the lease, the reservation runs
        out meanwhile and the late settlement counts what the request used).
        """
        if not isinstance(ticket, SharedTicket) or ticket.settled:
            return
        ticket.settled = True
        self._open.pop(ticket.ticket_id, None)
        try:
            await self._settle_soon(ticket, actual)
        except SharedLimiterUnavailable:  # logged by the call
            if len(self._unsettled) < _MAX_UNSETTLED:
                self._unsettled[ticket.ticket_id] = (ticket, actual)
        except Exception as exc:  # any other reply (MISCONF, BUSY, a script error): again later
            log.error("a settlement failed and will be tried again: %s", type(exc).__name__)
            if len(self._unsettled) < _MAX_UNSETTLED:
                self._unsettled[ticket.ticket_id] = (ticket, actual)

    def _settle_soon(self, ticket: SharedTicket, actual: Usage) -> Future[Any]:
        """The settlement, made with the others of its key in this turn of the event loop:
        one script call for all of them (a busy key's answers often end together)."""
        loop = asyncio.get_running_loop()
        future: Future[Any] = loop.create_future()
        if not self._settling:
            loop.call_soon(self._send_settlements)
        self._settling.setdefault(ticket.key_id, []).append((ticket, actual, future))
        return future

    def _send_settlements(self) -> None:
        batches, self._settling = self._settling, {}
        for key_id, items in batches.items():
            config = self._config(key_id)
            args = self._settle_args(config, [(ticket, actual) for ticket, actual, _ in items])
            sent = self._queued(self._settle, config.keys, args)
            sent.add_done_callback(partial(self._settlements_done, [f for *_, f in items]))

    def _settlements_done(self, waiting: list[Future[Any]], sent: Future[Any]) -> None:
        error = None if sent.cancelled() else sent.exception()
        if sent.cancelled():
            error = SharedLimiterUnavailable(self.url, "the settlement was cancelled")
        elif isinstance(error, _UNAVAILABLE):
            error = self._unavailable(error)
        elif error is None:
            self._reachable()
        for future in waiting:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def _settle_args(
        self, config: _Config, items: Sequence[tuple[SharedTicket, Usage]]
    ) -> list[Any]:
        args: list[Any] = [config.prefix, repr(self.clock()), self._ttl(config)]
        for ticket, actual in items:
            args.append(
                f"{ticket.ticket_id} {ticket.at!r} {actual.requests} {actual.input_tokens} "
                f"{actual.output_tokens}"
            )
        return args

    async def renew(self) -> int:
        """Extend the lease of every request this node has in flight, in one round trip.

        A request whose reservation Redis lost (a restart, or its lease ran out although
        this node lives) is reserved again at its moment and takes its concurrency slot
        back, so limits are exact again within a renewal of a Redis restart. Returns how many
        leases were extended or restored. Raises :class:`SharedLimiterUnavailable`.
        """
        if not self._open and not self._unsettled:
            return 0
        now = self.clock()
        by_key: dict[int, list[str]] = {}
        for ticket_id, ticket in self._open.items():
            reserved = ticket.reserved
            by_key.setdefault(ticket.key_id, []).append(
                f"{ticket_id} {ticket.at!r} {reserved.requests} {reserved.input_tokens} "
                f"{reserved.output_tokens}"
            )
        pipe = self.redis.pipeline(transaction=False)
        unsettled = list(self._unsettled.items())
        by_key_settled: dict[int, list[tuple[SharedTicket, Usage]]] = {}
        for _, (ticket, actual) in unsettled:
            by_key_settled.setdefault(ticket.key_id, []).append((ticket, actual))
        for key_id, items in by_key_settled.items():
            config = self._config(key_id)
            args = self._settle_args(config, items)
            await self._settle(keys=config.keys, args=args, client=pipe)
        for key_id, tickets in by_key.items():
            config = self._config(key_id)
            args = [config.prefix, repr(now), repr(now + self.lease), self._ttl(config)]
            await self._renew(keys=config.keys, args=args + tickets, client=pipe)
        results = await self._call_pipeline(pipe)
        for ticket_id, _ in unsettled:
            del self._unsettled[ticket_id]
        return sum(int(n) for n in results[len(by_key_settled) :])

    async def keep_leases(self) -> None:
        """Renew this node's leases every third of a lease, until cancelled.

        A failed renewal is logged and tried again a third of a lease later, so one failure
        costs no lease; the reservations of this node run out only if Redis stays
        unreachable for two thirds of a lease.
        """
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.renew()
            except SharedLimiterUnavailable:
                pass  # logged by the call
            except Exception as exc:
                log.error("renewing the leases failed: %s", type(exc).__name__)

    # -- reporting -------------------------------------------------------------------------

    async def in_flight(self, key_id: int) -> int:
        """Requests of this key admitted on any node, not settled, with a live lease."""
        config = self._config(key_id)
        bound = f"({self.clock()!r}"
        result = await self._call_command(self.redis.zcount(config.prefix + "l", bound, "+inf"))
        return int(result)

    async def states(self, key_id: int) -> list[LimitState]:
        """Every limit of the key, windows and budget, in configured order."""
        config = self._configs.get(key_id)
        if config is None or not config.limits:
            return []
        now, reply = await self._peek_key(config)
        self._remember(key_id, config, reply, 2, now)
        return self._states(config, reply, 2, now)

    def tightest(self, key_id: int, *, fresh: bool = False) -> Tightest | None:
        """The key's tightest windows as of its last admission or refusal on this node.

        Each admission's reply carries them, so rate-limit headers need no second round
        trip; ``fresh`` changes nothing (they are as fresh as the admission just made).
        """
        return self._summaries.get(key_id)

    async def summary(self, key_id: int) -> Tightest | None:
        """The key's tightest windows now, read from Redis; None when it has no window."""
        config = self._configs.get(key_id)
        if config is None or not config.windows:
            return None
        now, reply = await self._peek_key(config)
        return self._remember(key_id, config, reply, 2, now)

    async def server(self) -> tuple[str, float]:
        """Redis's version and one round trip's seconds, for ``opulon doctor`` and health
        checks; raises :class:`SharedLimiterUnavailable`."""
        info = await self._call_command(self.redis.info("server"))
        started = time.perf_counter()
        await self._call_command(self.redis.ping())
        return str(info.get("redis_version", "unknown")), time.perf_counter() - started

    async def close(self) -> None:
        """Let the calls on their way finish (within the deadline), then close the script
        calls' connection and the connection pool."""
        waiting = [call.future for call in self._outstanding()]
        waiting += [future for items in self._settling.values() for *_, future in items]
        if waiting:
            await asyncio.wait(waiting, timeout=self._deadline)
        if self._loop is asyncio.get_running_loop():
            link = self._link
            self._fail_all(RedisConnectionError("the shared limiter was closed"))
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if link is not None and link.reader is not None:
                await asyncio.wait([link.reader], timeout=self._deadline)
        await self.redis.aclose()

    # -- internals -------------------------------------------------------------------------

    def _config(self, key_id: int) -> _Config:
        config = self._configs.get(key_id)
        if config is None:
            # A key never configured has no limits, but its requests in flight still count.
            config = _Config(self.prefix, key_id, (), None, self._tags.get(key_id, ""))
        return config

    def _ttl(self, config: _Config) -> int:
        longest = config.windows[-1] if config.windows else 0
        return int((longest + IDLE_TTL + self.lease) * 1000)

    async def _peek_key(self, config: _Config) -> tuple[float, list[Any]]:
        for _ in range(_SEED_ATTEMPTS):
            now = self.clock()
            args = [config.prefix, repr(now), config.limit_text]
            reply = (await self._call(self._peek, config.keys, args)).split()
            if int(reply[0]) != _NEEDS_SEED:
                return now, reply
            await self._seed_missing(config, reply)
        raise SharedLimiterUnavailable(self.url, "the key's state could not be rebuilt")

    async def _seed_missing(self, config: _Config, reply: list[Any]) -> None:
        """Seed what a script found missing (``{2, budget?, window lengths...}``)."""
        budget = reply[1] == b"1"
        windows = tuple(int(seconds) for seconds in reply[2:])
        # The store is read in a thread: a long history (or a slow database) holds up this
        # key's admission, not the event loop.
        events, lifetime = await asyncio.to_thread(
            stored_usage, self._history, config.key_id, windows, budget, self.clock()
        )
        await self._seed_key(config, windows, budget, events, lifetime, False)

    async def _seed_key(
        self,
        config: _Config,
        windows: Sequence[int],
        budget: bool,
        events: Iterable[tuple[float, int, int]],
        lifetime: Usage,
        replace: bool,
    ) -> None:
        rows = list(events)
        now = self.clock()
        args: list[Any] = [
            config.prefix,
            repr(now),
            1 if replace else 0,
            self._ttl(config),
            1 if budget else 0,
            lifetime.requests,
            lifetime.input_tokens,
            lifetime.output_tokens,
            len(windows),
        ]
        for seconds in windows:
            entries = fold_events(seconds, rows, now)
            args += [seconds, len(entries)]
            for start, ts, requests, input_tokens, output_tokens in entries:
                args += [repr(start), repr(ts), requests, input_tokens, output_tokens]
        await self._call(self._seed, config.keys, args)

    def _remember(
        self,
        key_id: int,
        config: _Config,
        reply: list[Any],
        first: int,
        now: float,
        *,
        fresh: bool = True,
    ) -> Tightest | None:
        """Keep the tightest windows a script's reply describes (states from ``first``);
        without ``fresh``, a summary kept less than ``summary_max_age`` ago stays (as the
        in-memory limiter's does)."""
        if not fresh:
            kept = self._summaries.get(key_id)
            if kept is not None and 0 <= now - kept.built_at < self._summary_max_age:
                return kept
        summary = _tightest(config.limits, reply, first, now)
        if summary is not None:
            self._summaries[key_id] = summary
        return summary

    @staticmethod
    def _states(config: _Config, reply: list[Any], first: int, now: float) -> list[LimitState]:
        states: list[LimitState] = []
        for k, limit in enumerate(config.limits):
            used = _count(reply[first + 2 * k])
            oldest = reply[first + 2 * k + 1]
            states.append(limit_state(limit, used, None if oldest == _NONE else float(oldest), now))
        return states

    @staticmethod
    def _refusal(config: _Config, reply: list[Any]) -> Refusal:
        kind = int(reply[1])
        if kind == _CONCURRENCY:
            return concurrency_refusal(config.concurrency or 0)
        limit = config.limits[int(reply[2]) - 1]
        used, cost = _count(reply[4]), _count(reply[5])
        if kind == _BUDGET:
            return budget_refusal(limit, used, cost)
        if kind == _TOO_LARGE:
            return too_large_refusal(limit, cost)
        return window_refusal(limit, float(reply[3]))

    async def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        # The deadline is the batch's (see _send_queue): one timer per round trip at most.
        try:
            result = await self._queued(script, keys, args)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        except ResponseError as exc:  # BUSY, MISCONF, a script's error: no exact answer
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            log.error("the shared limiter's Redis answered with an error: %s", reason)
            raise SharedLimiterUnavailable(self.url, f"Redis answered: {reason}") from exc
        self._reachable()
        return result

    def _queued(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Future[Any]:
        """A script call, sent with the others made in the same turn of the event loop.

        The calls of one turn go to Redis in one write on the limiter's own connection, and
        their replies are read in order by one reader: no task, pool checkout nor timer per
        call. Each script stays atomic on its own, so nothing else changes.
        """
        loop = asyncio.get_running_loop()
        future: Future[Any] = loop.create_future()
        self._queue.append(_Call(script, keys, args, future))
        if len(self._queue) == 1:
            loop.call_soon(self._send_queue)
        return future

    def _send_queue(self) -> None:
        calls, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or used again from another event loop
            self._reset(loop)
        deadline = loop.time() + self._deadline
        for call in calls:
            call.deadline = deadline
        self._dispatch(calls)

    def _dispatch(self, calls: list[_Call]) -> None:
        """Write the calls on the connection, or keep them until it is made."""
        link = self._link
        if link is not None:
            self._write(link, calls)
            return
        self._pending += calls
        self._arm(calls)
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def _write(self, link: _Link, items: Sequence[_Call | _Load]) -> None:
        commands: list[tuple[Any, ...]] = []
        for item in items:
            script = item.script
            if isinstance(item, _Load):
                commands.append(("SCRIPT", "LOAD", script.script))
            else:
                commands.append(("EVALSHA", script.sha, len(item.keys), *item.keys, *item.args))
        try:
            # hiredis's packer (C) takes a seventh of the time of redis-py's own (Python).
            packed = [pack_command(command) for command in commands]
        except Exception as exc:  # an argument Redis cannot take: those calls fail alone
            for item in items:
                if isinstance(item, _Call) and not item.future.done():
                    item.future.set_exception(exc)
            return
        link.waiting += items
        try:
            link.writer.writelines(packed)
        except Exception as exc:  # the connection is closing
            self._lost(link, RedisConnectionError(f"writing to Redis failed: {exc}"))
            return
        if self._timer is None:
            self._arm([item for item in items if isinstance(item, _Call)])

    async def _connect(self) -> None:
        """Make the connection the calls waiting for it go on (AUTH, TLS, the database and
        the protocol as the client's pool makes them), then write them."""
        pool = self.redis.connection_pool
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            writer = conn._writer  # the stream the batches are written to at once
            if writer is None:
                raise RedisConnectionError("the connection closed as it was made")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            if self._connecting is asyncio.current_task():
                self._connecting = None
                pending, self._pending = self._pending, []
                for call in pending:
                    if call.future.done():
                        continue
                    if isinstance(exc, Exception):
                        call.future.set_exception(exc)
                    else:
                        call.future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        self._connecting = None
        link = _Link(conn, writer)
        link.reader = asyncio.get_running_loop().create_task(self._read(link))
        self._link = link
        pending, self._pending = self._pending, []
        self._write(link, [call for call in pending if not call.future.done()])

    async def _read(self, link: _Link) -> None:
        """Hand each reply to the call it answers (Redis replies in order), until the
        connection fails or is dropped."""
        conn, waiting = link.conn, link.waiting
        try:
            while True:
                try:
                    reply = await conn.read_response(
                        disable_decoding=True, disconnect_on_error=False
                    )
                except ResponseError as exc:  # an error reply: its call's alone
                    reply = exc
                if not waiting:
                    raise RedisConnectionError("Redis sent a reply no call waited for")
                self._answer(link, waiting.popleft(), reply)
                if link.closed:
                    break
        except asyncio.CancelledError:
            pass  # dropped (see _lost) or closed
        except Exception as exc:
            self._lost(link, exc)
        finally:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    def _answer(self, link: _Link, item: _Call | _Load, reply: Any) -> None:
        if isinstance(item, _Load):
            link.loading.discard(item.script)
            return  # a failed load shows in the call sent after it
        future = item.future
        if future.done():  # its caller gave up waiting
            return
        if isinstance(reply, NoScriptError) and not item.reloaded:
            # Redis restarted or its scripts were flushed: load the script (once for the
            # calls answered so), then call again behind it on the same connection.
            item.reloaded = True
            items: list[_Call | _Load] = []
            if item.script not in link.loading:
                link.loading.add(item.script)
                items.append(_Load(item.script))
            items.append(item)
            self._write(link, items)
        elif isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _lost(self, link: _Link, exc: Exception) -> None:
        """Drop a failed connection: the calls it had sent are sent once more on a new one
        (every script is safe to run twice), or fail if they were sent twice already."""
        if link.closed:
            return
        self._close_link(link)
        again: list[_Call] = []
        for item in link.waiting:
            if isinstance(item, _Load) or item.future.done():
                continue
            if item.resent:
                item.future.set_exception(exc)
            else:
                item.resent = True
                item.reloaded = False  # the new connection may find the scripts gone too
                again.append(item)
        link.waiting.clear()
        if again:
            self._dispatch(again)

    def _close_link(self, link: _Link) -> None:
        link.closed = True
        if self._link is link:
            self._link = None
        reader = link.reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()  # it disconnects

    def _arm(self, calls: Sequence[_Call]) -> None:
        """Watch the calls' deadline, unless a timer already watches older calls."""
        if self._timer is None and calls:
            when = min(call.deadline for call in calls)
            self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _outstanding(self) -> list[_Call]:
        """Every call sent or about to be, not answered yet."""
        calls = self._queue + self._pending
        if self._link is not None:
            calls += [item for item in self._link.waiting if isinstance(item, _Call)]
        return [call for call in calls if not call.future.done()]

    def _expire(self) -> None:
        """The timer of the oldest call: past its deadline, Redis (or the network) stalls,
        and every call waiting behind it on the connection with it: all fail, and the
        connection is dropped; else the timer moves on to the oldest call left."""
        self._timer = None
        calls = [call for call in self._outstanding() if call.deadline]
        if not calls:
            return
        oldest = min(call.deadline for call in calls)
        loop = asyncio.get_running_loop()
        if oldest > loop.time():
            self._timer = loop.call_at(oldest, self._expire)
            return
        self._fail_all(TimeoutError(f"Redis did not answer within {self._deadline:g} s"))

    def _fail_all(self, exc: Exception) -> None:
        """Fail every call sent or waiting for the connection, and drop it."""
        calls = [call for call in self._outstanding() if call.deadline]
        if self._link is not None:
            self._link.waiting.clear()
            self._close_link(self._link)
        self._pending = []
        if self._connecting is not None:
            self._connecting.cancel()  # it disconnects
            self._connecting = None
        for call in calls:
            call.future.set_exception(exc)

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        """Forget the connection of another event loop (nothing of it can be used here); its
        calls still waiting fail."""
        gone = RedisConnectionError("the shared limiter moved to another event loop")
        for call in self._pending:
            if not call.future.done() and not call.future.get_loop().is_closed():
                call.future.get_loop().call_soon_threadsafe(_fail, call.future, gone)
        self._loop = loop
        self._link = None
        self._pending = []
        self._connecting = None
        self._timer = None

    async def _call_command(self, command: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                result = await command
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        self._reachable()
        return result

    async def _call_pipeline(self, pipe: Any) -> list[Any]:
        async with pipe:
            result: list[Any] = await self._call_command(pipe.execute())
        return result

    def _unavailable(self, exc: BaseException) -> SharedLimiterUnavailable:
        reason = str(exc) or type(exc).__name__
        error = SharedLimiterUnavailable(self.url, reason)
        if not self._failing:
            self._failing = True
            log.error("%s", error)
        return error

    def _reachable(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("the shared limiter's Redis at %s is reachable again", self.url)


def _fail(future: Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _count(word: bytes) -> int:
    """A count in a script's reply: Lua writes numbers past 10^14 with an exponent."""
    try:
        return int(word)
    except ValueError:
        return int(float(word))


def _tightest(limits: Sequence[Limit], reply: list[Any], first: int, now: float) -> Tightest | None:
    """The tightest window of each metric, as :meth:`opulon.limiter.Limiter.tightest` picks.

    ``reply`` holds, from ``first``, (used, oldest usage or ``-``) per limit.
    """
    # Slots 0-3: the tightest window of each metric; slot 4: of any token metric.
    best: list[tuple[float, Limit, int, Any] | None] = [None] * 5
    has_window = False
    for k, limit in enumerate(limits):
        if limit.window_seconds is None:
            continue
        has_window = True
        code = _CODES[limit.metric]
        remaining = max(0, limit.amount - _count(reply[first + 2 * k]))
        ratio = remaining / limit.amount if limit.amount else 0.0
        for slot in (code,) if code == _REQUESTS else (code, 4):
            current = best[slot]
            if current is None or ratio < current[0]:
                best[slot] = (ratio, limit, remaining, reply[first + 2 * k + 1])
    if not has_window:
        return None
    uses: list[WindowUse | None] = []
    for chosen in best:
        if chosen is None:
            uses.append(None)
            continue
        _, limit, remaining, oldest = chosen
        seconds = limit.window_seconds or 0
        deadline = None if oldest == _NONE else float(oldest) + seconds
        uses.append(WindowUse(limit.amount, remaining, deadline))
    return Tightest(now, (), tuple(uses[:4]), uses[4])


class FallbackLimiter:
    """The shared limiter, or per-node limits while its Redis cannot be reached.

    For ``--on-redis-failure=local``: when an admission finds Redis unreachable, admissions
    use ``local`` (this node's counts only: inexact across nodes, and logged as such once per
    outage) and Redis is tried again every ``retry_every`` seconds. A key's local state is
    rebuilt from the stored usage the first time it is used in each outage, so
    :meth:`configure` never asks for history; configuration goes to both engines.
    """

    def __init__(
        self,
        shared: RedisLimiter,
        local: LocalLimiter,
        history: HistorySource,
        *,
        retry_every: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        self.local = local
        self._history = history
        self._retry_every = retry_every
        self._monotonic = monotonic
        self._down_until: float | None = None  # None while Redis answers
        self._fresh: set[int] = set()  # keys rebuilt locally during this outage
        self._outage_keys: set[int] = set()  # keys admitted locally, for Redis to learn of
        self._replaying = asyncio.Lock()

    @property
    def degraded(self) -> bool:
        """Whether admissions are per node right now."""
        return self._down_until is not None

    def configure(
        self, key_id: int, limits: Sequence[Limit], concurrency: int | None, *, tag: str = ""
    ) -> bool:
        self.shared.configure(key_id, limits, concurrency, tag=tag)
        self.local.configure(key_id, limits, concurrency)
        self._fresh.discard(key_id)
        return False

    async def load_history(
        self, key_id: int, events: Iterable[tuple[float, int, int]], lifetime: Usage
    ) -> None:
        """Rebuild the key's local state (Redis rebuilds its own when it lacks it)."""
        await self.local.load_history(key_id, events, lifetime)
        self._fresh.add(key_id)

    async def forget(self, key_id: int) -> None:
        await self.local.forget(key_id)
        # Redis keeps the data of a deleted key until its idle expiry if it is down now.
        with contextlib.suppress(SharedLimiterUnavailable):
            await self.shared.forget(key_id)

    def keys(self) -> set[int]:
        return self.local.keys()

    async def admit(
        self, key_id: int, expected: Usage, *, flexible_output: bool = False
    ) -> Ticket | Refusal:
        if self._worth_trying():
            try:
                if self._outage_keys:
                    await self._replay_outage()
                result = await self.shared.admit(key_id, expected, flexible_output=flexible_output)
            except SharedLimiterUnavailable as exc:
                self._went_down(exc)
            else:
                self._came_back()
                return result
        if key_id not in self._fresh:
            await self._rebuild_locally(key_id)
        self._outage_keys.add(key_id)
        return await self.local.admit(key_id, expected, flexible_output=flexible_output)

    async def _replay_outage(self) -> None:
        """Before counting through Redis again, give every key this node admitted on its own
        during the outage its shared counts from the stored rows, which hold what the outage
        used (on every node: each wrote its rows), so that none of it is admitted twice."""
        async with self._replaying:
            for key_id in sorted(self._outage_keys):
                limits = self.shared.limits_of(key_id)
                if limits:
                    events, lifetime = await self._stored(key_id, limits)
                    await self.shared.load_history(key_id, events, lifetime)
                self._outage_keys.discard(key_id)

    async def settle(self, ticket: Ticket, actual: Usage) -> None:
        if isinstance(ticket, SharedTicket):
            await self.shared.settle(ticket, actual)
        else:
            await self.local.settle(ticket, actual)

    async def in_flight(self, key_id: int) -> int:
        if self._worth_trying():
            with contextlib.suppress(SharedLimiterUnavailable):
                return await self.shared.in_flight(key_id)
        return await self.local.in_flight(key_id)

    async def states(self, key_id: int) -> list[LimitState]:
        if self._worth_trying():
            with contextlib.suppress(SharedLimiterUnavailable):
                return await self.shared.states(key_id)
        return await self.local.states(key_id)

    def tightest(self, key_id: int, *, fresh: bool = False) -> Tightest | None:
        if self._down_until is not None:
            return self.local.tightest(key_id, fresh=fresh)
        return self.shared.tightest(key_id, fresh=fresh)

    async def summary(self, key_id: int) -> Tightest | None:
        if self._worth_trying():
            with contextlib.suppress(SharedLimiterUnavailable):
                return await self.shared.summary(key_id)
        return await self.local.summary(key_id)

    async def renew(self) -> int:
        return await self.shared.renew()

    async def keep_leases(self) -> None:
        """Renew the shared limiter's leases until cancelled (see RedisLimiter.keep_leases)."""
        await self.shared.keep_leases()

    async def close(self) -> None:
        await self.shared.close()

    def _worth_trying(self) -> bool:
        """Whether to ask Redis: it answered last time, or the retry interval has passed."""
        return self._down_until is None or self._monotonic() >= self._down_until

    def _went_down(self, exc: SharedLimiterUnavailable) -> None:
        if self._down_until is None:
            log.error(
                "%s; admitting with this node's own counts until it is back: limits are "
                "per node and inexact meanwhile",
                exc,
            )
            self._fresh.clear()
        self._down_until = self._monotonic() + self._retry_every

    def _came_back(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            log.warning("limits are shared through Redis again (exact across nodes)")

    async def _rebuild_locally(self, key_id: int) -> None:
        events, lifetime = await self._stored(key_id, self.shared.limits_of(key_id))
        await self.local.load_history(key_id, events, lifetime)
        self._fresh.add(key_id)

    async def _stored(
        self, key_id: int, limits: Sequence[Limit]
    ) -> tuple[list[tuple[float, int, int]], Usage]:
        """The key's stored usage its limits need, read in a thread."""
        windows = [lim.window_seconds for lim in limits if lim.window_seconds is not None]
        budget = any(lim.window_seconds is None for lim in limits)
        return await asyncio.to_thread(
            stored_usage, self._history, key_id, windows, budget, self.shared.clock()
        )
