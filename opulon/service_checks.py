"""One look at a shared service: is it there, which version, how far away.

``opulon doctor`` prints these for the store's PostgreSQL and the limiter's Redis; the
gateway's ``/healthz`` asks the same of its own connections. A service that cannot be reached
is a :class:`ServiceUnreachable` with one line that names it (its URL without the password).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from opulon.database_url import redact
from opulon.errors import InvalidInput, OpulonError

__all__ = [
    "ServiceCheck",
    "ServiceUnreachable",
    "check_postgresql",
    "check_redis",
    "check_redis_url",
]

_ROUND_TRIPS = 5


class ServiceUnreachable(OpulonError):
    """A service the installation is configured to use does not answer."""


@dataclass(frozen=True, slots=True)
class ServiceCheck:
    """What one look found: the server's version and the median round trip."""

    service: str  # PostgreSQL | Redis
    url: str  # without its password
    version: str
    latency_ms: float

    def describe(self) -> str:
        return f"{self.service} {self.version} at {self.url}, {self.latency_ms:.2f} ms a round trip"


def _median_ms(call: Callable[[], object]) -> float:
    times = []
    for _ in range(_ROUND_TRIPS):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _without_secrets(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``) with the URL's password taken out, in any
    spelling the driver may have quoted it in."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(str(secret), "***")
    return text


def check_postgresql(url: str, *, timeout: float = 3.0) -> ServiceCheck:
    """Connect to the PostgreSQL at ``url``: its version and the median ``SELECT 1``."""
    import psycopg

    shown = redact(url)
    try:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout)), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]).split()[0] if row else "?"
            latency = _median_ms(lambda: conn.execute("SELECT 1").fetchone())
    except psycopg.Error as exc:
        reason = _without_secrets(_first_line(exc), url)
        raise ServiceUnreachable(f"PostgreSQL at {shown} cannot be reached: {reason}") from None
    return ServiceCheck("PostgreSQL", shown, version, latency)


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str, *, option: str = "--redis") -> str:
    """``url`` if it names a Redis (``redis://HOST:PORT/DB``, ``rediss://`` with TLS, or
    ``unix:///path``); else :class:`~opulon.errors.InvalidInput` saying why."""
    from urllib.parse import urlsplit

    from opulon.limiter_redis import redacted_url

    text = url.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidInput(f"invalid {option} URL: {exc}; e.g. redis://127.0.0.1:6379/0") from None
    if parts.scheme not in _REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
        raise InvalidInput(
            f"invalid {option} {redacted_url(text)}: expected redis://HOST:PORT/DB "
            "(rediss:// with TLS), e.g. redis://127.0.0.1:6379/0"
        )
    return text


def check_redis(url: str, *, timeout: float = 1.0) -> ServiceCheck:
    """Connect to the Redis at ``url``: its version and the median ``PING``."""
    import redis
    from redis.exceptions import RedisError

    from opulon.limiter_redis import redacted_url

    shown = redacted_url(url)
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError as exc:
        raise ServiceUnreachable(f"invalid Redis URL {shown}: {_first_line(exc)}") from None
    try:
        info = client.info("server")
        version = str(info.get("redis_version", "?"))
        latency = _median_ms(client.ping)
    except (RedisError, OSError) as exc:
        reason = _without_secrets(_first_line(exc), url)
        raise ServiceUnreachable(f"Redis at {shown} cannot be reached: {reason}") from None
    finally:
        client.close()
    return ServiceCheck("Redis", shown, version, latency)
