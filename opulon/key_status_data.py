"""What a key holder sees about their own key, as data: no HTML here.

:func:`read_usage` reads the key's stored metadata (tokens per UTC day for the last 30 days,
the last requests), :func:`build_status` joins it with the key's record and its limit use,
and :func:`status_json` is the JSON form ``GET /v1/key-status`` answers with. The page
``/key-status`` draws the same :class:`KeyStatus` from its template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from opulon.formatting import iso, window_text
from opulon.keys import KeyRecord
from opulon.limit_use import LimitState
from opulon.limits import Limit
from opulon.storage import Connection, Store, connect, is_sqlite

__all__ = [
    "DAYS",
    "RECENT",
    "DayUsage",
    "KeyStatus",
    "LimitView",
    "RecentRequest",
    "build_status",
    "read_usage",
    "read_usage_on",
    "status_json",
]

DAYS = 30
RECENT = 20
_DAY = 86400

_METRIC_NAMES = {
    "requests": "Requests",
    "tokens": "Tokens",
    "input_tokens": "Input tokens",
    "output_tokens": "Output tokens",
}


@dataclass(frozen=True, slots=True)
class LimitView:
    """One limit of the key with its use right now (in-flight reservations included)."""

    limit: Limit
    used: int
    remaining: int
    reset_seconds: float

    @property
    def title(self) -> str:
        """``Requests per minute``, ``Tokens per 5 hours``, ``Tokens, lifetime budget``."""
        name = _METRIC_NAMES.get(self.limit.metric, self.limit.metric)
        if self.limit.window_seconds is None:
            return f"{name}, lifetime budget"
        return f"{name} per {window_text(self.limit.window_seconds).removeprefix('1 ')}"

    @property
    def fraction(self) -> float:
        return min(1.0, self.used / self.limit.amount) if self.limit.amount else 1.0


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One UTC day of the key's use."""

    day: date
    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class RecentRequest:
    """One stored request, exactly the metadata the privacy policy names."""

    ts: float
    model: str
    status: int
    input_tokens: int
    output_tokens: int
    latency_ms: float


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """Everything the status page and ``GET /v1/key-status`` show about one key."""

    record: KeyRecord
    now: float
    limits: tuple[LimitView, ...]
    in_flight: int
    days: tuple[DayUsage, ...]
    recent: tuple[RecentRequest, ...]

    @property
    def state(self) -> str:
        """``active``, ``disabled`` or ``expired``."""
        return self.record.state(self.now)


def read_usage(
    where: Path | Store, key_id: int, now: float, *, days: int = DAYS, recent: int = RECENT
) -> tuple[list[DayUsage], list[RecentRequest]]:
    """Tokens per UTC day for the last ``days`` days (oldest first, empty days included) and
    the ``recent`` newest requests (newest first) of one key, from the SQLite file at
    ``where`` or from the store ``where`` is.

    Opens its own short-lived read-only connection, so it may run in a worker thread.
    """
    conn = (
        where.connect(read_only=True)
        if isinstance(where, Store)
        else connect(where, timeout=10, read_only=True)
    )
    try:
        return read_usage_on(conn, key_id, now, days=days, recent=recent)
    finally:
        conn.close()


def read_usage_on(
    conn: Connection, key_id: int, now: float, *, days: int = DAYS, recent: int = RECENT
) -> tuple[list[DayUsage], list[RecentRequest]]:
    """:func:`read_usage` on a connection the caller holds (one thread at a time)."""
    today = int(now // _DAY)
    first = today - days + 1
    # The UTC day of a timestamp: SQLite's CAST truncates, PostgreSQL's rounds.
    day_sql = "CAST(ts / 86400 AS INTEGER)" if is_sqlite(conn) else "floor(ts / 86400)::bigint"
    per_day = {
        int(day): (int(requests), int(input_tokens or 0), int(output_tokens or 0))
        for day, requests, input_tokens, output_tokens in conn.execute(
            f"SELECT {day_sql} AS day, count(*), sum(input_tokens), "
            "sum(output_tokens) FROM usage WHERE key_id = ? AND ts >= ? GROUP BY day",
            [key_id, first * _DAY],
        )
    }
    rows = conn.execute(
        "SELECT ts, model, status, input_tokens, output_tokens, latency_ms FROM usage "
        "WHERE key_id = ? ORDER BY ts DESC LIMIT ?",
        [key_id, recent],
    ).fetchall()
    epoch = date(1970, 1, 1)
    day_list = [
        DayUsage(epoch + timedelta(days=day), *per_day.get(day, (0, 0, 0)))
        for day in range(first, today + 1)
    ]
    recent_list = [
        RecentRequest(float(ts), str(model), int(status), int(i), int(o), float(latency))
        for ts, model, status, i, o, latency in rows
    ]
    return day_list, recent_list


def build_status(
    record: KeyRecord,
    states: Sequence[LimitState],
    in_flight: int,
    days: Sequence[DayUsage],
    recent: Sequence[RecentRequest],
    now: float,
) -> KeyStatus:
    """Join a key's record, its limiter state and its stored usage."""
    limits = tuple(
        LimitView(s.limit, s.used, s.remaining, max(0.0, s.reset_seconds)) for s in states
    )
    return KeyStatus(record, now, limits, in_flight, tuple(days), tuple(recent))


def status_json(status: KeyStatus) -> dict[str, Any]:
    """The JSON form of the status, for ``GET /v1/key-status``."""
    record = status.record
    return {
        "object": "key_status",
        "generated_at": iso(status.now),
        "key": {
            "prefix": record.prefix,
            "name": record.name,
            "status": status.state,
            "created_at": iso(record.created_at),
            "expires_at": iso(record.expires_at) if record.expires_at is not None else None,
            "models": list(record.models) or ["*"],
        },
        "limits": [
            {
                "limit": str(view.limit),
                "metric": view.limit.metric,
                "amount": view.limit.amount,
                "window_seconds": view.limit.window_seconds,
                "used": view.used,
                "remaining": view.remaining,
                "reset_seconds": round(view.reset_seconds, 3),
            }
            for view in status.limits
        ],
        "concurrency": (
            None
            if record.concurrency is None
            else {"limit": record.concurrency, "in_flight": status.in_flight}
        ),
        "daily": [
            {
                "date": day.day.isoformat(),
                "requests": day.requests,
                "input_tokens": day.input_tokens,
                "output_tokens": day.output_tokens,
                "tokens": day.tokens,
            }
            for day in status.days
        ],
        "recent": [
            {
                "time": iso(row.ts),
                "model": row.model,
                "status": row.status,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "latency_ms": round(row.latency_ms, 1),
            }
            for row in status.recent
        ],
    }
