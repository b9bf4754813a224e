"""Microseconds per admission (and per admission + settlement) of the Redis limiter.

    .venv/bin/python bench/limiter_redis.py                      # the local Redis, ~20 s
    .venv/bin/python bench/limiter_redis.py --url redis://host:6379/0 --rounds 5000
    .venv/bin/python bench/limiter_redis.py --loop asyncio          # not uvloop

Runs 1 and 16 concurrent tasks, each admitting and settling requests of its own key (on the
limiter's one connection for script calls) against ``requests:1M/1m``, ``tokens:1G/1h`` and a
budget, on the node's real clock, and prints wall-clock µs per round (admission and
settlement) and per admission alone, with the in-memory limiter's figures beside them; for
Redis also this process's CPU µs per round and Redis's own µs per script call (from
``INFO commandstats``, read before and after), and first a PING's round trip, the floor of
any call on the machine. The keys live under a prefix of their own, removed afterwards.
The event loop is uvloop by default, as the gateway runs under it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from opulon.limiter import Limiter, Ticket
from opulon.limiter_redis import AsyncLimiter, LocalLimiter, RedisLimiter
from opulon.limits import Usage, parse_budget, parse_limit

LIMITS = [parse_limit("requests:1M/1m"), parse_limit("tokens:1G/1h"), parse_budget("tokens:1000B")]


class NoHistory:
    def window_history(self, key_id: int, since: float) -> list[tuple[float, int, int]]:
        return []

    def lifetime_usage(self, key_id: int) -> Usage:
        return Usage(0, 0, 0)


async def task(limiter: AsyncLimiter, key_id: int, rounds: int, settle: bool) -> None:
    for _ in range(rounds):
        ticket = await limiter.admit(key_id, Usage(1, 500, 200))
        assert isinstance(ticket, Ticket), ticket
        if settle:
            await limiter.settle(ticket, Usage(1, 480, 150))


async def script_time(limiter: AsyncLimiter) -> tuple[int, int]:
    """(calls, µs) of EVALSHA so far, on a Redis limiter's server; (0, 0) for another."""
    if not isinstance(limiter, RedisLimiter):
        return 0, 0
    stats = (await limiter.redis.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def measure(
    limiter: AsyncLimiter, tasks: int, rounds: int, settle: bool
) -> tuple[float, float, float]:
    """µs per round, all tasks together: wall clock, this process's CPU, Redis per call."""
    for key_id in range(tasks):
        limiter.configure(key_id, LIMITS, 1_000_000)
    await asyncio.gather(*(task(limiter, k, 50, True) for k in range(tasks)))  # warm up
    calls, usec = await script_time(limiter)
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(task(limiter, k, rounds, settle) for k in range(tasks)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    calls_after, usec_after = await script_time(limiter)
    n = tasks * rounds
    per_call = (usec_after - usec) / max(1, calls_after - calls)
    return wall / n * 1e6, cpu / n * 1e6, per_call


async def ping_time(limiter: RedisLimiter, rounds: int) -> float:
    """µs per PING: the round trip alone, the floor of any Redis call on this machine."""
    await limiter.redis.ping()
    started = time.perf_counter()
    for _ in range(rounds):
        await limiter.redis.ping()
    return (time.perf_counter() - started) / rounds * 1e6


async def main(url: str, rounds: int) -> None:
    prefix = f"opulon-bench:{uuid.uuid4().hex}:"
    shared = RedisLimiter.from_url(url, NoHistory(), prefix=prefix)
    local = LocalLimiter(Limiter())
    try:
        print(f"PING round trip: {await ping_time(shared, rounds):.1f} µs")
        print(
            f"{'engine':7} {'tasks':>5} | {'admit+settle µs':>15} {'cpu µs':>7} "
            f"{'redis µs/call':>13} | {'admit µs':>8} {'cpu µs':>7} {'redis µs/call':>13}"
        )
        for tasks in (1, 16):
            for name, limiter in (("redis", shared), ("memory", local)):
                both = await measure(limiter, tasks, rounds, True)
                admit = await measure(limiter, tasks, rounds, False)
                print(
                    f"{name:7} {tasks:>5} | {both[0]:>15.1f} {both[1]:>7.1f} {both[2]:>13.1f} "
                    f"| {admit[0]:>8.1f} {admit[1]:>7.1f} {admit[2]:>13.1f}"
                )
    finally:
        names = [name async for name in shared.redis.scan_iter(match=prefix + "*")]
        if names:
            await shared.redis.delete(*names)
        await shared.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=2000, help="rounds per task")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    options = parser.parse_args()
    if options.loop == "uvloop":
        import uvloop

        uvloop.run(main(options.url, options.rounds))
    else:
        asyncio.run(main(options.url, options.rounds))
