"""Usage reports: totals, breakdowns, latency percentiles and limit use over a span of time.

Counts are exact at any scale: the whole UTC days of a span are read from the daily rollup,
the whole hours around them from the hourly rollup (``usage_daily`` and ``usage_hourly``, kept
in step with ``usage`` by a trigger) and the partial hours at the edges from the raw ``usage``
rows. Latency percentiles are exact (linear interpolation between the closest ranks of the
raw latencies) when the span holds at most :data:`EXACT_PERCENTILE_MAX_ROWS` requests. Above
that they come from the rollups' latency histograms: linear interpolation inside the bucket
that holds the rank, as Prometheus' ``histogram_quantile`` does, so the error is at most that
bucket's width (bounds 1, 1.5, 2, 3, 4, 5, 7 per decade: at most half its lower bound).

A key's limit use is its use *now*, whatever the span, as the gateway would count it: a window
whose history is small is replayed through :class:`~opulon.limiter.Limiter` from the stored
rows (exactly what the gateway rebuilds after a restart); a longer one is summed from the
rollup and the raw edges. A budget's lifetime totals come from the rollup.
"""

from __future__ import annotations

import math
import operator
import re
import time
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as clock_time
from fnmatch import fnmatchcase
from typing import Any

from opulon.errors import InvalidInput, NotFound
from opulon.formatting import iso
from opulon.keys import KEY_MARK, KeyRecord, KeyStore
from opulon.limit_use import LimitState, limit_state
from opulon.limiter import Limiter, Usage
from opulon.limits import Limit
from opulon.storage import ROLLUP_LATENCY_BOUNDS_MS, ROLLUP_LATENCY_COLUMNS, SqlDatabase, Store
from opulon.usage import window_history

__all__ = [
    "DIMENSIONS",
    "EXACT_PERCENTILE_MAX_ROWS",
    "LIMITER_REPLAY_MAX_ROWS",
    "Figures",
    "Group",
    "ReportQuery",
    "UsageReport",
    "build_report",
    "exact_percentile",
    "histogram_percentile",
    "parse_moment",
    "resolve_query",
]

HOUR = 3600
DAY = 86400
#: Groupings of the main breakdown.
DIMENSIONS = ("key", "model", "day", "hour", "status")
#: Up to this many requests in a span, latency percentiles come from the raw rows.
EXACT_PERCENTILE_MAX_ROWS = 50_000
#: A limit window holding at most this many requests is replayed through the Limiter.
LIMITER_REPLAY_MAX_ROWS = 1_000
#: Spans up to this long are charted by hour, longer ones by day.
HOURLY_SERIES_MAX_SECONDS = 3 * DAY

_BUCKETS = len(ROLLUP_LATENCY_COLUMNS)
_HOURLY = ("usage_hourly", "hour_ts")
_DAILY = ("usage_daily", "day_ts")
_RELATIVE_RE = re.compile(r"^(\d+)([mhdw])$")
_RELATIVE_UNITS = {"m": 60, "h": HOUR, "d": DAY, "w": 7 * DAY}
_MAX_LOOKBACK = 100 * 366 * DAY
_MAX_AHEAD = 366 * DAY
_PREFIX_RE = re.compile(re.escape(KEY_MARK) + r"[a-z0-9]{10}")


# -- what a person asks for -----------------------------------------------------------------


def parse_moment(text: str, *, option: str, now: float) -> float:
    """``24h``, ``7d``, ``30d`` (that long before ``now``), ``now``, or a UTC date / datetime."""
    stripped = text.strip()
    hint = f"invalid {option} {text!r}: use 24h, 7d, 30d or a date like 2026-11-01"
    if stripped.lower() == "now":
        return now
    relative = _RELATIVE_RE.match(stripped)
    if relative:
        seconds = int(relative.group(1)) * _RELATIVE_UNITS[relative.group(2)]
        if not 0 < seconds <= _MAX_LOOKBACK:
            raise InvalidInput(hint)
        return now - seconds
    try:
        if len(stripped) == 10:
            moment = datetime.combine(date.fromisoformat(stripped), clock_time(0), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(stripped)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise InvalidInput(hint) from None
    if moment.year < 1971 or moment.timestamp() > now + _MAX_AHEAD:
        raise InvalidInput(hint)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """What to report: the span ``[since, until)``, the filters and the main grouping."""

    since: float
    until: float
    by: str = "key"
    key: str | None = None  # a display prefix
    model: str | None = None  # a glob, as in fnmatch

    def __post_init__(self) -> None:
        if self.by not in DIMENSIONS:
            raise InvalidInput(f"invalid --by {self.by!r}: use one of {', '.join(DIMENSIONS)}")
        if not self.since < self.until:
            raise InvalidInput(
                f"--since ({iso(self.since)}) must be before --until ({iso(self.until)})"
            )
        if self.key is not None and not _PREFIX_RE.fullmatch(self.key):
            raise InvalidInput(
                f"invalid --key {self.key!r}: give a key's display prefix, e.g. op-ul-e4st85dasf"
            )
        if self.model is not None and (not self.model or self.model != self.model.strip()):
            raise InvalidInput(
                f"invalid --model {self.model!r}: give a model name or a glob like 'gpt-4o*'"
            )


def resolve_query(
    *,
    since: str = "24h",
    until: str | None = None,
    by: str = "key",
    key: str | None = None,
    model: str | None = None,
    now: float,
) -> ReportQuery:
    """A :class:`ReportQuery` from the words of the command line, relative times from ``now``."""
    start = parse_moment(since, option="--since", now=now)
    end = now if until is None else parse_moment(until, option="--until", now=now)
    return ReportQuery(
        since=start,
        until=end,
        by=by.strip().lower(),
        key=None if key is None else key.strip(),
        model=None if model is None or model == "*" else model,
    )


# -- the figures ----------------------------------------------------------------------------


def exact_percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of ``values``, interpolating linearly between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def histogram_percentile(histogram: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of latencies counted in the rollup's buckets.

    Linear interpolation inside the bucket holding rank ``q * total``; the open-ended top
    bucket answers with its lower bound.
    """
    total = sum(histogram)
    if not total:
        return None
    rank = q * total
    seen = 0
    bounds = ROLLUP_LATENCY_BOUNDS_MS
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            low = 0.0 if index == 0 else float(bounds[index - 1])
            if index == len(bounds):
                return low
            return low + (bounds[index] - low) * (rank - seen) / count
        seen += count
    return float(bounds[-1])  # pragma: no cover - the loop always finds the rank


@dataclass(frozen=True, slots=True)
class Figures:
    """Requests, tokens, errors (status >= 400) and latency percentiles of a set of requests."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "tokens": self.tokens,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "latency_p50_ms": _round_ms(self.latency_p50_ms),
            "latency_p95_ms": _round_ms(self.latency_p95_ms),
        }


def _round_ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True, slots=True)
class Group:
    """One line of a breakdown: a key, a model, a status or a time bucket, and its figures."""

    value: str | int  # display prefix, model name, status code, or bucket start (unix time)
    figures: Figures
    name: str | None = None  # a key's name
    limits: tuple[LimitState, ...] = ()

    def label(self, by: str) -> str | int:
        """The group as scripts see it: time buckets in ISO 8601."""
        if by in ("day", "hour"):
            return iso(float(self.value))
        return self.value


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Everything ``opulon usage`` shows, for one span and set of filters."""

    query: ReportQuery
    now: float
    percentiles: str  # "exact" or "histogram"
    totals: Figures
    keys: tuple[Group, ...]
    models: tuple[Group, ...]
    statuses: tuple[Group, ...]
    series: tuple[Group, ...]  # the chart's buckets, each series_seconds long
    series_seconds: int
    groups: tuple[Group, ...]  # the main breakdown, grouped by query.by

    def to_json(self) -> dict[str, Any]:
        by = self.query.by
        groups = []
        for group in self.groups:
            item: dict[str, Any] = {by: group.label(by)}
            if by == "key":
                item["name"] = group.name
            item.update(group.figures.to_json())
            if by == "key":
                item["limits"] = [state.to_json() for state in group.limits]
            groups.append(item)
        return {
            "since": iso(self.query.since),
            "until": iso(self.query.until),
            "generated": iso(self.now),
            "filters": {"key": self.query.key, "model": self.query.model},
            "by": by,
            "percentiles": self.percentiles,
            "totals": self.totals.to_json(),
            "groups": groups,
        }

    def csv_rows(self) -> list[list[Any]]:
        """The main breakdown as rows, header first; missing percentiles are empty cells."""
        by = self.query.by
        columns = [by, *(["name"] if by == "key" else []), *Figures().to_json()]
        rows: list[list[Any]] = [columns]
        for group in self.groups:
            figures = group.figures.to_json()
            row = [group.label(by), *([group.name] if by == "key" else [])]
            row += ["" if value is None else value for value in figures.values()]
            rows.append(row)
        return rows


# -- reading the database -------------------------------------------------------------------


class _Tally:
    """Running sums of one group while the report is read."""

    __slots__ = ("errors", "histogram", "input", "latencies", "output", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.input = 0
        self.output = 0
        self.errors = 0
        self.histogram = [0] * _BUCKETS
        self.latencies: list[float] = []

    def add(self, requests: int, input_tokens: int, output_tokens: int, errors: int) -> None:
        self.requests += requests
        self.input += input_tokens
        self.output += output_tokens
        self.errors += errors

    def add_histogram(self, counts: Sequence[int]) -> None:
        self.histogram = list(map(operator.add, self.histogram, counts))

    def add_row(
        self, input_tokens: int, output_tokens: int, error: int, latency: float, bucket: int
    ) -> None:
        self.requests += 1
        self.input += input_tokens
        self.output += output_tokens
        self.errors += error
        self.histogram[bucket] += 1
        self.latencies.append(latency)

    def figures(self, exact: bool) -> Figures:
        if exact:
            p50 = exact_percentile(self.latencies, 0.5)
            p95 = exact_percentile(self.latencies, 0.95)
        else:
            p50 = histogram_percentile(self.histogram, 0.5)
            p95 = histogram_percentile(self.histogram, 0.95)
        return Figures(self.requests, self.input, self.output, self.errors, p50, p95)


@dataclass(slots=True)
class _Tallies:
    total: _Tally = field(default_factory=_Tally)
    keys: dict[int, _Tally] = field(default_factory=dict)
    models: dict[str, _Tally] = field(default_factory=dict)
    statuses: dict[int, _Tally] = field(default_factory=dict)
    times: dict[int, _Tally] = field(default_factory=dict)


def _tally(table: dict[Any, _Tally], value: Any) -> _Tally:
    found = table.get(value)
    if found is None:
        found = table[value] = _Tally()
    return found


@dataclass(frozen=True, slots=True)
class _Pieces:
    """``[since, until)`` cut into rollup periods and raw edges that cover it exactly once."""

    rollups: list[tuple[str, str, int, int]]  # (table, period column, start, end)
    raw: list[tuple[float, float]]
    hours: tuple[int, int] | None  # the whole hours, days included


def _split(since: float, until: float) -> _Pieces:
    """Whole days from the daily rollup, whole hours around them from the hourly one, and the
    partial hours at the edges from raw rows."""
    first_hour = math.ceil(since / HOUR) * HOUR
    last_hour = math.floor(until / HOUR) * HOUR
    if first_hour >= last_hour:
        return _Pieces([], [(since, until)], None)
    raw = [(since, float(first_hour))] if since < first_hour else []
    if last_hour < until:
        raw.append((float(last_hour), until))
    first_day = math.ceil(first_hour / DAY) * DAY
    last_day = math.floor(last_hour / DAY) * DAY
    if first_day >= last_day:
        return _Pieces([(*_HOURLY, first_hour, last_hour)], raw, (first_hour, last_hour))
    rollups = [(*_DAILY, first_day, last_day)]
    if first_hour < first_day:
        rollups.append((*_HOURLY, first_hour, first_day))
    if last_day < last_hour:
        rollups.append((*_HOURLY, last_day, last_hour))
    return _Pieces(rollups, raw, (first_hour, last_hour))


def _key_clause(key_id: int | None) -> tuple[str, list[Any]]:
    return ("AND key_id = ?", [key_id]) if key_id is not None else ("", [])


def _resolve_key(keys: KeyStore, prefix: str) -> KeyRecord:
    """The key with this display prefix, current or rotated out (its history is the key's)."""
    record = keys.keyring().by_prefix(prefix)
    if record is None:
        raise NotFound(f"no key with prefix {prefix}")
    return record


def build_report(
    store: Store,
    query: ReportQuery,
    *,
    now: float | None = None,
    exact_max_rows: int = EXACT_PERCENTILE_MAX_ROWS,
    replay_max_rows: int = LIMITER_REPLAY_MAX_ROWS,
) -> UsageReport:
    """Read the report for ``query`` from the store. ``now`` is when limit use is measured."""
    now = time.time() if now is None else now
    db = store.db
    keys = KeyStore(store)
    records = keys.all() if query.key is None else [_resolve_key(keys, query.key)]
    key_id = records[0].id if query.key is not None else None
    pattern = query.model
    span = query.until - query.since
    series_seconds = HOUR if span <= HOURLY_SERIES_MAX_SECONDS else DAY
    time_step = HOUR if series_seconds == HOUR or query.by == "hour" else DAY
    time_percentiles = query.by in ("day", "hour")

    tallies = _Tallies()
    pieces = _split(query.since, query.until)
    models_in_rollups: set[str] = set()
    for piece in pieces.rollups:
        models_in_rollups |= _read_rollup(db, piece, key_id, pattern, tallies)
    # Hour buckets need the hourly rollup throughout; day buckets can use both.
    series_pieces = (
        [(*_HOURLY, *pieces.hours)] if time_step == HOUR and pieces.hours else pieces.rollups
    )
    for piece in series_pieces:
        _read_rollup_series(db, piece, key_id, pattern, time_step, time_percentiles, tallies)
    for low, high in pieces.raw:
        _read_raw(db, low, high, key_id, pattern, time_step, tallies, counts=True)
    exact = tallies.total.requests <= exact_max_rows
    if exact and pieces.hours is not None and models_in_rollups:
        only = models_in_rollups if pattern is not None else None
        low, high = pieces.hours
        _read_raw(db, low, high, key_id, pattern, time_step, tallies, counts=False, models=only)

    limit_states = _limit_states(db, [r for r in records if r.limits], now, replay_max_rows)
    key_groups = [
        Group(
            record.prefix,
            tallies.keys.get(record.id, _Tally()).figures(exact),
            name=record.name,
            limits=limit_states.get(record.id, ()),
        )
        for record in records
    ]
    key_groups.sort(key=lambda g: (-g.figures.requests, str(g.value)))
    model_groups = sorted(
        (Group(model, tally.figures(exact)) for model, tally in tallies.models.items()),
        key=lambda g: (-g.figures.requests, str(g.value)),
    )
    status_groups = [
        Group(status, tallies.statuses[status].figures(exact))
        for status in sorted(tallies.statuses)
    ]
    series = _time_groups(tallies.times, time_step, series_seconds, query, exact)
    by_groups: dict[str, list[Group]] = {
        "key": key_groups,
        "model": model_groups,
        "status": status_groups,
    }
    if query.by in ("day", "hour"):
        step = HOUR if query.by == "hour" else DAY
        by_groups[query.by] = (
            series
            if step == series_seconds
            else _time_groups(tallies.times, time_step, step, query, exact)
        )
    return UsageReport(
        query=query,
        now=now,
        percentiles="exact" if exact else "histogram",
        totals=tallies.total.figures(exact),
        keys=tuple(key_groups),
        models=tuple(model_groups),
        statuses=tuple(status_groups),
        series=tuple(series),
        series_seconds=series_seconds,
        groups=tuple(by_groups[query.by]),
    )


def _time_groups(
    times: dict[int, _Tally], step: int, bucket: int, query: ReportQuery, exact: bool
) -> list[Group]:
    """Every ``bucket``-long slot of the span, oldest first, merged from ``step`` tallies."""
    merged: dict[int, _Tally] = {}
    for start, tally in times.items():
        target = _tally(merged, start - start % bucket)
        target.add(tally.requests, tally.input, tally.output, tally.errors)
        target.add_histogram(tally.histogram)
        target.latencies.extend(tally.latencies)
    first = math.floor(query.since) - math.floor(query.since) % bucket
    return [
        Group(start, merged.get(start, _Tally()).figures(exact))
        for start in range(first, math.ceil(query.until), bucket)
    ]


_HISTOGRAM_SUMS = ", ".join(f"sum({column})" for column in ROLLUP_LATENCY_COLUMNS)


def _read_rollup(
    db: SqlDatabase,
    piece: tuple[str, str, int, int],
    key_id: int | None,
    pattern: str | None,
    tallies: _Tallies,
) -> set[str]:
    """Add a rollup piece by key, model and status; returns the models counted."""
    table, period, start, end = piece
    clause, params = _key_clause(key_id)
    seen: set[str] = set()
    for row in db.execute(
        "SELECT key_id, model, status, sum(requests), sum(input_tokens), sum(output_tokens), "
        f"{_HISTOGRAM_SUMS} FROM {table} WHERE {period} >= ? AND {period} < ? {clause} "
        "GROUP BY key_id, model, status",
        [start, end, *params],
    ):
        key, model, status, requests, input_tokens, output_tokens = row[:6]
        if pattern is not None and not fnmatchcase(model, pattern):
            continue
        seen.add(model)
        histogram = row[6:]
        errors = requests if status >= 400 else 0
        for tally in (
            tallies.total,
            _tally(tallies.keys, key),
            _tally(tallies.models, model),
            _tally(tallies.statuses, status),
        ):
            tally.add(requests, input_tokens, output_tokens, errors)
            tally.add_histogram(histogram)
    return seen


def _read_rollup_series(
    db: SqlDatabase,
    piece: tuple[str, str, int, int],
    key_id: int | None,
    pattern: str | None,
    step: int,
    with_histogram: bool,
    tallies: _Tallies,
) -> None:
    table, period, start, end = piece
    clause, params = _key_clause(key_id)
    histogram = f", {_HISTOGRAM_SUMS}" if with_histogram else ""
    for row in db.execute(
        f"SELECT {period} - {period} % {step} AS bucket, model, sum(requests), "
        "sum(input_tokens), sum(output_tokens), "
        f"sum(CASE WHEN status >= 400 THEN requests ELSE 0 END){histogram} "
        f"FROM {table} WHERE {period} >= ? AND {period} < ? {clause} GROUP BY bucket, model",
        [start, end, *params],
    ):
        bucket, model, requests, input_tokens, output_tokens, errors = row[:6]
        if pattern is not None and not fnmatchcase(model, pattern):
            continue
        tally = _tally(tallies.times, bucket)
        tally.add(requests, input_tokens, output_tokens, errors)
        if with_histogram:
            tally.add_histogram(row[6:])


def _read_raw(
    db: SqlDatabase,
    low: float,
    high: float,
    key_id: int | None,
    pattern: str | None,
    step: int,
    tallies: _Tallies,
    *,
    counts: bool,
    models: set[str] | None = None,
) -> None:
    """Add raw rows in ``[low, high)``: all their figures, or (``counts=False``) latencies only."""
    clause, params = _key_clause(key_id)
    if models is not None:
        clause += f" AND model IN ({', '.join('?' for _ in models)})"
        params += sorted(models)
    bounds = ROLLUP_LATENCY_BOUNDS_MS
    rows = db.execute(
        "SELECT key_id, model, status, ts, latency_ms, input_tokens, output_tokens FROM usage "
        f"WHERE ts >= ? AND ts < ? {clause}",
        [low, high, *params],
    )
    for key, model, status, ts, latency, input_tokens, output_tokens in rows:
        if pattern is not None and not fnmatchcase(model, pattern):
            continue
        second = math.floor(ts)
        groups = (
            tallies.total,
            _tally(tallies.keys, key),
            _tally(tallies.models, model),
            _tally(tallies.statuses, status),
            _tally(tallies.times, second - second % step),
        )
        if counts:
            bucket = bisect_right(bounds, latency)
            error = 1 if status >= 400 else 0
            for tally in groups:
                tally.add_row(input_tokens, output_tokens, error, latency, bucket)
        else:
            for tally in groups:
                tally.latencies.append(latency)


# -- limit use ------------------------------------------------------------------------------

_METRIC_SQL = {
    "requests": "true",
    "tokens": "input_tokens + output_tokens > 0",
    "input_tokens": "input_tokens > 0",
    "output_tokens": "output_tokens > 0",
}


def _metric_value(metric: str, requests: int, input_tokens: int, output_tokens: int) -> int:
    if metric == "requests":
        return requests
    if metric == "input_tokens":
        return input_tokens
    if metric == "output_tokens":
        return output_tokens
    return input_tokens + output_tokens


class _RangeSums:
    """(requests, input, output) by key over ``[since, until)``, exact: rollup plus raw edges."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db
        self._raw_cache: dict[tuple[float, float], dict[int, tuple[int, int, int]]] = {}

    def _raw(self, low: float, high: float) -> dict[int, tuple[int, int, int]]:
        cached = self._raw_cache.get((low, high))
        if cached is None:
            cached = self._raw_cache[(low, high)] = {
                key: (requests, input_tokens, output_tokens)
                for key, requests, input_tokens, output_tokens in self._db.execute(
                    "SELECT key_id, count(*), sum(input_tokens), sum(output_tokens) FROM usage "
                    "WHERE ts >= ? AND ts < ? GROUP BY key_id",
                    [low, high],
                )
            }
        return cached

    def by_key(self, since: float, until: float) -> dict[int, tuple[int, int, int]]:
        pieces = _split(since, until)
        sums: dict[int, tuple[int, int, int]] = {}
        parts: list[Iterable[tuple[int, int, int, int]]] = []
        for table, period, start, end in pieces.rollups:
            parts.append(
                self._db.execute(
                    "SELECT key_id, sum(requests), sum(input_tokens), sum(output_tokens) "
                    f"FROM {table} WHERE {period} >= ? AND {period} < ? GROUP BY key_id",
                    [start, end],
                )
            )
        for low, high in pieces.raw:
            parts.append((key, *value) for key, value in self._raw(low, high).items())
        for part in parts:
            for key, requests, input_tokens, output_tokens in part:
                r, i, o = sums.get(key, (0, 0, 0))
                sums[key] = (r + requests, i + input_tokens, o + output_tokens)
        return sums


def _limit_states(
    db: SqlDatabase, records: Sequence[KeyRecord], now: float, replay_max_rows: int
) -> dict[int, tuple[LimitState, ...]]:
    """Each key's use of each of its limits at ``now``, in the key's configured order."""
    if not records:
        return {}
    ranges = _RangeSums(db)
    # Limiter semantics: a request at ts counts iff now - ts < window.
    after_now = math.nextafter(now, math.inf)
    windows = sorted(
        {lim.window_seconds for r in records for lim in r.limits if lim.window_seconds}
    )
    in_window = {
        seconds: ranges.by_key(math.nextafter(now - seconds, math.inf), after_now)
        for seconds in windows
    }
    budgeted = [r.id for r in records if any(lim.is_budget for lim in r.limits)]
    lifetimes: dict[int, Usage] = {}
    if budgeted:
        for key, requests, input_tokens, output_tokens in db.execute(
            "SELECT key_id, sum(requests), sum(input_tokens), sum(output_tokens) "
            f"FROM usage_daily WHERE key_id IN ({', '.join('?' for _ in budgeted)}) "
            "GROUP BY key_id",
            budgeted,
        ):
            lifetimes[key] = Usage(requests, input_tokens, output_tokens)

    result: dict[int, tuple[LimitState, ...]] = {}
    for record in records:
        states: dict[Limit, LimitState] = {}
        replayed: list[Limit] = []
        summed: list[Limit] = []
        for limit in record.limits:
            seconds = limit.window_seconds
            if seconds is None:
                replayed.append(limit)
                continue
            rows = in_window[seconds].get(record.id, (0, 0, 0))[0]
            (replayed if rows <= replay_max_rows else summed).append(limit)
        if replayed:
            limiter = Limiter(clock=lambda: now)
            limiter.configure(record.id, replayed, None)
            horizon = max((lim.window_seconds or 0 for lim in replayed), default=0)
            events = window_history(db, record.id, now - horizon) if horizon else []
            limiter.load_history(record.id, events, lifetimes.get(record.id, Usage(0)))
            states.update((state.limit, state) for state in limiter.states(record.id))
        for limit in summed:
            assert limit.window_seconds is not None
            used = _metric_value(limit.metric, *in_window[limit.window_seconds][record.id])
            oldest = db.execute(
                "SELECT ts FROM usage WHERE key_id = ? AND ts > ? AND "
                f"{_METRIC_SQL[limit.metric]} ORDER BY ts LIMIT 1",
                [record.id, now - limit.window_seconds],
            ).fetchone()
            states[limit] = limit_state(limit, used, None if oldest is None else oldest[0], now)
        result[record.id] = tuple(states[limit] for limit in record.limits)
    return result
