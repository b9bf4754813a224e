"""What only the shared limiter has: several nodes, leases, rebuilding, an unreachable Redis.

Every behaviour the two engines share is tested on both in tests/test_limiter.py. Here each
"node" is a :class:`~opulon.limiter_redis.RedisLimiter` of its own (its own connections),
and the nodes of a test share one Redis state under a prefix no other test uses, removed
afterwards. Time is a fake clock passed to every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from services import PrivateRedis, redis_url
from tcp_proxy import TcpRelay
from test_limiter import KEY, FakeClock, StoredUsage, new_prefix, remove_prefix

from opulon.limiter import Limiter, Refusal, Ticket
from opulon.limiter_redis import (
    FallbackLimiter,
    LocalLimiter,
    RedisLimiter,
    SharedLimiterUnavailable,
    SharedTicket,
    fold_events,
    redacted_url,
)
from opulon.limits import Limit, Usage, parse_budget, parse_limit


@pytest.fixture
def url() -> str:
    return redis_url()  # skips (fails under CI) where no Redis listens


@asynccontextmanager
async def nodes(
    url: str,
    count: int,
    limits: list[Limit],
    *,
    concurrency: int | None = None,
    clock: FakeClock | None = None,
    stored: list[StoredUsage] | None = None,
    lease: float = 60.0,
    summary_max_age: float = 0.0,
) -> AsyncIterator[list[RedisLimiter]]:
    """``count`` nodes sharing one Redis state, each with ``limits`` for :data:`KEY`."""
    prefix = new_prefix()
    clock = clock or FakeClock()
    sources = stored or [StoredUsage() for _ in range(count)]
    made = [
        RedisLimiter.from_url(
            url,
            sources[n],
            clock=clock,
            prefix=prefix,
            lease=lease,
            summary_max_age=summary_max_age,
        )
        for n in range(count)
    ]
    for node in made:
        node.configure(KEY, limits, concurrency)
    try:
        yield made
    finally:
        await remove_prefix(made[0])
        for node in made[1:]:
            await node.close()


def spec(*texts: str) -> list[Limit]:
    return [parse_limit(t) if "/" in t else parse_budget(t) for t in texts]


def tickets_of(results: list[Ticket | Refusal]) -> list[Ticket]:
    return [r for r in results if isinstance(r, Ticket)]


async def admit_on_both(
    pair: list[RedisLimiter], count: int, expected: Usage
) -> list[Ticket | Refusal]:
    """``count`` admissions at once, alternating between the two nodes."""
    return await asyncio.gather(*(pair[n % 2].admit(KEY, expected) for n in range(count)))


async def used(node: RedisLimiter, limit: str) -> int:
    wanted = spec(limit)[0]
    (state,) = [s for s in await node.states(KEY) if s.limit == wanted]
    return state.used


# -- several nodes admit exactly what one would -----------------------------------------------


def test_a_hundred_concurrent_requests_on_two_nodes_against_ten_per_minute_admit_ten(
    url: str,
) -> None:
    async def scenario() -> None:
        async with nodes(url, 2, spec("requests:10/1m")) as pair:
            results = await admit_on_both(pair, 100, Usage())
            admitted = tickets_of(results)
            assert len(admitted) == 10
            assert all(isinstance(t, SharedTicket) for t in admitted)
            refusals = [r for r in results if isinstance(r, Refusal)]
            assert {r.reason for r in refusals} == {"window"}
            assert {r.retry_after for r in refusals} == {60.0}
            assert await pair[0].in_flight(KEY) == await pair[1].in_flight(KEY) == 10
            assert await used(pair[1], "requests:10/1m") == 10

    asyncio.run(scenario())


def test_a_token_limit_across_two_nodes_admits_no_more_than_fits(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 2, spec("tokens:1000/1m")) as pair:
            results = await admit_on_both(pair, 40, Usage(1, 200, 100))
            admitted = tickets_of(results)
            assert len(admitted) == 3  # 3 x 300 reserved; a fourth would make 1200
            for ticket in admitted:
                await pair[1].settle(ticket, Usage(1, 150, 50))  # settled on the other node
            assert await used(pair[0], "tokens:1000/1m") == 600
            assert len(tickets_of(await admit_on_both(pair, 40, Usage(1, 200, 100)))) == 1

    asyncio.run(scenario())


def test_concurrency_three_holds_across_two_nodes(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 2, [], concurrency=3) as pair:
            results = await admit_on_both(pair, 20, Usage())
            admitted = tickets_of(results)
            assert len(admitted) == 3
            assert {r.reason for r in results if isinstance(r, Refusal)} == {"concurrency"}
            await pair[0].settle(admitted[0], Usage())
            assert await pair[1].in_flight(KEY) == 2
            assert len(tickets_of(await admit_on_both(pair, 20, Usage()))) == 1

    asyncio.run(scenario())


def test_a_budget_holds_across_two_nodes_and_counts_the_stored_lifetime(url: str) -> None:
    stores = [StoredUsage(), StoredUsage()]
    for store in stores:
        store.lifetime[KEY] = Usage(4, 3000, 1000)

    async def scenario() -> None:
        async with nodes(url, 2, spec("tokens:5000"), stored=stores) as pair:
            results = await admit_on_both(pair, 30, Usage(1, 60, 40))
            admitted = tickets_of(results)
            assert len(admitted) == 10  # 1000 left, 100 each
            budget = next(r for r in results if isinstance(r, Refusal))
            assert (budget.reason, budget.retry_after) == ("budget", None)
            for ticket in admitted[:4]:
                await pair[0].settle(ticket, Usage(1, 10, 15))  # 75 tokens back each
            assert await used(pair[1], "tokens:5000") == 4000 + 6 * 100 + 4 * 25
            assert len(tickets_of(await admit_on_both(pair, 30, Usage(1, 60, 40)))) == 3

    asyncio.run(scenario())


def test_a_settle_retried_on_another_connection_counts_once(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 2, spec("tokens:10k/1m")) as pair:
            ticket = await pair[0].admit(KEY, Usage(1, 1000, 0))
            assert isinstance(ticket, SharedTicket)
            retried = SharedTicket(KEY, ticket.reserved, ticket.at, ticket_id=ticket.ticket_id)
            await pair[0].settle(ticket, Usage(1, 400, 0))
            await pair[1].settle(retried, Usage(1, 400, 0))  # the same settlement again
            assert await used(pair[0], "tokens:10k/1m") == 400

    asyncio.run(scenario())


def test_the_admission_reply_carries_the_headers_summary(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 2, spec("requests:5/1m", "tokens:1000/1m")) as pair:
            await pair[1].admit(KEY, Usage(1, 100, 0))
            await pair[0].admit(KEY, Usage(1, 200, 0))
            cached = pair[0].tightest(KEY)  # no round trip: from the admission's reply
            assert cached is not None and cached.requests is not None
            assert cached.requests.remaining == 3
            assert cached.tokens is not None and cached.tokens.remaining == 700
            now = await pair[0].summary(KEY)
            assert now is not None
            assert (now.requests, now.tokens) == (cached.requests, cached.tokens)

    asyncio.run(scenario())


# -- leases -------------------------------------------------------------------------------


def test_a_dead_nodes_slots_and_reservations_are_free_once_its_leases_run_out(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        limits = spec("requests:100/1h", "tokens:10k/1h")
        async with nodes(url, 2, limits, concurrency=3, clock=clock, lease=60) as pair:
            dead, alive = pair
            for _ in range(3):
                assert isinstance(await dead.admit(KEY, Usage(1, 1000, 500)), Ticket)
            await dead.close()  # it never settles, nor renews
            refusal = await alive.admit(KEY, Usage())
            assert isinstance(refusal, Refusal) and refusal.reason == "concurrency"
            assert await used(alive, "tokens:10k/1h") == 4500
            clock.advance(59.9)
            assert await alive.in_flight(KEY) == 3
            clock.advance(0.1)  # the leases ran out
            assert await alive.in_flight(KEY) == 0
            assert isinstance(await alive.admit(KEY, Usage(1, 10, 0)), Ticket)
            # The dead node's requests count nothing: their rows were never written.
            assert await used(alive, "requests:100/1h") == 1
            assert await used(alive, "tokens:10k/1h") == 10

    asyncio.run(scenario())


def test_renewing_keeps_a_long_request_s_lease(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with nodes(url, 2, spec("tokens:10k/1h"), concurrency=1, clock=clock) as pair:
            streaming, other = pair
            ticket = await streaming.admit(KEY, Usage(1, 1000, 0))
            assert isinstance(ticket, Ticket)
            for _ in range(5):  # 200 s in all, more than three leases
                clock.advance(40)
                assert await streaming.renew() == 1
            refusal = await other.admit(KEY, Usage())
            assert isinstance(refusal, Refusal) and refusal.reason == "concurrency"
            assert await used(other, "tokens:10k/1h") == 1000
            await streaming.settle(ticket, Usage(1, 1200, 300))
            assert await streaming.renew() == 0  # nothing in flight any more
            assert isinstance(await other.admit(KEY, Usage()), Ticket)
            assert await used(other, "tokens:10k/1h") == 1500

    asyncio.run(scenario())


def test_a_request_that_settles_after_its_lease_ran_out_counts_what_it_used(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with nodes(url, 2, spec("tokens:10k/1h"), clock=clock) as pair:
            late, other = pair
            ticket = await late.admit(KEY, Usage(1, 1000, 0))
            assert isinstance(ticket, Ticket)
            clock.advance(61)
            assert await used(other, "tokens:10k/1h") == 0  # released with the lease
            await late.settle(ticket, Usage(1, 700, 100))
            assert await used(other, "tokens:10k/1h") == 800
            (state,) = await other.states(KEY)
            # Folded into the newest entry if later, so it leaves late, never early.
            assert state.reset_seconds == 3600 - 61

    asyncio.run(scenario())


# -- rebuilding from the stored usage --------------------------------------------------------


def test_a_key_s_state_is_rebuilt_from_the_stored_rows_after_redis_lost_it(url: str) -> None:
    clock = FakeClock()
    store = StoredUsage()
    store.rows[KEY] = [(clock.now - 30, 100, 50), (clock.now - 1800, 1000, 0)]
    store.lifetime[KEY] = Usage(9, 9000, 900)

    async def scenario() -> None:
        limits = spec("requests:10/1m", "tokens:10k/1h", "tokens:20k")
        async with nodes(url, 1, limits, clock=clock, stored=[store]) as (node,):
            ticket = await node.admit(KEY, Usage(1, 10, 0))
            assert isinstance(ticket, Ticket)
            assert store.reads == 2  # the windows' rows once, the lifetime once
            assert await used(node, "requests:10/1m") == 2
            assert await used(node, "tokens:10k/1h") == 1160
            assert await used(node, "tokens:20k") == 9910
            await node.settle(ticket, Usage(1, 20, 0))
            store.rows[KEY].append((ticket.at, 20, 0))
            store.lifetime[KEY] = Usage(10, 9020, 900)
            names = [n async for n in node.redis.scan_iter(match=node.prefix + "*")]
            assert len(names) >= 4
            await node.redis.delete(*names)  # as a Redis restart that kept nothing
            clock.advance(1)
            assert await used(node, "requests:10/1m") == 2
            assert await used(node, "tokens:10k/1h") == 1170
            assert await used(node, "tokens:20k") == 9920
            assert store.reads == 4

    asyncio.run(scenario())


def test_two_nodes_seeding_at_once_count_the_history_once(url: str) -> None:
    clock = FakeClock()
    stores = [StoredUsage(), StoredUsage()]
    for store in stores:
        store.rows[KEY] = [(clock.now - 10 * n, 100, 0) for n in range(1, 6)]

    async def scenario() -> None:
        async with nodes(url, 2, spec("requests:20/1m", "tokens:10k/1m"), stored=stores) as pair:
            results = await admit_on_both(pair, 10, Usage(1, 10, 0))
            assert len(tickets_of(results)) == 10
            assert stores[0].reads >= 1 and stores[1].reads >= 1  # both found it missing
            assert await used(pair[0], "requests:20/1m") == 5 + 10
            assert await used(pair[1], "tokens:10k/1m") == 500 + 100

    asyncio.run(scenario())


def test_a_limit_added_later_is_seeded_from_the_stored_rows_with_the_requests_in_flight(
    url: str,
) -> None:
    clock = FakeClock()
    store = StoredUsage()
    store.rows[KEY] = [(clock.now - 1800, 5000, 1000)]

    async def scenario() -> None:
        async with nodes(url, 2, spec("requests:10/1m"), clock=clock, stored=[store, store]) as (
            one,
            two,
        ):
            ticket = await one.admit(KEY, Usage(1, 100, 0))
            assert isinstance(ticket, Ticket)
            clock.advance(10)
            for node in (one, two):
                node.configure(KEY, spec("requests:10/1m", "tokens:1M/1h"), None)
            assert await used(two, "tokens:1M/1h") == 6100  # the stored row and the reservation
            await one.settle(ticket, Usage(1, 40, 0))
            assert await used(two, "tokens:1M/1h") == 6040
            assert await used(two, "requests:10/1m") == 1

    asyncio.run(scenario())


def test_nodes_with_the_old_and_the_new_limits_count_in_the_same_windows(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with nodes(url, 2, spec("requests:10/1m"), clock=clock) as (new, old):
            new.configure(KEY, spec("requests:10/1m", "requests:3/1h"), None)
            tickets: list[Ticket] = []
            for node in (new, old, old):  # the old node knows nothing of the hour
                ticket = await node.admit(KEY, Usage())
                assert isinstance(ticket, Ticket)
                tickets.append(ticket)
                clock.advance(1)
            assert await used(new, "requests:3/1h") == 3
            refusal = await new.admit(KEY, Usage())
            assert isinstance(refusal, Refusal) and refusal.limit == parse_limit("requests:3/1h")
            for ticket in tickets:
                await old.settle(ticket, Usage())
            # The hour goes once no node has had it for two minutes; it then starts again
            # from the stored rows (none in this test) and the requests in flight.
            new.configure(KEY, spec("requests:10/1m"), None)
            clock.advance(150)
            assert isinstance(await old.admit(KEY, Usage()), Ticket)
            names = {n async for n in new.redis.scan_iter(match=new.prefix + "*")}
            assert f"{new.prefix}{{k{KEY}}}:w3600".encode() not in names
            new.configure(KEY, spec("requests:10/1m", "requests:3/1h"), None)
            assert await used(new, "requests:3/1h") == 1

    asyncio.run(scenario())


def test_a_request_in_flight_across_a_redis_restart_counts_what_it_used(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        limits = spec("tokens:10k/1h")
        async with nodes(url, 2, limits, concurrency=2, clock=clock) as (one, two):
            ticket = await one.admit(KEY, Usage(1, 1000, 0))
            assert isinstance(ticket, Ticket)
            names = [n async for n in one.redis.scan_iter(match=one.prefix + "*")]
            await one.redis.delete(*names)  # Redis restarted, keeping nothing
            clock.advance(5)
            assert await used(two, "tokens:10k/1h") == 0  # rebuilt from the rows (none yet)
            await one.settle(ticket, Usage(1, 700, 300))
            assert await used(two, "tokens:10k/1h") == 1000
            assert await two.in_flight(KEY) == 0

    asyncio.run(scenario())


def test_renewing_restores_the_reservations_and_slots_redis_lost(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        limits = spec("tokens:10k/1h")
        async with nodes(url, 2, limits, concurrency=1, clock=clock) as (one, two):
            ticket = await one.admit(KEY, Usage(1, 1000, 0))
            assert isinstance(ticket, Ticket)
            names = [n async for n in one.redis.scan_iter(match=one.prefix + "*")]
            await one.redis.delete(*names)  # Redis restarted, keeping nothing
            await one.redis.script_flush()
            clock.advance(5)
            assert await two.in_flight(KEY) == 0  # lost, for now
            assert await one.renew() == 1
            assert await two.in_flight(KEY) == 1
            assert await used(two, "tokens:10k/1h") == 1000  # reserved again
            refusal = await two.admit(KEY, Usage())
            assert isinstance(refusal, Refusal) and refusal.reason == "concurrency"
            await one.settle(ticket, Usage(1, 700, 300))
            assert await used(two, "tokens:10k/1h") == 1000
            assert isinstance(await two.admit(KEY, Usage()), Ticket)

    asyncio.run(scenario())


def test_scripts_are_loaded_again_after_redis_forgot_them(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 1, spec("requests:3/1m")) as (node,):
            assert isinstance(await node.admit(KEY, Usage()), Ticket)
            await node.redis.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT
            assert isinstance(await node.admit(KEY, Usage()), Ticket)
            assert await used(node, "requests:3/1m") == 2

    asyncio.run(scenario())


def test_calls_sent_together_after_redis_forgot_the_scripts_still_admit_exactly(
    url: str,
) -> None:
    async def scenario() -> None:
        async with nodes(url, 2, spec("requests:10/1m")) as pair:
            assert len(tickets_of(await admit_on_both(pair, 4, Usage()))) == 4
            await pair[0].redis.script_flush()  # one pipeline of 30 calls per node answers NOSCRIPT
            results = await admit_on_both(pair, 60, Usage())
            assert len(tickets_of(results)) == 6
            assert await used(pair[1], "requests:10/1m") == 10

    asyncio.run(scenario())


def test_forget_removes_the_key_s_data_from_redis(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 2, spec("requests:3/1m", "tokens:5")) as pair:
            ticket = await pair[0].admit(KEY, Usage(1, 1, 0))
            await pair[1].forget(KEY)
            assert [n async for n in pair[0].redis.scan_iter(match=pair[0].prefix + "*")] == []
            await pair[0].settle(ticket, Usage(1, 1, 0))  # a no-op: nothing comes back
            assert [n async for n in pair[0].redis.scan_iter(match=pair[0].prefix + "*")] == []
            assert pair[1].keys() == set()

    asyncio.run(scenario())


def test_fold_events_folds_as_the_in_memory_window_does() -> None:
    now = 1000.0
    rows = [(now - 0.05, 1, 1), (now - 5, 2, 0), (now - 0.1, 3, 3), (now - 60, 9, 9)]
    # A 60 s window folds within 60 ms: the rows 100 ms and 50 ms ago become one entry.
    assert fold_events(60, rows, now) == [
        (now - 5, now - 5, 1, 2, 0),
        (now - 0.1, now - 0.05, 2, 4, 4),
    ]
    limiter = Limiter(lambda: now)
    limiter.configure(KEY, spec("requests:10/1m"), None)
    limiter.load_history(KEY, rows, Usage(0))
    assert [(e.start, e.ts) for e in limiter._keys[KEY].windows[60].entries] == [
        (e[0], e[1]) for e in fold_events(60, rows, now)
    ]


# -- Redis unreachable -----------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_redis_refuses_admission_quickly_naming_it_without_password() -> None:
    port = closed_port()
    limiter = RedisLimiter.from_url(f"redis://opulon:s3cret@127.0.0.1:{port}/0", StoredUsage())
    limiter.configure(KEY, spec("requests:3/1m"), None)

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(SharedLimiterUnavailable) as raised:
            await limiter.admit(KEY, Usage())
        assert time.monotonic() - started < 2.5
        message = str(raised.value)
        assert f"redis://opulon:***@127.0.0.1:{port}/0" in message
        assert "s3cret" not in message
        ticket = SharedTicket(KEY, Usage(), 0.0, ticket_id="gone")
        await limiter.settle(ticket, Usage())  # logged, never raised into the request path
        assert ticket.settled
        await limiter.close()

    asyncio.run(scenario())


def test_a_redis_that_never_answers_is_given_up_within_two_seconds() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", StoredUsage())

        async def scenario() -> None:
            started = time.monotonic()
            with pytest.raises(SharedLimiterUnavailable, match=f"127.0.0.1:{port}"):
                await limiter.admit(KEY, Usage())
            assert 0.4 < time.monotonic() - started < 2.5
            await limiter.close()

        asyncio.run(scenario())


def test_the_server_check_reports_the_version_and_a_round_trip(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 1, []) as (node,):
            version, seconds = await node.server()
            assert version.split(".")[0].isdigit()
            assert 0 < seconds < 1

    asyncio.run(scenario())


def test_redacted_url_hides_only_the_password() -> None:
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted_url("rediss://:pw@cache:6380/1") == "rediss://***@cache:6380/1"
    assert redacted_url("redis://me:pw@[::1]:6379") == "redis://me:***@[::1]:6379"


def test_the_fallback_admits_with_local_limits_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = StoredUsage()
    store.rows[KEY] = [(clock.now - 5, 0, 0)]
    shared = RedisLimiter.from_url(f"redis://127.0.0.1:{closed_port()}/0", store, clock=clock)
    fallback = FallbackLimiter(shared, LocalLimiter(Limiter(clock)), store)
    fallback.configure(KEY, spec("requests:3/1m"), None)

    async def scenario() -> None:
        with caplog.at_level(logging.WARNING, logger="opulon.limiter"):
            results = [await fallback.admit(KEY, Usage()) for _ in range(3)]
        assert fallback.degraded
        assert len(tickets_of(results)) == 2  # the stored row counts, from this node's copy
        assert not any(isinstance(r, SharedTicket) for r in results)
        assert sum("inexact" in r.getMessage() for r in caplog.records) == 1
        for ticket in tickets_of(results):
            await fallback.settle(ticket, Usage())
        assert await fallback.in_flight(KEY) == 0
        await fallback.close()

    asyncio.run(scenario())


class RedisProxy:
    """A TCP relay on loopback to the test Redis that can be cut and restored, as a network
    between a node and its Redis that fails for a while, and that can lose a reply (closing
    the connection it was on), as a connection that breaks after Redis ran a call."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.replies_to_lose = 0
        self.refuse_after_loss = False  # refuse new connections once a reply was lost

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers.update((writer, upstream_writer))

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if replies and self.replies_to_lose > 0:
                        self.replies_to_lose -= 1
                        if self.refuse_after_loss and self._server is not None:
                            self._server.close()
                            self._server = None
                        upstream_writer.close()
                        break
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(
            pump(reader, upstream_writer, False), pump(upstream_reader, writer, True)
        )
        self._writers.difference_update((writer, upstream_writer))


@asynccontextmanager
async def behind_proxy(
    url: str, limits: list[Limit], clock: FakeClock | None = None
) -> AsyncIterator[tuple[RedisProxy, RedisLimiter, RedisLimiter]]:
    """(proxy, a node that reaches Redis through it, a node that reaches Redis directly),
    both with ``limits`` for :data:`KEY` on one state."""
    proxy = RedisProxy(url)
    await proxy.start()
    prefix = new_prefix()
    clock = clock or FakeClock()
    node = RedisLimiter.from_url(proxy.url(), StoredUsage(), clock=clock, prefix=prefix)
    other = RedisLimiter.from_url(url, StoredUsage(), clock=clock, prefix=prefix)
    for limiter in (node, other):
        limiter.configure(KEY, limits, None)
    try:
        yield proxy, node, other
    finally:
        await remove_prefix(other)
        await node.close()
        await proxy.cut()


def test_a_call_run_twice_after_its_reply_was_lost_counts_once(url: str) -> None:
    async def scenario() -> None:
        async with behind_proxy(url, spec("requests:10/1m", "tokens:10k/1m")) as (
            proxy,
            node,
            other,
        ):
            assert isinstance(await node.admit(KEY, Usage()), Ticket)  # connected
            proxy.replies_to_lose = 1
            ticket = await node.admit(KEY, Usage(1, 100, 0))  # run, reply lost, run again
            assert isinstance(ticket, Ticket)
            assert proxy.replies_to_lose == 0
            assert await used(other, "requests:10/1m") == 2
            assert await used(other, "tokens:10k/1m") == 100
            proxy.replies_to_lose = 1
            await node.settle(ticket, Usage(1, 40, 0))
            assert proxy.replies_to_lose == 0
            assert await used(other, "tokens:10k/1m") == 40
            assert await other.in_flight(KEY) == 1

    asyncio.run(scenario())


def test_a_settlement_that_failed_is_made_with_the_next_renewal(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with behind_proxy(url, spec("tokens:10k/1h"), clock) as (proxy, cut_off, other):
            ticket = await cut_off.admit(KEY, Usage(1, 1000, 0))
            assert isinstance(ticket, Ticket)
            await proxy.cut()
            await cut_off.settle(ticket, Usage(1, 300, 100))  # fails, quietly
            assert await used(other, "tokens:10k/1h") == 1000
            with pytest.raises(SharedLimiterUnavailable):
                await cut_off.renew()
            await proxy.start()
            assert await cut_off.renew() == 0  # no lease to renew, but the settlement is made
            assert await used(other, "tokens:10k/1h") == 400
            assert await cut_off.renew() == 0
            assert await used(other, "tokens:10k/1h") == 400  # made once

    asyncio.run(scenario())


def test_the_fallback_uses_redis_again_once_it_answers(url: str) -> None:
    clock = FakeClock()
    store = StoredUsage()
    moment = [0.0]

    async def scenario() -> None:
        proxy = RedisProxy(url)
        await proxy.start()
        shared = RedisLimiter.from_url(proxy.url(), store, clock=clock, prefix=new_prefix())
        fallback = FallbackLimiter(
            shared, LocalLimiter(Limiter(clock)), store, monotonic=lambda: moment[0]
        )
        fallback.configure(KEY, spec("requests:5/1m"), None)
        try:
            assert isinstance(await fallback.admit(KEY, Usage()), SharedTicket)
            await proxy.cut()
            assert not isinstance(await fallback.admit(KEY, Usage()), SharedTicket)
            assert fallback.degraded
            await proxy.start()
            # Redis is tried again only once the retry interval has passed.
            assert not isinstance(await fallback.admit(KEY, Usage()), SharedTicket)
            moment[0] += 1.0
            assert isinstance(await fallback.admit(KEY, Usage()), SharedTicket)
            assert not fallback.degraded
            assert await used(shared, "requests:5/1m") == 2  # what Redis saw
        finally:
            await remove_prefix(shared)
            await proxy.cut()

    asyncio.run(scenario())


def test_a_settlement_refused_by_redis_for_another_reason_is_made_later(url: str) -> None:
    from redis.exceptions import ResponseError

    async def scenario() -> None:
        async with nodes(url, 1, spec("requests:3/1h")) as (node,):
            ticket = await node.admit(KEY, Usage(1, 0, 0))
            assert isinstance(ticket, Ticket)
            real = node._queued

            def refusing(script: Any, keys: list[str], args: list[Any]) -> Any:
                if script is node._settle:
                    failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                    failed.set_exception(ResponseError("MISCONF Redis cannot save to disk"))
                    return failed
                return real(script, keys, args)

            node._queued = refusing  # type: ignore[method-assign]
            await node.settle(ticket, Usage(1, 5, 5))  # never raises into the request path
            node._queued = real  # type: ignore[method-assign]
            assert node._unsettled  # kept for the next renewal
            await node.renew()  # the settlement goes with the next renewal
            assert not node._unsettled
            assert await used(node, "requests:3/1h") == 1

    asyncio.run(scenario())


def test_after_an_outage_redis_learns_what_the_fallback_admitted(url: str) -> None:
    clock = FakeClock()
    store = StoredUsage()
    moment = [0.0]

    async def admit_and_store(fallback: FallbackLimiter, count: int) -> int:
        """Admit ``count`` requests, settle them and write their rows, as the gateway does."""
        admitted = 0
        for _ in range(count):
            ticket = await fallback.admit(KEY, Usage(1, 0, 0))
            if isinstance(ticket, Ticket):
                admitted += 1
                await fallback.settle(ticket, Usage(1, 0, 0))
                store.rows.setdefault(KEY, []).append((clock.now, 0, 0))
            clock.now += 0.5
        return admitted

    async def scenario() -> None:
        proxy = RedisProxy(url)
        await proxy.start()
        shared = RedisLimiter.from_url(proxy.url(), store, clock=clock, prefix=new_prefix())
        fallback = FallbackLimiter(
            shared, LocalLimiter(Limiter(clock)), store, monotonic=lambda: moment[0]
        )
        fallback.configure(KEY, spec("requests:10/1m"), None)
        try:
            assert await admit_and_store(fallback, 4) == 4  # counted in Redis
            await proxy.cut()
            assert await admit_and_store(fallback, 6) == 6  # this node's own count: 4 + 6
            assert fallback.degraded
            await proxy.start()
            moment[0] += 1.0
            # Redis is back with its 4: it learns the outage's 6 first, and admits no more.
            assert await admit_and_store(fallback, 5) == 0
            assert not fallback.degraded
            assert await used(shared, "requests:10/1m") == 10
        finally:
            await remove_prefix(shared)
            await proxy.cut()

    asyncio.run(scenario())


def test_a_sweep_removes_the_counts_of_keys_that_no_longer_exist_and_only_those(
    url: str,
) -> None:
    async def scenario() -> None:
        async with nodes(url, 1, spec("requests:5/1m")) as (node,):
            for key_id, tag in ((1, "aa"), (2, "bb"), (3, "cc"), (9, "dd")):
                node.configure(key_id, spec("requests:5/1m"), None, tag=tag)
                assert isinstance(await node.admit(key_id, Usage(1, 0, 0)), Ticket)
            # Key 1 lives on; key 2 was deleted; key 3's id now belongs to a newer key; key 9
            # is newer than every key this sweep knows of (created meanwhile): left alone.
            removed = await node.sweep({1: "aa", 3: "c2"})
            assert removed > 0
            names = [n.decode() async for n in node.redis.scan_iter(match=f"{node.prefix}*")]
            tags = {n[n.index("{") : n.index("}") + 1] for n in names}
            assert tags == {"{k1.aa}", "{k9.dd}"}

    asyncio.run(scenario())


def test_settlements_of_one_key_in_one_turn_go_in_one_script_call(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 1, spec("requests:100/1m", "tokens:10000/1m")) as (node,):
            tickets = tickets_of(
                await asyncio.gather(*(node.admit(KEY, Usage(1, 10, 100)) for _ in range(8)))
            )
            assert len(tickets) == 8
            sent: list[list[Any]] = []
            real = node._queued

            def counting(script: Any, keys: list[str], args: list[Any]) -> Any:
                if script is node._settle:
                    sent.append(args)
                return real(script, keys, args)

            node._queued = counting  # type: ignore[method-assign]
            await asyncio.gather(*(node.settle(t, Usage(1, 10, 1)) for t in tickets))
            node._queued = real  # type: ignore[method-assign]
            assert len(sent) == 1 and len(sent[0]) == 3 + 8  # one call, eight settlements
            assert await used(node, "tokens:10000/1m") == 8 * 11  # each at what it used
            assert await node.in_flight(KEY) == 0
            # Settling again changes nothing (a retried call).
            await asyncio.gather(*(node.settle(t, Usage(1, 10, 1)) for t in tickets))
            assert await used(node, "requests:100/1m") == 8

    asyncio.run(scenario())


# -- the script calls' own connection ----------------------------------------------------------


@pytest.fixture
def private_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of the test's own on a free loopback port (its statistics are the test's)."""
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis.url
    redis.stop()


def test_replies_lost_with_the_connection_fail_their_calls_and_the_next_call_reconnects(
    url: str,
) -> None:
    async def scenario() -> None:
        async with behind_proxy(url, spec("requests:100/1m")) as (proxy, node, other):
            assert isinstance(await node.admit(KEY, Usage()), Ticket)  # connected
            proxy.replies_to_lose = 1
            proxy.refuse_after_loss = True  # and the call sent again finds no Redis
            results = await asyncio.gather(
                *(node.admit(KEY, Usage()) for _ in range(8)), return_exceptions=True
            )
            assert all(isinstance(r, SharedLimiterUnavailable) for r in results), results
            assert await used(other, "requests:100/1m") == 1 + 8  # run, their replies lost
            await proxy.start()
            assert isinstance(await node.admit(KEY, Usage()), Ticket)  # connected again
            assert await used(other, "requests:100/1m") == 1 + 8 + 1

    asyncio.run(scenario())


def test_calls_of_two_scripts_answered_noscript_load_each_script_once(private_url: str) -> None:
    async def load_calls(node: RedisLimiter) -> int:
        stats = await node.redis.info("commandstats")
        return int(stats.get("cmdstat_script|load", {}).get("calls", 0))

    async def scenario() -> None:
        async with nodes(private_url, 1, spec("requests:100/1m", "tokens:10k/1m")) as (node,):
            tickets = tickets_of(
                await asyncio.gather(*(node.admit(KEY, Usage(1, 10, 0)) for _ in range(8)))
            )
            assert len(tickets) == 8
            await node.redis.script_flush()
            loaded = await load_calls(node)
            results = await asyncio.gather(
                *(node.settle(t, Usage(1, 5, 0)) for t in tickets),
                *(node.admit(KEY, Usage(1, 10, 0)) for _ in range(8)),
            )
            assert len(tickets_of(results[8:])) == 8
            assert await load_calls(node) == loaded + 2  # admit's and settle's, once each
            assert await used(node, "requests:100/1m") == 16
            assert await used(node, "tokens:10k/1m") == 8 * 5 + 8 * 10
            assert not node._unsettled

    asyncio.run(scenario())


def test_the_calls_waiting_on_a_redis_that_stalls_fail_at_the_deadline(url: str) -> None:
    parts = urlsplit(url)
    relay = TcpRelay((parts.hostname or "127.0.0.1", parts.port or 6379)).start()

    async def scenario() -> None:
        prefix = new_prefix()
        node = RedisLimiter.from_url(
            f"redis://127.0.0.1:{relay.port}/0", StoredUsage(), prefix=prefix, deadline=0.5
        )
        node.configure(KEY, spec("requests:100/1m"), None)
        try:
            assert isinstance(await node.admit(KEY, Usage()), Ticket)  # connected
            relay.stall()
            started = time.monotonic()
            first = asyncio.ensure_future(node.admit(KEY, Usage()))
            await asyncio.sleep(0.2)
            later = await asyncio.gather(
                *(node.admit(KEY, Usage()) for _ in range(4)), return_exceptions=True
            )
            assert all(isinstance(r, SharedLimiterUnavailable) for r in later), later
            with pytest.raises(SharedLimiterUnavailable, match=r"did not answer within 0\.5 s"):
                await first
            # One deadline: the calls sent later wait behind the first on the connection.
            assert 0.45 < time.monotonic() - started < 1.2
            relay.resume()
            assert isinstance(await node.admit(KEY, Usage()), Ticket)  # a new connection
        finally:
            relay.resume()
            await remove_prefix(node)
            relay.close()

    asyncio.run(scenario())


def test_replies_go_to_their_own_callers_under_concurrency(url: str) -> None:
    from redis.exceptions import ResponseError

    async def scenario() -> None:
        async with nodes(url, 1, []) as (node,):
            for key_id in range(16):
                node.configure(key_id, spec(f"requests:{key_id % 4 + 1}/1m", "tokens:1M/1m"), None)
            config = node._config(0)

            def is_script_error(e: object) -> bool:  # a 503 for the caller, Redis's reply inside
                return isinstance(e, SharedLimiterUnavailable) and isinstance(
                    e.__cause__, ResponseError
                )

            async def broken() -> Any:  # a script error: an error reply for this call alone
                return await node._call(node._admit, config.keys, [config.prefix, "x"])

            calls: list[Any] = []
            for round_ in range(5):
                for key_id in range(16):
                    calls.append(node.admit(key_id, Usage(1, 0, 1000 * key_id + round_)))
                    if key_id % 5 == 0:
                        calls.append(broken())
            results = await asyncio.gather(*calls, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 5 * 4
            assert all(is_script_error(e) for e in errors), errors
            admissions = [r for r in results if not isinstance(r, BaseException)]
            for key_id in range(16):
                mine = admissions[key_id::16]
                allowed = key_id % 4 + 1
                assert [isinstance(r, Ticket) for r in mine] == [True] * allowed + [False] * (
                    5 - allowed
                )
                for round_, result in enumerate(mine):
                    if isinstance(result, Ticket):
                        assert result.key_id == key_id
                        assert result.reserved.output_tokens == 1000 * key_id + round_
                    else:
                        assert result.reason == "window"
                        assert result.limit == parse_limit(f"requests:{allowed}/1m")
            settled = await asyncio.gather(
                *(node.settle(t, Usage(1, 0, 1)) for t in tickets_of(admissions)),
                *(broken() for _ in range(3)),
                return_exceptions=True,
            )
            assert settled[: len(tickets_of(admissions))] == [None] * len(tickets_of(admissions))
            assert all(is_script_error(e) for e in settled[len(tickets_of(admissions)) :])
            assert not node._unsettled
            assert [await node.in_flight(key_id) for key_id in range(16)] == [0] * 16

    asyncio.run(scenario())


def test_closing_waits_for_the_calls_on_their_way_and_closes_the_connection(url: str) -> None:
    async def scenario() -> None:
        prefix = new_prefix()
        node = RedisLimiter.from_url(url, StoredUsage(), prefix=prefix)
        other = RedisLimiter.from_url(url, StoredUsage(), prefix=prefix)
        for limiter in (node, other):
            limiter.configure(KEY, spec("tokens:10k/1m"), None)
        try:
            ticket = await node.admit(KEY, Usage(1, 100, 0))
            assert isinstance(ticket, Ticket)
            link = node._link
            assert link is not None
            settling = asyncio.ensure_future(node.settle(ticket, Usage(1, 30, 0)))
            await asyncio.sleep(0)  # on its way: made at the end of this turn
            await node.close()
            assert settling.done()
            assert await used(other, "tokens:10k/1m") == 30
            assert link.reader is not None and link.reader.done()
            assert not link.conn.is_connected
        finally:
            await remove_prefix(other)

    asyncio.run(scenario())


def test_rate_limit_summaries_of_admissions_are_kept_for_their_max_age_refusals_are_fresh(
    url: str,
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        limits = spec("requests:3/1m")
        async with nodes(url, 1, limits, clock=clock, summary_max_age=0.005) as (node,):
            assert isinstance(await node.admit(KEY, Usage()), Ticket)
            first = node.tightest(KEY)
            assert first is not None and first.requests is not None
            assert first.requests.remaining == 2
            assert isinstance(await node.admit(KEY, Usage()), Ticket)
            assert node.tightest(KEY) is first  # within 5 ms: the same summary
            clock.advance(0.01)
            assert isinstance(await node.admit(KEY, Usage()), Ticket)
            later = node.tightest(KEY)
            assert later is not first and later is not None and later.requests is not None
            assert later.requests.remaining == 0
            assert isinstance(await node.admit(KEY, Usage()), Refusal)
            refused = node.tightest(KEY)
            assert refused is not later  # a refusal's summary is always its own

    asyncio.run(scenario())


def test_counts_past_what_lua_writes_as_integers_are_read_not_raised(url: str) -> None:
    async def scenario() -> None:
        async with nodes(url, 1, spec("requests:10/1m")) as (node,):
            ticket = await node.admit(KEY, Usage(1, 0, 10**15))  # Lua writes 1e+15
            assert isinstance(ticket, Ticket)
            assert ticket.reserved.output_tokens == 10**15
            await node.settle(ticket, Usage(1, 0, 5))
            assert await node.in_flight(KEY) == 0
        async with nodes(url, 1, spec("tokens:1000/1m")) as (node,):
            refusal = await node.admit(KEY, Usage(1, 10**15, 0))
            assert isinstance(refusal, Refusal) and refusal.too_large

    asyncio.run(scenario())
