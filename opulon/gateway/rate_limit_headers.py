"""The rate-limit headers of a key's answers, in each API's own names.

OpenAI-style ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` report the tightest
requests window and the tightest token window, the reset as a duration (``1m30s``).
Anthropic's ``anthropic-ratelimit-{metric}-{limit,remaining,reset}`` report the tightest
window of each metric (requests, tokens, input and output tokens), the reset as an RFC 3339
time. A header is left out where the key has no such window.

The numbers come from the limiter's :class:`~opulon.limiter.Tightest` summary; the bytes are
built here and kept until the summary changes (durations are re-encoded at most every
``max_age`` seconds, since they count down).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from opulon.formatting import format_reset, iso
from opulon.limiter import Tightest, WindowUse

Headers = list[tuple[bytes, bytes]]

_OPENAI = (
    (
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
        b"x-ratelimit-reset-requests",
    ),
    (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens"),
)
_ANTHROPIC_PREFIXES = (
    b"anthropic-ratelimit-requests-",
    b"anthropic-ratelimit-tokens-",
    b"anthropic-ratelimit-input-tokens-",
    b"anthropic-ratelimit-output-tokens-",
)
_MAX_CACHED_KEYS = 10_000


class _Encoded:
    __slots__ = ("anthropic", "openai", "openai_at", "summary")

    def __init__(self, summary: Tightest) -> None:
        self.summary = summary
        self.openai: Headers | None = None
        self.openai_at = 0.0
        self.anthropic: Headers | None = None


class RateLimitHeaders:
    """Encodes the limiter's summaries of a key as response headers."""

    def __init__(
        self,
        tightest: Callable[[int, bool], Tightest | None],
        clock: Callable[[], float],
        *,
        max_age: float = 0.0,
    ) -> None:
        self._tightest = tightest
        self._clock = clock
        self._max_age = max_age
        self._encoded: dict[int, _Encoded] = {}

    def for_key(self, key_id: int, *, anthropic: bool = False, fresh: bool = False) -> Headers:
        """The headers of ``key_id`` (a new list the caller may extend); ``fresh``: exact now."""
        summary = self._tightest(key_id, fresh)
        if summary is None:
            return []
        encoded = self._encoded.get(key_id)
        if encoded is None or encoded.summary is not summary:
            if len(self._encoded) >= _MAX_CACHED_KEYS:
                self._encoded.clear()
            encoded = self._encoded[key_id] = _Encoded(summary)
        if anthropic:
            if encoded.anthropic is None:
                encoded.anthropic = _anthropic(summary)
            return list(encoded.anthropic)
        now = self._clock()
        headers = encoded.openai
        if headers is None or fresh or now - encoded.openai_at >= self._max_age:
            headers = encoded.openai = _openai(summary, now)
            encoded.openai_at = now
        return list(headers)


def _openai(summary: Tightest, now: float) -> Headers:
    headers: Headers = []
    for names, use in zip(_OPENAI, (summary.requests, summary.tokens), strict=True):
        if use is not None:
            headers.append((names[0], str(use.limit).encode()))
            headers.append((names[1], str(use.remaining).encode()))
            headers.append((names[2], _duration(use, now)))
    return headers


def _duration(use: WindowUse, now: float) -> bytes:
    if use.resets_at is None:
        return b"0s"
    return format_reset(use.resets_at - now).encode()


def _anthropic(summary: Tightest) -> Headers:
    headers: Headers = []
    for prefix, use in zip(_ANTHROPIC_PREFIXES, summary.per_metric, strict=True):
        if use is None:
            continue
        deadline = summary.built_at if use.resets_at is None else use.resets_at
        # Rounded up to the second, so a client that waits until then finds room.
        reset = iso(math.ceil(deadline))
        headers.append((prefix + b"limit", str(use.limit).encode()))
        headers.append((prefix + b"remaining", str(use.remaining).encode()))
        headers.append((prefix + b"reset", reset.encode()))
    return headers
