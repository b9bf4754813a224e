"""How much of a limit is used: the one computation behind every place that shows it.

The live server (:meth:`opulon.limiter.Limiter.states`, in-memory sums with reservations of
requests in flight), ``keys list/show`` (:func:`opulon.usage.stored_limit_states`),
``opulon usage`` (:mod:`opulon.reports`) and ``/key-status`` all hand :func:`limit_state` a
limit, the amount used in its window (or ever, for a budget) and when the oldest usage in the
window happened; it returns what is used, what is left and when the window frees up.
"""

from __future__ import annotations

from dataclasses import dataclass

from opulon.limits import Limit

__all__ = ["LimitState", "limit_state"]


@dataclass(frozen=True, slots=True)
class LimitState:
    """How much of one limit is used (reservations of requests in flight included)."""

    limit: Limit
    used: int
    remaining: int
    reset_seconds: float

    def to_json(self) -> dict[str, object]:
        """The form every JSON output uses: CLI, reports and the key-status API."""
        return {
            "limit": str(self.limit),
            "used": self.used,
            "remaining": self.remaining,
            "reset_seconds": round(self.reset_seconds, 3),
        }


def limit_state(limit: Limit, used: int, oldest: float | None, now: float) -> LimitState:
    """The use of ``limit`` at ``now``.

    ``used`` is the amount of the limit's metric counted in its window (a lifetime budget:
    ever); ``oldest`` is when the oldest usage still in the window happened, ``None`` if there
    is none. A window frees up when that usage leaves it (``now - oldest >= window``); a budget
    never does, and neither does an empty window need to.
    """
    seconds = limit.window_seconds
    if seconds is None or oldest is None or used <= 0:
        reset = 0.0
    else:
        reset = max(0.0, oldest + seconds - now)
    return LimitState(limit, used, max(0, limit.amount - used), reset)
