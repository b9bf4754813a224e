"""Limit specifications: parsing and formatting of what an admin writes.

``requests:60/1m`` is a rolling window, ``tokens:100M`` (from ``--budget``) a lifetime budget.
Enforcement lives in :mod:`opulon.limiter`; this module only understands the notation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from opulon.errors import InvalidInput

METRICS = ("requests", "tokens", "input_tokens", "output_tokens")

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AMOUNT_SUFFIXES = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}
_AMOUNT_RE = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)([kKmMbBgG]?)$")
_WINDOW_RE = re.compile(r"^(\d+)([smhdw])$")
MAX_WINDOW_SECONDS = 366 * 86400


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit: ``amount`` of ``metric`` per ``window_seconds`` (``None`` = lifetime budget)."""

    metric: str
    amount: int
    window_seconds: int | None

    @property
    def is_budget(self) -> bool:
        return self.window_seconds is None

    def __str__(self) -> str:
        if self.window_seconds is None:
            return f"{self.metric}:{format_amount(self.amount)}"
        return f"{self.metric}:{format_amount(self.amount)}/{format_window(self.window_seconds)}"


def parse_amount(text: str, *, context: str) -> int:
    """Parse ``60``, ``250k``, ``1.5M`` into a positive integer."""
    match = _AMOUNT_RE.match(text.strip())
    if not match:
        raise InvalidInput(f"invalid amount {text!r} in {context}")
    number, suffix = match.groups()
    value = float(number) * _AMOUNT_SUFFIXES[suffix.lower()]
    if value != int(value):
        raise InvalidInput(f"invalid amount {text!r} in {context}: not a whole number")
    if value < 1:
        raise InvalidInput(f"invalid amount {text!r} in {context}: must be at least 1")
    return int(value)


def parse_window(text: str, *, context: str) -> int:
    """Parse ``30s``, ``1m``, ``5h``, ``7d`` into seconds."""
    match = _WINDOW_RE.match(text.strip())
    if not match:
        raise InvalidInput(
            f"invalid window {text!r} in {context}: use a number and s, m, h, d or w, e.g. 5h"
        )
    seconds = int(match.group(1)) * _WINDOW_UNITS[match.group(2)]
    if seconds < 1:
        raise InvalidInput(f"invalid window {text!r} in {context}: must be at least 1s")
    if seconds > MAX_WINDOW_SECONDS:
        raise InvalidInput(f"invalid window {text!r} in {context}: at most 366d")
    return seconds


def _split_metric(text: str, context: str) -> tuple[str, str]:
    metric, sep, rest = text.partition(":")
    metric = metric.strip()
    if not sep or not rest:
        raise InvalidInput(f"invalid {context}: expected METRIC:AMOUNT")
    if metric not in METRICS:
        raise InvalidInput(
            f"unknown metric {metric!r} in {context}: use one of {', '.join(METRICS)}"
        )
    return metric, rest


def parse_limit(text: str) -> Limit:
    """Parse a rolling limit such as ``requests:60/1m`` or ``tokens:1.5M/5h``."""
    context = f"limit {text!r}"
    metric, rest = _split_metric(text, context)
    amount_text, sep, window_text = rest.partition("/")
    if not sep:
        raise InvalidInput(
            f"missing window in {context}: expected METRIC:AMOUNT/WINDOW, e.g. requests:60/1m"
        )
    amount = parse_amount(amount_text, context=context)
    window = parse_window(window_text, context=context)
    return Limit(metric, amount, window)


def parse_budget(text: str) -> Limit:
    """Parse a lifetime budget such as ``tokens:100M``."""
    context = f"budget {text!r}"
    metric, rest = _split_metric(text, context)
    if "/" in rest:
        raise InvalidInput(f"a budget has no window: {context}; use --limit for rolling windows")
    return Limit(metric, parse_amount(rest, context=context), None)


def parse_limit_slot(text: str) -> tuple[str, int]:
    """The (metric, window) a ``--remove-limit`` names: ``requests/1m`` or ``requests:60/1m``."""
    context = f"limit {text!r}"
    metric, sep, window_text = text.strip().partition("/")
    if ":" in metric:
        limit = parse_limit(text)
        return limit.metric, limit.window_seconds or 0
    if not sep:
        raise InvalidInput(f"missing window in {context}: expected METRIC/WINDOW, e.g. requests/1m")
    metric, _ = _split_metric(f"{metric}:1", context)
    return metric, parse_window(window_text, context=context)


def merge_limits(
    current: Sequence[Limit], added: Sequence[Limit], removed: Sequence[tuple[str, int]]
) -> tuple[list[Limit], list[str]]:
    """The rolling limits after adding and removing some, and what changed, in words.

    An added limit replaces the one with the same metric and window, or joins the others;
    every other limit stays. Removing a limit the key does not have is an error.
    """
    result = {(lim.metric, lim.window_seconds): lim for lim in current if not lim.is_budget}
    changes: list[str] = []
    for metric, window in removed:
        gone = result.pop((metric, window), None)
        if gone is None:
            raise InvalidInput(f"the key has no limit on {metric} per {format_window(window)}")
        changes.append(f"removed {gone}")
    for limit in added:
        slot = (limit.metric, limit.window_seconds)
        before = result.get(slot)
        result[slot] = limit
        if before is None:
            changes.append(f"added {limit}")
        elif before != limit:
            changes.append(f"replaced {before} with {limit}")
    return list(result.values()), changes


def parse_expires(text: str, *, now: datetime | None = None) -> datetime:
    """Parse ``30d`` (from now) or an ISO date / datetime into an aware UTC datetime."""
    now = now or datetime.now(UTC)
    stripped = text.strip()
    if _WINDOW_RE.match(stripped):
        return now + timedelta(seconds=parse_window(stripped, context=f"expiry {text!r}"))
    try:
        if len(stripped) == 10:
            moment = datetime.combine(date.fromisoformat(stripped), time(0), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise InvalidInput(
            f"invalid expiry {text!r}: use a duration like 30d or a date like 2027-01-31"
        ) from None
    if moment <= now:
        raise InvalidInput(f"invalid expiry {text!r}: it is in the past")
    return moment.astimezone(UTC)


def format_amount(amount: int) -> str:
    for suffix, factor in (("B", 1_000_000_000), ("M", 1_000_000), ("k", 1_000)):
        if amount >= factor and amount % (factor // 10) == 0:
            value = amount / factor
            return f"{value:g}{suffix}"
    return str(amount)


def format_window(seconds: int) -> str:
    for unit, factor in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % factor == 0 and unit != "w":
            return f"{seconds // factor}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class Usage:
    """What a request costs: one request and its input and output tokens."""

    requests: int = 1
    input_tokens: int = 0
    output_tokens: int = 0

    def __post_init__(self) -> None:
        if self.requests < 0 or self.input_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"usage counts cannot be negative: {self!r}")
