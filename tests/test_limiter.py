"""The limiter's behaviour, on both engines: in memory (one node) and shared through Redis.

Every behaviour test takes ``make_limiter`` or ``new_limiter``, parametrized over ``memory``
(:class:`~opulon.limiter_redis.LocalLimiter` over :class:`~opulon.limiter.Limiter`) and
``redis`` (:class:`~opulon.limiter_redis.RedisLimiter` on the test Redis, a key prefix of its
own per limiter, removed afterwards), with one fake clock. The few tests that check what only
the in-memory limiter has (what ``configure`` returns, its cache of summaries) use it alone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from services import redis_url

from opulon.gateway.rate_limit_headers import RateLimitHeaders
from opulon.limiter import (
    CONCURRENCY_RETRY_AFTER,
    Limiter,
    LimitState,
    Refusal,
    Ticket,
    Tightest,
    Usage,
    format_reset,
)
from opulon.limiter_redis import AsyncLimiter, LocalLimiter, RedisLimiter
from opulon.limits import METRICS, Limit, parse_budget, parse_limit

ENGINES = ("memory", "redis")
KEY = 7
START = 1_000_000.0
#: The shared limiter's lease in these tests: longer than any test's fake time, so that
#: both engines hold reservations until they settle (leases: tests/test_limiter_redis.py).
NO_EXPIRY = 1e9
T = TypeVar("T")


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StoredUsage:
    """The usage store's two reads, over rows a test sets (none unless it does)."""

    def __init__(self) -> None:
        self.rows: dict[int, list[tuple[float, int, int]]] = {}
        self.lifetime: dict[int, Usage] = {}
        self.reads = 0

    def window_history(self, key_id: int, since: float) -> list[tuple[float, int, int]]:
        self.reads += 1
        return [row for row in self.rows.get(key_id, []) if row[0] >= since]

    def lifetime_usage(self, key_id: int) -> Usage:
        self.reads += 1
        return self.lifetime.get(key_id, Usage(0, 0, 0))


class Engine:
    """A limiter of either engine, driven from synchronous test code on one event loop."""

    def __init__(
        self, kind: str, limiter: AsyncLimiter, clock: FakeClock, runner: asyncio.Runner
    ) -> None:
        self.kind = kind
        self.limiter = limiter
        self.clock = clock
        self.runner = runner
        self.closed = False

    def run(self, step: Awaitable[T]) -> T:
        async def wait() -> T:
            return await step

        return self.runner.run(wait())

    def configure(self, key_id: int, limits: list[Limit], concurrency: int | None) -> bool:
        return self.limiter.configure(key_id, limits, concurrency)

    def load_history(
        self, key_id: int, events: Iterable[tuple[float, int, int]], lifetime: Usage
    ) -> None:
        self.run(self.limiter.load_history(key_id, events, lifetime))

    def forget(self, key_id: int) -> None:
        self.run(self.limiter.forget(key_id))

    def keys(self) -> set[int]:
        return self.limiter.keys()

    def admit(
        self, key_id: int, expected: Usage, *, flexible_output: bool = False
    ) -> Ticket | Refusal:
        return self.run(self.limiter.admit(key_id, expected, flexible_output=flexible_output))

    def settle(self, ticket: Ticket, actual: Usage) -> None:
        self.run(self.limiter.settle(ticket, actual))

    def in_flight(self, key_id: int) -> int:
        return self.run(self.limiter.in_flight(key_id))

    def states(self, key_id: int) -> list[LimitState]:
        return self.run(self.limiter.states(key_id))

    def tightest(self, key_id: int, fresh: bool = False) -> Tightest | None:
        """The summary the headers are built from: the in-memory limiter's own (cached)
        one, the shared limiter's read from Redis now."""
        if isinstance(self.limiter, RedisLimiter):
            return self.run(self.limiter.summary(key_id))
        return self.limiter.tightest(key_id, fresh=fresh)

    def close(self) -> None:
        """Remove what a shared limiter put in Redis and close its connections."""
        if isinstance(self.limiter, RedisLimiter) and not self.closed:
            self.closed = True
            self.run(remove_prefix(self.limiter))

    def entries(self, seconds: int, key_id: int = KEY) -> int:
        """How many entries the key's window of ``seconds`` holds (its memory)."""
        if isinstance(self.limiter, LocalLimiter):
            return len(self.limiter.limiter._keys[key_id].windows[seconds].entries)
        assert isinstance(self.limiter, RedisLimiter)
        name = f"{self.limiter.prefix}{{k{key_id}}}:w{seconds}"
        return int(self.run(self.limiter.redis.hlen(name))) - 5  # r, i, o, h, n


class NewLimiter(Protocol):
    def __call__(
        self,
        clock: FakeClock | None = None,
        *,
        stored: StoredUsage | None = None,
        prefix: str | None = None,
    ) -> Engine: ...


class MakeLimiter(Protocol):
    def __call__(
        self, *specs: str, concurrency: int | None = None, lifetime: Usage | None = None
    ) -> tuple[Engine, FakeClock]: ...


async def remove_prefix(limiter: RedisLimiter) -> None:
    """Delete every Redis key under the limiter's prefix, and close its connections."""
    names = [name async for name in limiter.redis.scan_iter(match=limiter.prefix + "*")]
    if names:
        await limiter.redis.delete(*names)
    await limiter.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        redis_url()  # skips (fails under CI) where no Redis listens
    return str(request.param)


def new_prefix() -> str:
    """A Redis key prefix no other test uses."""
    return f"opulon-test:{uuid.uuid4().hex}:"


@pytest.fixture
def new_limiter(engine: str) -> Iterator[NewLimiter]:
    """Limiters of the test's engine, on one event loop; each shared one on a prefix of its
    own unless given one (two limiters on one prefix are two nodes sharing one state)."""
    runner = asyncio.Runner()
    made: list[Engine] = []

    def new(
        clock: FakeClock | None = None,
        *,
        stored: StoredUsage | None = None,
        prefix: str | None = None,
    ) -> Engine:
        clock = clock or FakeClock()
        if engine == "memory":
            return Engine(engine, LocalLimiter(Limiter(clock)), clock, runner)
        shared = RedisLimiter.from_url(
            redis_url(),
            stored or StoredUsage(),
            clock=clock,
            prefix=prefix or new_prefix(),
            lease=NO_EXPIRY,
        )
        made.append(Engine(engine, shared, clock, runner))
        return made[-1]

    yield new
    try:
        for limiter in made:
            limiter.close()
    finally:
        runner.close()


@pytest.fixture
def make_limiter(new_limiter: NewLimiter) -> MakeLimiter:
    def make(
        *specs: str, concurrency: int | None = None, lifetime: Usage | None = None
    ) -> tuple[Engine, FakeClock]:
        clock = FakeClock()
        limiter = new_limiter(clock)
        limits = [parse_limit(s) if "/" in s else parse_budget(s) for s in specs]
        limiter.configure(KEY, limits, concurrency)
        limiter.load_history(KEY, [], lifetime or Usage(0, 0, 0))
        return limiter, clock

    return make


_ENCODERS: dict[int, tuple[Engine, RateLimitHeaders]] = {}


def headers_of(limiter: Engine) -> Callable[..., list[tuple[bytes, bytes]]]:
    """The limiter's rate-limit headers as the gateway encodes them (one encoder per limiter)."""
    known = _ENCODERS.get(id(limiter))
    if known is None or known[0] is not limiter:
        encoder = RateLimitHeaders(limiter.tightest, limiter.clock)
        known = _ENCODERS[id(limiter)] = (limiter, encoder)
    return known[1].for_key


def memory_limiter(*specs: str) -> tuple[Limiter, FakeClock]:
    """An in-memory limiter alone, for the tests of what only it has."""
    clock = FakeClock()
    limiter = Limiter(clock)
    limiter.configure(KEY, [parse_limit(s) if "/" in s else parse_budget(s) for s in specs], None)
    limiter.load_history(KEY, [], Usage(0, 0, 0))
    return limiter, clock


def admitted(result: Ticket | Refusal) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def refused(result: Ticket | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def state_of(limiter: Engine, spec: str, key: int = KEY) -> LimitState:
    wanted = parse_limit(spec) if "/" in spec else parse_budget(spec)
    (found,) = [s for s in limiter.states(key) if s.limit == wanted]
    return found


def used(limiter: Engine, spec: str, key: int = KEY) -> int:
    return state_of(limiter, spec, key).used


def tokens(input_tokens: int, output_tokens: int = 0) -> Usage:
    return Usage(1, input_tokens, output_tokens)


# -- admission under concurrency -------------------------------------------------------------


def test_fifty_simultaneous_admissions_against_ten_per_minute_admit_exactly_ten(
    make_limiter: MakeLimiter,
) -> None:
    limiter, _ = make_limiter("requests:10/1m")
    results = [limiter.admit(KEY, Usage()) for _ in range(50)]
    assert sum(isinstance(r, Ticket) for r in results) == 10
    assert all(isinstance(r, Ticket) for r in results[:10])
    refusals = [refused(r) for r in results[10:]]
    assert {r.reason for r in refusals} == {"window"}
    assert {r.retry_after for r in refusals} == {60.0}
    assert refusals[0].limit == parse_limit("requests:10/1m")
    assert refusals[0].message == "limit requests:10/1m reached; resets in 1m"
    assert limiter.in_flight(KEY) == 10
    assert used(limiter, "requests:10/1m") == 10


def test_refusal_retry_after_is_the_time_until_the_oldest_usage_leaves(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter("requests:3/1m")
    for _ in range(3):
        limiter.settle(admitted(limiter.admit(KEY, Usage())), Usage())
        clock.advance(10)
    clock.advance(5)  # 35 s after the first request, which leaves 25 s from now
    refusal = refused(limiter.admit(KEY, Usage()))
    assert refusal.retry_after == 25.0
    assert refusal.message == "limit requests:3/1m reached; resets in 25s"
    clock.advance(24.5)
    assert refused(limiter.admit(KEY, Usage())).retry_after == 0.5
    clock.advance(0.5)
    admitted(limiter.admit(KEY, Usage()))


def test_retry_after_waits_until_enough_usage_has_left_for_the_expected_cost(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter("tokens:1000/1m")
    limiter.settle(admitted(limiter.admit(KEY, tokens(400))), tokens(400))
    clock.advance(10)
    limiter.settle(admitted(limiter.admit(KEY, tokens(400))), tokens(400))
    clock.advance(10)
    assert refused(limiter.admit(KEY, tokens(500))).retry_after == 40.0
    assert refused(limiter.admit(KEY, tokens(700))).retry_after == 50.0
    clock.advance(40)
    admitted(limiter.admit(KEY, tokens(500)))


def test_the_window_that_frees_last_names_the_refusal(make_limiter: MakeLimiter) -> None:
    limiter, clock = make_limiter("requests:1/10s", "requests:2/1m")
    limiter.settle(admitted(limiter.admit(KEY, Usage())), Usage())
    clock.advance(11)
    limiter.settle(admitted(limiter.admit(KEY, Usage())), Usage())
    clock.advance(1)
    # The 10 s window frees in 9 s, the 1 m window only in 48 s.
    refusal = refused(limiter.admit(KEY, Usage()))
    assert refusal.limit == parse_limit("requests:2/1m")
    assert refusal.retry_after == 48.0


# -- rolling windows -----------------------------------------------------------------------


def test_usage_leaves_the_window_exactly_when_it_ages_out(make_limiter: MakeLimiter) -> None:
    limiter, clock = make_limiter("requests:5/1m")
    limiter.admit(KEY, Usage())
    clock.advance(1)
    limiter.admit(KEY, Usage())
    clock.advance(58.5)  # 59.5 s after the first
    assert used(limiter, "requests:5/1m") == 2
    assert state_of(limiter, "requests:5/1m").reset_seconds == 0.5
    clock.advance(0.5)  # exactly 60 s after the first
    assert used(limiter, "requests:5/1m") == 1
    assert state_of(limiter, "requests:5/1m").reset_seconds == 1.0
    clock.advance(0.999)
    assert used(limiter, "requests:5/1m") == 1
    clock.advance(0.001)
    assert used(limiter, "requests:5/1m") == 0
    assert state_of(limiter, "requests:5/1m").reset_seconds == 0.0


def test_usage_within_the_resolution_is_folded_and_leaves_late_never_early(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter("requests:5/1m")  # resolution 60 ms
    limiter.admit(KEY, Usage())
    clock.advance(0.05)
    limiter.admit(KEY, Usage())
    clock.advance(59.95)  # 60 s after the first: it would have left on its own
    assert used(limiter, "requests:5/1m") == 2
    clock.advance(0.05)
    assert used(limiter, "requests:5/1m") == 0


def test_steady_traffic_below_the_limit_is_never_refused_and_memory_stays_bounded(
    make_limiter: MakeLimiter,
) -> None:
    # One request every 5 ms against a 10 s window with 10 ms resolution: 2000 per window.
    limiter, clock = make_limiter("requests:2010/10s")
    for _ in range(6000):
        admitted(limiter.admit(KEY, Usage()))
        clock.advance(0.005)
    assert 1995 <= used(limiter, "requests:2010/10s") <= 2010
    assert 500 <= limiter.entries(10) <= 1001


# -- settling --------------------------------------------------------------------------------


def test_settle_with_more_tokens_than_reserved_counts_the_real_usage(
    make_limiter: MakeLimiter,
) -> None:
    limiter, _ = make_limiter(
        "tokens:10k/1m", "input_tokens:5k/1m", "output_tokens:5k/1m", "tokens:100k"
    )
    ticket = admitted(limiter.admit(KEY, tokens(1000, 500)))
    assert used(limiter, "tokens:10k/1m") == 1500
    limiter.settle(ticket, tokens(1200, 2000))
    assert used(limiter, "tokens:10k/1m") == 3200
    assert used(limiter, "input_tokens:5k/1m") == 1200
    assert used(limiter, "output_tokens:5k/1m") == 2000
    assert used(limiter, "tokens:100k") == 3200


def test_settle_with_fewer_tokens_than_reserved_gives_room_back(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter("tokens:2000/1m")
    ticket = admitted(limiter.admit(KEY, tokens(1500)))
    refused(limiter.admit(KEY, tokens(1000)))
    limiter.settle(ticket, tokens(200, 100))
    assert used(limiter, "tokens:2000/1m") == 300
    admitted(limiter.admit(KEY, tokens(1000)))


def test_a_failed_request_settles_with_zero_tokens_but_still_one_request(
    make_limiter: MakeLimiter,
) -> None:
    limiter, _ = make_limiter("requests:5/1m", "tokens:1000/1m")
    ticket = admitted(limiter.admit(KEY, tokens(300, 500)))
    limiter.settle(ticket, Usage(1, 0, 0))
    assert used(limiter, "requests:5/1m") == 1
    assert used(limiter, "tokens:1000/1m") == 0
    assert limiter.in_flight(KEY) == 0


def test_settle_does_not_touch_a_window_the_reservation_has_left(make_limiter: MakeLimiter) -> None:
    limiter, clock = make_limiter("tokens:1000/10s", "tokens:5000/1m")
    ticket = admitted(limiter.admit(KEY, tokens(500)))
    clock.advance(30)
    limiter.settle(ticket, tokens(900))
    assert used(limiter, "tokens:1000/10s") == 0
    assert used(limiter, "tokens:5000/1m") == 900
    clock.advance(30)
    assert used(limiter, "tokens:5000/1m") == 0


def test_settle_is_idempotent(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter("tokens:10k/1m", "requests:10/1m")
    ticket = admitted(limiter.admit(KEY, tokens(1000)))
    other = admitted(limiter.admit(KEY, tokens(1000)))
    limiter.settle(ticket, tokens(400))
    limiter.settle(ticket, tokens(9000))
    limiter.settle(ticket, Usage(3, 0, 0))
    assert used(limiter, "tokens:10k/1m") == 1400
    assert used(limiter, "requests:10/1m") == 2
    assert limiter.in_flight(KEY) == 1
    limiter.settle(other, tokens(0))
    assert limiter.in_flight(KEY) == 0


def test_token_overshoot_is_bounded_and_the_next_request_is_refused(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter("tokens:1000/1m")
    first = admitted(limiter.admit(KEY, tokens(400)))
    clock.advance(1)
    second = admitted(limiter.admit(KEY, tokens(400)))
    refused(limiter.admit(KEY, tokens(400)))
    limiter.settle(first, tokens(1000))  # 600 beyond its reservation
    limiter.settle(second, tokens(700))  # 300 beyond
    overshoot = used(limiter, "tokens:1000/1m") - 1000
    assert overshoot == 700
    assert overshoot <= 600 + 300
    assert state_of(limiter, "tokens:1000/1m").remaining == 0
    refusal = refused(limiter.admit(KEY, tokens(0)))
    assert refusal.retry_after == 59.0  # the older 1000 tokens must leave
    clock.advance(59)
    admitted(limiter.admit(KEY, tokens(0)))
    refused(limiter.admit(KEY, tokens(400)))


# -- budget and concurrency ------------------------------------------------------------------


def test_lifetime_budget_counts_history_and_refuses_for_good_once_spent(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter("tokens:10k", lifetime=Usage(3, 6000, 3000))
    assert used(limiter, "tokens:10k") == 9000
    ticket = admitted(limiter.admit(KEY, tokens(300, 200)))
    too_big = refused(limiter.admit(KEY, tokens(600)))
    assert (too_big.reason, too_big.retry_after) == ("budget", None)
    assert too_big.message == (
        "this request's expected cost (600 tokens) exceeds what remains "
        "of the lifetime budget tokens:10k (500 left)"
    )
    limiter.settle(ticket, tokens(800, 400))
    clock.advance(400 * 86400)
    spent = refused(limiter.admit(KEY, tokens(0)))
    assert spent == Refusal(
        parse_budget("tokens:10k"), "budget", None, "lifetime budget tokens:10k spent"
    )
    assert state_of(limiter, "tokens:10k") == LimitState(parse_budget("tokens:10k"), 10_200, 0, 0.0)


def test_an_expected_cost_larger_than_the_limit_itself_is_refused_without_retry(
    make_limiter: MakeLimiter,
) -> None:
    limiter, _ = make_limiter("tokens:1k/1m")
    refusal = refused(limiter.admit(KEY, tokens(3000, 2000)))
    assert refusal.retry_after is None and refusal.too_large
    assert (
        refusal.message
        == "this request's expected cost (5000 tokens) exceeds the whole limit tokens:1k/1m"
    )
    assert used(limiter, "tokens:1k/1m") == 0


def test_a_flexible_output_shrinks_to_what_the_token_limits_leave(
    make_limiter: MakeLimiter,
) -> None:
    limiter, _ = make_limiter("tokens:1000/1h", "output_tokens:300/1m", "requests:100/1m")
    ticket = admitted(limiter.admit(KEY, tokens(100, 1024), flexible_output=True))
    assert ticket.reserved == tokens(100, 300)  # the output window is the tighter
    limiter.settle(ticket, tokens(100, 250))
    ticket = admitted(limiter.admit(KEY, tokens(100, 1024), flexible_output=True))
    assert ticket.reserved == tokens(100, 50)
    limiter.settle(ticket, tokens(100, 50))
    # No room for a single output token: an ordinary refusal, with a time to retry.
    refusal = refused(limiter.admit(KEY, tokens(100, 1024), flexible_output=True))
    assert refusal.retry_after is not None and not refusal.too_large
    # Without the flag the reservation stays whole.
    limiter, _ = make_limiter("tokens:1000/1h")
    assert refused(limiter.admit(KEY, tokens(100, 1024))).too_large


def test_a_flexible_output_keeps_its_default_where_there_is_room(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter("tokens:1M/1h", "tokens:10M")
    ticket = admitted(limiter.admit(KEY, tokens(100, 1024), flexible_output=True))
    assert ticket.reserved == tokens(100, 1024)
    limiter, _ = make_limiter("requests:5/1m")
    ticket = admitted(limiter.admit(KEY, tokens(100, 1024), flexible_output=True))
    assert ticket.reserved == tokens(100, 1024)


def test_concurrency_limit_admits_again_when_a_request_finishes(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter(concurrency=2)
    first = admitted(limiter.admit(KEY, Usage()))
    admitted(limiter.admit(KEY, Usage()))
    assert limiter.admit(KEY, Usage()) == Refusal(
        None,
        "concurrency",
        CONCURRENCY_RETRY_AFTER,
        "concurrency limit 2 reached; retry when a request finishes",
    )
    assert limiter.in_flight(KEY) == 2
    limiter.settle(first, Usage())
    assert limiter.in_flight(KEY) == 1
    admitted(limiter.admit(KEY, Usage()))


def test_a_full_window_is_reported_before_concurrency(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter("requests:1/1m", concurrency=1)
    admitted(limiter.admit(KEY, Usage()))
    assert refused(limiter.admit(KEY, Usage())).reason == "window"


def test_a_key_never_configured_has_no_limits_but_counts_in_flight(
    new_limiter: NewLimiter,
) -> None:
    limiter = new_limiter()
    tickets = [admitted(limiter.admit(99, tokens(10**9))) for _ in range(100)]
    assert limiter.in_flight(99) == 100
    assert limiter.states(99) == []
    assert headers_of(limiter)(99) == []
    for ticket in tickets:
        limiter.settle(ticket, tokens(5))
    assert limiter.in_flight(99) == 0


def test_forget_drops_the_key_and_its_open_tickets_settle_as_no_ops(
    make_limiter: MakeLimiter,
) -> None:
    limiter, _ = make_limiter("requests:1/1m")
    ticket = admitted(limiter.admit(KEY, Usage()))
    limiter.forget(KEY)
    assert limiter.keys() == set()
    limiter.settle(ticket, Usage())
    assert limiter.in_flight(KEY) == 0
    limiter.configure(KEY, [parse_limit("requests:1/1m")], None)
    admitted(limiter.admit(KEY, Usage()))
    refused(limiter.admit(KEY, Usage()))


# -- configuration and history ---------------------------------------------------------------
# When the caller must load history is the in-memory limiter's contract (the shared one seeds
# Redis itself, through its history source, and never asks): those tests are memory-only.


def test_configure_asks_for_history_for_a_new_key_and_not_again_once_loaded() -> None:
    limiter = Limiter(FakeClock())
    limits = [parse_limit("requests:10/1m")]
    assert limiter.configure(KEY, limits, None) is True
    assert limiter.configure(KEY, limits, None) is True  # still not loaded
    limiter.load_history(KEY, [], Usage(0, 0, 0))
    assert limiter.configure(KEY, limits, None) is False
    assert limiter.keys() == {KEY}
    limiter.forget(KEY)
    assert limiter.configure(KEY, limits, None) is True  # forgotten, so not loaded


def test_configure_needs_no_history_for_a_key_with_only_concurrency() -> None:
    limiter = Limiter(FakeClock())
    assert limiter.configure(KEY, [], 4) is False


def test_configure_keeps_the_state_of_windows_that_stay(make_limiter: MakeLimiter) -> None:
    limiter, clock = make_limiter("requests:10/1m", "tokens:10k/1m")
    for _ in range(3):
        admitted(limiter.admit(KEY, tokens(100)))
        clock.advance(20)
    # Now 60 s after the first: it has left; the other two remain.
    changed = [parse_limit("requests:5/1m"), parse_limit("requests:100/30s")]
    assert limiter.configure(KEY, changed, None) is False
    assert used(limiter, "requests:5/1m") == 2
    assert used(limiter, "requests:100/30s") == 1  # the caller loads nothing for a new window


def test_configure_asks_for_history_when_a_longer_window_appears() -> None:
    limiter, clock = memory_limiter("requests:10/1m")
    ticket = admitted(limiter.admit(KEY, tokens(100)))
    clock.advance(10)
    longer = [parse_limit("requests:10/1m"), parse_limit("tokens:1M/1h")]
    assert limiter.configure(KEY, longer, None) is True
    assert used(limiter, "tokens:1M/1h") == 100  # what the 1m window knew, until loaded
    limiter.load_history(KEY, [(clock.now - 1800, 5000, 1000)], Usage(1, 5000, 1000))
    assert used(limiter, "tokens:1M/1h") == 6100
    assert limiter.configure(KEY, longer, None) is False
    limiter.settle(ticket, tokens(40))
    assert used(limiter, "tokens:1M/1h") == 6040


def test_configure_rejects_an_unknown_metric(new_limiter: NewLimiter) -> None:
    limiter = new_limiter()
    with pytest.raises(ValueError, match="unknown metric"):
        limiter.configure(KEY, [Limit("bytes", 10, 60)], None)


def test_load_history_rebuilds_the_windows_from_stored_rows(new_limiter: NewLimiter) -> None:
    clock = FakeClock()
    limiter = new_limiter(clock)
    limiter.configure(KEY, [parse_limit("requests:10/1m"), parse_limit("tokens:10k/1h")], None)
    now = clock.now
    rows = [(now - 10, 50, 50), (now - 7200, 9000, 0), (now - 30, 100, 200), (now - 1800, 1000, 0)]
    limiter.load_history(KEY, rows, Usage(4, 10_150, 250))
    assert state_of(limiter, "requests:10/1m") == LimitState(
        parse_limit("requests:10/1m"), 2, 8, 30.0
    )
    assert state_of(limiter, "tokens:10k/1h") == LimitState(
        parse_limit("tokens:10k/1h"), 1400, 8600, 1800.0
    )


def test_load_history_replaces_window_state_and_keeps_in_flight_reservations(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter("tokens:10k/1m", "tokens:100k")
    limiter.settle(admitted(limiter.admit(KEY, tokens(2000))), tokens(2000))
    in_flight = admitted(limiter.admit(KEY, tokens(1000)))
    clock.advance(5)
    limiter.load_history(KEY, [(clock.now - 20, 300, 0)], Usage(7, 40_000, 300))
    assert used(limiter, "tokens:10k/1m") == 1300
    assert used(limiter, "tokens:100k") == 41_300
    assert limiter.in_flight(KEY) == 1
    limiter.settle(in_flight, tokens(100))
    assert used(limiter, "tokens:10k/1m") == 400
    assert used(limiter, "tokens:100k") == 40_400
    clock.advance(55)  # the reservation's moment leaves the window
    assert used(limiter, "tokens:10k/1m") == 0


# -- headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.12, "120ms"),
        (0.0004, "1ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (45, "45s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
        (7200, "2h0m0s"),
        (59.9999, "1m0s"),
    ],
)
def test_reset_durations_use_openais_format(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_rate_limit_headers_report_the_tightest_requests_and_token_windows(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter(
        "requests:10/1m", "requests:100/1h", "tokens:1000/1m", "output_tokens:50k/1d", "tokens:1M"
    )
    limiter.settle(admitted(limiter.admit(KEY, tokens(300, 200))), tokens(300, 200))
    clock.advance(15)
    assert headers_of(limiter)(KEY) == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"9"),
        (b"x-ratelimit-reset-requests", b"45s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"500"),
        (b"x-ratelimit-reset-tokens", b"45s"),
    ]
    clock.advance(45)  # the 1m windows are empty again; the 1h and 1d ones are now tightest
    assert headers_of(limiter)(KEY) == [
        (b"x-ratelimit-limit-requests", b"100"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"x-ratelimit-reset-requests", b"59m0s"),
        (b"x-ratelimit-limit-tokens", b"50000"),
        (b"x-ratelimit-remaining-tokens", b"49800"),
        (b"x-ratelimit-reset-tokens", b"23h59m0s"),
    ]


def test_rate_limit_headers_follow_every_admission_and_settlement(
    make_limiter: MakeLimiter,
) -> None:
    limiter, clock = make_limiter("requests:3/1m")
    assert headers_of(limiter)(KEY) == [
        (b"x-ratelimit-limit-requests", b"3"),
        (b"x-ratelimit-remaining-requests", b"3"),
        (b"x-ratelimit-reset-requests", b"0s"),
    ]
    ticket = admitted(limiter.admit(KEY, Usage()))
    clock.advance(0.25)
    headers = dict(headers_of(limiter)(KEY))
    assert headers[b"x-ratelimit-remaining-requests"] == b"2"
    assert headers[b"x-ratelimit-reset-requests"] == b"59.75s"
    limiter.settle(ticket, Usage(0, 0, 0))  # a request that turned out not to count
    assert dict(headers_of(limiter)(KEY))[b"x-ratelimit-remaining-requests"] == b"3"


def test_each_key_gets_its_own_headers_from_one_encoder(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter("requests:3/1m")
    other = KEY + 1
    limiter.configure(other, [parse_limit("requests:50/1h"), parse_limit("tokens:9k/1m")], None)
    limiter.load_history(other, [], Usage(0, 0, 0))
    admitted(limiter.admit(other, tokens(100, 0)))
    encode = headers_of(limiter)
    for _ in range(3):  # cached bytes never cross from one key to the other
        assert dict(encode(KEY))[b"x-ratelimit-limit-requests"] == b"3"
        assert b"x-ratelimit-limit-tokens" not in dict(encode(KEY))
        mine = dict(encode(other))
        assert mine[b"x-ratelimit-limit-requests"] == b"50"
        assert mine[b"x-ratelimit-remaining-tokens"] == b"8900"
        assert dict(encode(other, anthropic=True))[b"anthropic-ratelimit-tokens-remaining"] == (
            b"8900"
        )
        assert dict(encode(KEY, anthropic=True))[b"anthropic-ratelimit-requests-remaining"] == (
            b"3"
        )


def test_rate_limit_headers_omit_a_trio_without_such_a_window(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter("input_tokens:5k/1m", "requests:100", concurrency=3)
    names = [name for name, _ in headers_of(limiter)(KEY)]
    assert names == [
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    ]
    budget_only, _ = make_limiter("tokens:1M")
    assert headers_of(budget_only)(KEY) == []


# -- properties against a naive reference model ----------------------------------------------


def metric_value(metric: str, usage: Usage) -> int:
    if metric == "requests":
        return usage.requests
    if metric == "input_tokens":
        return usage.input_tokens
    if metric == "output_tokens":
        return usage.output_tokens
    return usage.input_tokens + usage.output_tokens


@dataclass
class Event:
    at: float
    usage: Usage
    settled: bool = False


class Reference:
    """Every event kept in a plain list and summed by brute force."""

    def __init__(self, limits: list[Limit], concurrency: int | None, lifetime: Usage) -> None:
        self.limits = limits
        self.concurrency = concurrency
        self.lifetime = lifetime
        self.events: list[Event] = []

    def in_window(self, limit: Limit, event: Event, now: float, slack: float = 0.0) -> bool:
        return limit.window_seconds is None or now - event.at < limit.window_seconds + slack

    def used(self, limit: Limit, now: float, slack: float = 0.0) -> int:
        total = sum(
            metric_value(limit.metric, e.usage)
            for e in self.events
            if self.in_window(limit, e, now, slack)
        )
        if limit.window_seconds is None:
            total += metric_value(limit.metric, self.lifetime)
        return total

    def reset_seconds(self, limit: Limit, now: float) -> float:
        if limit.window_seconds is None:
            return 0.0
        times = [
            e.at
            for e in self.events
            if self.in_window(limit, e, now) and metric_value(limit.metric, e.usage) > 0
        ]
        return min(times) + limit.window_seconds - now if times else 0.0

    def retry_after(self, limit: Limit, cost: int, now: float) -> float:
        assert limit.window_seconds is not None
        deadlines = sorted(
            {e.at + limit.window_seconds for e in self.events if self.in_window(limit, e, now)}
        )
        for deadline in deadlines:
            if self.used(limit, deadline) + cost <= limit.amount:
                return deadline - now
        raise AssertionError("the window never has room")

    def decide(
        self, expected: Usage, now: float, in_flight: int
    ) -> tuple[str, float | None, Limit | None] | None:
        """``None`` to admit, else (reason, retry_after, limit)."""
        worst: tuple[str, float | None, Limit | None] | None = None
        for limit in self.limits:
            cost = metric_value(limit.metric, expected)
            if self.used(limit, now) + cost <= limit.amount:
                continue
            if limit.window_seconds is None:
                return ("budget", None, limit)
            if cost > limit.amount:
                return ("window", None, limit)
            retry = self.retry_after(limit, cost, now)
            if worst is None or retry > (worst[1] or 0.0):
                worst = ("window", retry, limit)
        if worst is not None:
            return worst
        if self.concurrency is not None and in_flight >= self.concurrency:
            return ("concurrency", CONCURRENCY_RETRY_AFTER, None)
        return None


MODEL_LIMITS = [
    parse_limit("requests:4/10s"),
    parse_limit("tokens:3000/1m"),
    parse_limit("input_tokens:1500/10s"),
    parse_limit("output_tokens:2500/1m"),
    parse_budget("tokens:40k"),
]
MODEL_CONCURRENCY = 3
MODEL_LIFETIME = Usage(5, 2000, 1000)

expected_usage = st.builds(Usage, st.just(1), st.integers(0, 900), st.integers(0, 900))
actual_usage = st.builds(Usage, st.just(1), st.integers(0, 1500), st.integers(0, 1500))


class LimiterModel(RuleBasedStateMachine):
    """Shared set-up: a limiter and a reference fed the same operations."""

    steps: ClassVar[list[float]] = []

    def __init__(self, new_limiter: NewLimiter) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.limiter = new_limiter(self.clock)
        self.limiter.configure(KEY, MODEL_LIMITS, MODEL_CONCURRENCY)
        self.limiter.load_history(KEY, [], MODEL_LIFETIME)
        self.reference = Reference(MODEL_LIMITS, MODEL_CONCURRENCY, MODEL_LIFETIME)
        self.open: list[tuple[Ticket, Event]] = []
        self.settled: list[Ticket] = []

    def teardown(self) -> None:
        self.limiter.close()

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), actual=actual_usage)
    def settle(self, data: st.DataObject, actual: Usage) -> None:
        ticket, event = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        self.limiter.settle(ticket, actual)
        event.usage = actual
        event.settled = True
        self.settled.append(ticket)

    @precondition(lambda self: bool(self.settled))
    @rule(data=st.data(), actual=actual_usage)
    def settle_again(self, data: st.DataObject, actual: Usage) -> None:
        self.limiter.settle(data.draw(st.sampled_from(self.settled)), actual)

    @rule(data=st.data())
    def advance_clock(self, data: st.DataObject) -> None:
        self.clock.advance(data.draw(st.sampled_from(self.steps)))

    def record(self, ticket: Ticket, expected: Usage) -> None:
        event = Event(self.clock.now, expected)
        self.reference.events.append(event)
        self.open.append((ticket, event))

    @invariant()
    def in_flight_matches(self) -> None:
        assert self.limiter.in_flight(KEY) == len(self.open)


class SpacedEventsMatchTheReference(LimiterModel):
    """Events further apart than every resolution (or at the same instant): exact agreement."""

    steps: ClassVar[list[float]] = [0.0, 0.5, 1.0, 2.5, 9.5, 10.0, 10.5, 30.0, 59.5, 60.0, 61.0]

    @rule(expected=expected_usage)
    def admit(self, expected: Usage) -> None:
        now = self.clock.now
        want = self.reference.decide(expected, now, len(self.open))
        got = self.limiter.admit(KEY, expected)
        if want is None:
            self.record(admitted(got), expected)
        else:
            refusal = refused(got)
            assert (refusal.reason, refusal.retry_after, refusal.limit) == want

    @rule(data=st.data())
    def reload_from_history(self, data: st.DataObject) -> None:
        stored = [e for e in self.reference.events if e.settled]
        rows = [(e.at, e.usage.input_tokens, e.usage.output_tokens) for e in stored]
        rows = data.draw(st.permutations(rows))
        lifetime = Usage(
            MODEL_LIFETIME.requests + len(stored),
            MODEL_LIFETIME.input_tokens + sum(e.usage.input_tokens for e in stored),
            MODEL_LIFETIME.output_tokens + sum(e.usage.output_tokens for e in stored),
        )
        self.limiter.load_history(KEY, rows, lifetime)

    @invariant()
    def every_limit_matches_the_reference(self) -> None:
        now = self.clock.now
        states = self.limiter.states(KEY)
        assert [s.limit for s in states] == MODEL_LIMITS
        for state in states:
            used = self.reference.used(state.limit, now)
            assert state.used == used, state
            assert state.remaining == max(0, state.limit.amount - used)
            assert state.reset_seconds == self.reference.reset_seconds(state.limit, now), state

    @invariant()
    def headers_describe_the_tightest_windows(self) -> None:
        now = self.clock.now
        expected: list[tuple[bytes, bytes]] = []
        for kind, metrics in (("requests", {"requests"}), ("tokens", set(METRICS) - {"requests"})):
            windows = [lim for lim in MODEL_LIMITS if lim.metric in metrics and lim.window_seconds]
            remaining = {lim: max(0, lim.amount - self.reference.used(lim, now)) for lim in windows}
            tightest = min(windows, key=lambda lim: remaining[lim] / lim.amount)
            reset = format_reset(self.reference.reset_seconds(tightest, now))
            expected += [
                (f"x-ratelimit-limit-{kind}".encode(), str(tightest.amount).encode()),
                (f"x-ratelimit-remaining-{kind}".encode(), str(remaining[tightest]).encode()),
                (f"x-ratelimit-reset-{kind}".encode(), reset.encode()),
            ]
        assert headers_of(self.limiter)(KEY) == expected


class FoldedEventsNeverAdmitMoreThanTheReference(LimiterModel):
    """Events closer than the resolution fold together: the limiter may only be stricter."""

    steps: ClassVar[list[float]] = [
        0.0,
        0.001,
        0.004,
        0.01,
        0.02,
        0.05,
        0.07,
        0.5,
        9.99,
        10.0,
        59.97,
        60.0,
    ]

    @rule(expected=expected_usage)
    def admit(self, expected: Usage) -> None:
        now = self.clock.now
        want = self.reference.decide(expected, now, len(self.open))
        got = self.limiter.admit(KEY, expected)
        if isinstance(got, Ticket):
            assert want is None, "admitted a request the reference refuses"
            self.record(got, expected)

    @invariant()
    def usage_is_never_undercounted_and_leaves_at_most_one_resolution_late(self) -> None:
        now = self.clock.now
        for state in self.limiter.states(KEY):
            limit = state.limit
            assert state.used >= self.reference.used(limit, now)
            if limit.window_seconds is None:
                assert state.used == self.reference.used(limit, now)
            else:
                slack = limit.window_seconds / 1000 + 1e-6
                assert state.used <= self.reference.used(limit, now, slack)


model_settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# On Redis every step is a few round trips: fewer examples keep the run within its timeout
# on a busy machine, and the reference models still run the same rules.
shared_model_settings = settings(model_settings, max_examples=40)


def _model_settings(engine: str) -> settings:
    return model_settings if engine == "memory" else shared_model_settings


def test_spaced_events_match_the_reference(new_limiter: NewLimiter, engine: str) -> None:
    run_state_machine_as_test(
        lambda: SpacedEventsMatchTheReference(new_limiter), settings=_model_settings(engine)
    )


def test_folded_events_never_admit_more_than_the_reference(
    new_limiter: NewLimiter, engine: str
) -> None:
    run_state_machine_as_test(
        lambda: FoldedEventsNeverAdmitMoreThanTheReference(new_limiter),
        settings=_model_settings(engine),
    )


# -- the in-memory limiter's cache of summaries (the shared one's come with every reply) ------


def memory_headers(limiter: Limiter, clock: Callable[[], float]) -> RateLimitHeaders:
    return RateLimitHeaders(
        lambda key_id, fresh: limiter.tightest(key_id, fresh=fresh), clock, max_age=0.005
    )


def test_headers_may_lag_by_the_max_age_but_never_when_fresh_is_asked() -> None:
    now = [1000.0]
    limiter = Limiter(lambda: now[0], summary_max_age=0.005)
    encoder = memory_headers(limiter, lambda: now[0])
    limiter.configure(1, [parse_limit("requests:10/1m")], None)
    limiter.load_history(1, [], Usage(0))
    assert dict(encoder.for_key(1))[b"x-ratelimit-remaining-requests"] == b"10"
    ticket = limiter.admit(1, Usage(1, 0, 0))
    assert not isinstance(ticket, Refusal)
    assert dict(encoder.for_key(1))[b"x-ratelimit-remaining-requests"] == b"10"
    assert dict(encoder.for_key(1, fresh=True))[b"x-ratelimit-remaining-requests"] == b"9"
    limiter.admit(1, Usage(1, 0, 0))
    now[0] += 0.006
    assert dict(encoder.for_key(1))[b"x-ratelimit-remaining-requests"] == b"8"


def test_a_reset_may_overstate_by_the_max_age_but_never_understate() -> None:
    now = [1000.0]
    limiter = Limiter(lambda: now[0], summary_max_age=0.005)
    encoder = memory_headers(limiter, lambda: now[0])
    limiter.configure(1, [parse_limit("requests:10/1m")], None)
    limiter.load_history(1, [], Usage(0))
    limiter.admit(1, Usage(1, 0, 0))

    def reset() -> bytes:
        return dict(encoder.for_key(1))[b"x-ratelimit-reset-requests"]

    assert reset() == b"1m0s"
    now[0] += 0.003  # within the max age: the same text, 3 ms long, never short
    assert reset() == b"1m0s"
    assert dict(encoder.for_key(1, fresh=True))[b"x-ratelimit-reset-requests"] == (b"59.997s")
    now[0] += 0.006  # past the max age: computed again
    assert reset() == b"59.991s"
