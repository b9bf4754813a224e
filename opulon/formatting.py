"""How times, numbers and durations read, in the terminal and on the pages alike.

Plain Python with no dependency: the CLI formats with these functions, the page templates
use them as Jinja filters, the limiter words its refusals and rate-limit headers with them.
Every time is UTC, but for the server's log lines, which read like the rest of its log.
"""

from __future__ import annotations

import math
import time
from datetime import date

__all__ = [
    "CLOCK",
    "DATE",
    "MINUTE",
    "SECOND",
    "compact",
    "format_duration",
    "format_reset",
    "grouped",
    "iso",
    "latency_exact",
    "latency_short",
    "latency_text",
    "log_stamp",
    "long_date",
    "relative_duration",
    "short_date",
    "utc",
    "window_text",
]

#: ``strftime`` formats for :func:`utc`.
MINUTE = "%Y-%m-%d %H:%M"
SECOND = "%Y-%m-%d %H:%M:%S"
DATE = "%Y-%m-%d"
CLOCK = "%H:%M:%S"

_DAY = 86400
_UNITS = (("week", 604800), ("day", _DAY), ("hour", 3600), ("minute", 60), ("second", 1))


# -- times ----------------------------------------------------------------------------------


def iso(ts: float) -> str:
    """UTC ISO 8601 to the second, as every JSON output writes it: ``2026-11-25T14:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.floor(ts)))


def utc(ts: float | None, fmt: str = MINUTE) -> str:
    """A UTC time for people, ``2026-11-25 14:00`` by default; ``-`` for no time at all."""
    if ts is None:
        return "-"
    return time.strftime(fmt, time.gmtime(math.floor(ts)))


def log_stamp(second: int) -> str:
    """The server's local time of a log line, to the second: ``2026-11-25 15:00:00``."""
    return time.strftime(SECOND, time.localtime(second))


def short_date(day: date) -> str:
    """``Mar 2``: a day on a chart axis."""
    return f"{day.strftime('%b')} {day.day}"


def long_date(day: date) -> str:
    """A date as a policy writes it: March 22, 2026."""
    return f"{day:%B} {day.day}, {day.year}"


# -- numbers --------------------------------------------------------------------------------


def grouped(n: int) -> str:
    """``1234567`` → ``1,234,567``."""
    return f"{n:,}"


def compact(n: int) -> str:
    """``950`` → ``950``, ``1234`` → ``1.2k``, ``1500000`` → ``1.5M``, ``999999`` → ``1M``."""
    if abs(n) < 1000:
        return str(n)
    for suffix, factor in (("k", 1e3), ("M", 1e6), ("B", 1e9)):
        value = n / factor
        text = f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
        if abs(float(text)) < 1000 or suffix == "B":
            return text.removesuffix(".0") + suffix
    raise AssertionError("unreachable")  # pragma: no cover


def latency_text(ms: float) -> str:
    """A latency on a page: ``840 ms``, ``1,234 ms``, ``12.5 s``."""
    return f"{ms:,.0f} ms" if ms < 10_000 else f"{ms / 1000:,.1f} s"


def latency_exact(ms: float) -> str:
    """A latency to a tenth of a millisecond: ``1,395.0 ms``."""
    return f"{ms:,.1f} ms"


def latency_short(ms: float) -> str:
    """A latency in few characters: ``400ms``, ``3.9s``."""
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.1f}s"


# -- durations ------------------------------------------------------------------------------


def window_text(seconds: int) -> str:
    """A window's length in words: ``60`` → ``1 minute``, ``18000`` → ``5 hours``."""
    for unit, factor in _UNITS:
        if seconds % factor == 0:
            count = seconds // factor
            return f"{count} {unit}" if count == 1 else f"{count} {unit}s"
    return f"{seconds} seconds"  # pragma: no cover - the loop ends with a factor of 1


def format_duration(seconds: float) -> str:
    """A wait in messages: ``2h14m``, ``45s``; rounded up to the second."""
    total = max(0, int(seconds + 0.999))
    days, rest = divmod(total, _DAY)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def relative_duration(seconds: float) -> str:
    """How long until or since: whole days from two days on (``12 days``), else ``5h20m``."""
    if seconds >= 2 * _DAY:
        return f"{int(seconds // _DAY)} days"
    return format_duration(seconds)


def format_reset(seconds: float) -> str:
    """Duration in OpenAI's rate-limit header format: ``120ms``, ``1.5s``, ``6m0s``, ``1h2m3s``.

    Rounded up to the millisecond, so a client that waits this long finds room.
    """
    millis = math.ceil(round(seconds * 1000, 3))
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    whole, frac = divmod(millis, 1000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"
