"""In-memory enforcement of rolling usage limits.

A key may carry several sliding windows (``requests:10/1m``, ``tokens:1.5M/5h``, ...), a
lifetime budget and a maximum number of concurrent requests. Admission happens before a
request is forwarded: :meth:`Limiter.admit` checks every limit against the usage so far
*including the reservations of requests still in flight*, and on success reserves the
request's expected cost in every window and in the budget. :meth:`Limiter.settle` later
replaces the reservation with what the request really used.

The gateway is one asyncio process and every method here is synchronous, so each call is
atomic with respect to other requests: 50 simultaneous admissions against
``requests:10/1m`` admit exactly 10.

Windows are truly rolling. Usage at time ``t`` counts at time ``now`` iff
``now - t < window``. Per key and window length the limiter keeps a deque of entries
``[timestamp, requests, input, output]``; an event within the resolution (``window / 1000``
seconds) of the newest entry's first event is folded into it and moves its timestamp forward,
so folded usage leaves the window at most one resolution late, never early, and a window
holds about 1000 entries at most. Events further apart are counted exactly. Expiry is lazy,
and running sums make admission O(limits) amortised. The module does no I/O: the caller feeds
it the stored history (:meth:`Limiter.load_history`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from opulon.formatting import format_duration, format_reset
from opulon.limit_use import LimitState, limit_state
from opulon.limits import Limit, Usage

__all__ = [
    "CONCURRENCY_RETRY_AFTER",
    "LimitState",
    "Limiter",
    "Refusal",
    "Ticket",
    "Tightest",
    "Usage",
    "WindowUse",
    "budget_refusal",
    "concurrency_refusal",
    "format_reset",
    "too_large_refusal",
    "window_refusal",
]

#: ``retry_after`` of a concurrency refusal: a hint, since a slot frees when a request ends.
CONCURRENCY_RETRY_AFTER = 1.0

#: A window's resolution is its length divided by this; it bounds entries per window.
RESOLUTION_DIVISOR = 1000

_REQUESTS, _TOKENS, _INPUT, _OUTPUT = range(4)
_METRIC_CODES = {
    "requests": _REQUESTS,
    "tokens": _TOKENS,
    "input_tokens": _INPUT,
    "output_tokens": _OUTPUT,
}
_COST_UNITS = {
    _TOKENS: "tokens",
    _INPUT: "input tokens",
    _OUTPUT: "output tokens",
}


def _value(code: int, requests: int, input_tokens: int, output_tokens: int) -> int:
    """The amount of metric ``code`` in a (requests, input, output) triple."""
    if code == _TOKENS:
        return input_tokens + output_tokens
    if code == _REQUESTS:
        return requests
    if code == _INPUT:
        return input_tokens
    return output_tokens


def _cost_text(code: int, cost: int) -> str:
    if code == _REQUESTS:
        return f"{cost} request" if cost == 1 else f"{cost} requests"
    return f"{cost} {_COST_UNITS[code]}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted.

    ``reason`` is ``"window"``, ``"budget"`` or ``"concurrency"``; ``limit`` is ``None`` for
    concurrency. ``retry_after`` is the number of seconds until the refusing windows have room
    for this request's expected cost (assuming no other traffic), ``None`` if waiting will
    never help (budget spent, or the expected cost alone exceeds the limit), and
    :data:`CONCURRENCY_RETRY_AFTER` for concurrency. ``too_large`` marks a request whose
    expected cost alone exceeds a window or what remains of a budget: it cannot succeed as it
    is. ``message`` is written for people.
    """

    limit: Limit | None
    reason: str
    retry_after: float | None
    message: str
    too_large: bool = False  # the request's cost alone exceeds the limit: waiting never helps


class _Entry:
    """Usage of events from ``start`` to ``ts`` folded together; it counts until ``ts`` leaves."""

    __slots__ = ("dead", "input", "output", "requests", "start", "ts")

    def __init__(self, ts: float, requests: int, input_tokens: int, output_tokens: int) -> None:
        self.start = ts
        self.ts = ts
        self.requests = requests
        self.input = input_tokens
        self.output = output_tokens
        self.dead = False


class _Window:
    """One sliding window: time-ordered entries and their running sums."""

    __slots__ = ("entries", "input", "output", "requests", "resolution", "seconds")

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.resolution = seconds / RESOLUTION_DIVISOR
        self.entries: deque[_Entry] = deque()
        self.requests = 0
        self.input = 0
        self.output = 0

    def expire(self, now: float) -> None:
        entries = self.entries
        seconds = self.seconds
        while entries and now - entries[0].ts >= seconds:
            entry = entries.popleft()
            entry.dead = True
            self.requests -= entry.requests
            self.input -= entry.input
            self.output -= entry.output

    def add(self, ts: float, requests: int, input_tokens: int, output_tokens: int) -> _Entry:
        """Count usage at ``ts``, folding it into the newest entry when close enough.

        An event folds into the newest entry when it is within the resolution of that
        entry's first event, so an entry spans at most one resolution: steady traffic does
        not pile up in one entry that never leaves, and there are at most about
        ``RESOLUTION_DIVISOR`` entries per window. The entry then counts from the newer
        time, so folded usage leaves the window at most one resolution late, never early.
        An event older than the newest entry (a clock stepping back) folds into it too.
        """
        entries = self.entries
        self.requests += requests
        self.input += input_tokens
        self.output += output_tokens
        if entries:
            last = entries[-1]
            if ts - last.start <= self.resolution or ts <= last.ts:
                if ts > last.ts:
                    last.ts = ts
                last.requests += requests
                last.input += input_tokens
                last.output += output_tokens
                return last
        entry = _Entry(ts, requests, input_tokens, output_tokens)
        entries.append(entry)
        return entry

    def adjust(self, entry: _Entry, requests: int, input_tokens: int, output_tokens: int) -> None:
        entry.requests += requests
        entry.input += input_tokens
        entry.output += output_tokens
        self.requests += requests
        self.input += input_tokens
        self.output += output_tokens

    def used(self, code: int) -> int:
        return _value(code, self.requests, self.input, self.output)

    def oldest(self, code: int) -> _Entry | None:
        """The oldest entry holding some of metric ``code``."""
        for entry in self.entries:
            if _value(code, entry.requests, entry.input, entry.output) > 0:
                return entry
        return None

    def retry_after(self, code: int, need: int, now: float) -> float:
        """Seconds until at least ``need`` of metric ``code`` has left the window."""
        freed = 0
        for entry in self.entries:
            freed += _value(code, entry.requests, entry.input, entry.output)
            if freed >= need:
                return entry.ts + self.seconds - now
        return float(self.seconds)  # unreachable while need <= used


_Check = tuple[Limit, _Window | None, int]


class WindowUse(NamedTuple):
    """One window's amount, what is left of it, and when its oldest usage leaves it."""

    limit: int
    remaining: int
    resets_at: float | None  # None when the window holds no usage


class Tightest:
    """A key's tightest windows, as rate-limit headers report them.

    ``requests``: the requests window with the least left relative to its amount;
    ``tokens``: the tightest window of any token metric; ``per_metric``: the tightest window
    of requests, tokens, input and output tokens, in that order. ``None`` where the key has
    no such window. Immutable once built: a new one is built when usage moves.
    """

    __slots__ = ("built_at", "guards", "per_metric", "requests", "tokens")

    def __init__(
        self,
        built_at: float,
        guards: tuple[tuple[float, int], ...],
        per_metric: tuple[WindowUse | None, ...],
        tokens: WindowUse | None,
    ) -> None:
        self.built_at = built_at
        self.guards = guards  # (oldest entry, window length) of each window, for expiry
        self.per_metric = per_metric
        self.requests = per_metric[_REQUESTS]
        self.tokens = tokens


class _KeyState:
    """Everything the limiter knows about one key."""

    __slots__ = (
        "checks",
        "concurrency",
        "lifetime_input",
        "lifetime_output",
        "lifetime_requests",
        "limits",
        "loaded",
        "open",
        "summary",
        "summary_dirty",
        "windows",
    )

    def __init__(self) -> None:
        self.limits: tuple[Limit, ...] = ()
        self.checks: tuple[_Check, ...] = ()
        self.concurrency: int | None = None
        self.windows: dict[int, _Window] = {}
        self.lifetime_requests = 0
        self.lifetime_input = 0
        self.lifetime_output = 0
        self.open: set[Ticket] = set()
        self.loaded = False
        self.summary: Tightest | None = None
        self.summary_dirty = False

    def compile(self) -> None:
        windows = self.windows
        self.checks = tuple(
            (
                limit,
                None if limit.window_seconds is None else windows[limit.window_seconds],
                _METRIC_CODES[limit.metric],
            )
            for limit in self.limits
        )

    def changed(self) -> None:
        """Limits or history changed: the summary no longer applies."""
        self.summary = None

    def touched(self) -> None:
        """Usage moved by a request: the summary may lag by up to its max age."""
        self.summary_dirty = True


@dataclass(slots=True, eq=False)
class Ticket:
    """A reservation made by :meth:`Limiter.admit`; hand it back to :meth:`Limiter.settle`.

    Opaque apart from ``key_id``; compared and hashed by identity.
    """

    key_id: int
    reserved: Usage = field(default_factory=Usage, repr=False)
    at: float = field(default=0.0, repr=False)
    settled: bool = field(default=False, repr=False)
    _refs: list[tuple[_Window, _Entry]] = field(default_factory=list, repr=False)
    _state: _KeyState | None = field(default=None, repr=False)


class Limiter:
    """Rolling windows, lifetime budgets and concurrency of every key, in memory."""

    def __init__(
        self, clock: Callable[[], float] = time.time, *, summary_max_age: float = 0.0
    ) -> None:
        self._clock = clock
        self._summary_max_age = summary_max_age
        self._keys: dict[int, _KeyState] = {}

    # -- configuration ---------------------------------------------------------------

    def configure(self, key_id: int, limits: Sequence[Limit], concurrency: int | None) -> bool:
        """Set or replace a key's limits and maximum concurrency.

        Windows whose length stays keep their state; a new window is seeded from the longest
        window already tracked (exact but for folding when it is shorter). Returns ``True``
        when the caller must call :meth:`load_history` for this key: it has limits and its
        history was never loaded, or a window longer than any tracked one was added.
        """
        for limit in limits:
            if limit.metric not in _METRIC_CODES:
                raise ValueError(f"unknown metric {limit.metric!r} in limit {limit}")
            if limit.window_seconds is not None and limit.window_seconds <= 0:
                raise ValueError(f"window of limit {limit} must be positive")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        state = self._state(key_id)
        now = self._clock()
        old = state.windows
        for window in old.values():
            window.expire(now)
        longest = old[max(old)] if old else None
        wanted = sorted({lim.window_seconds for lim in limits if lim.window_seconds is not None})
        windows: dict[int, _Window] = {}
        for seconds in wanted:
            if seconds in old:
                windows[seconds] = old[seconds]
                continue
            if longest is None or seconds > longest.seconds:
                state.loaded = False
            windows[seconds] = self._seed(state, seconds, longest, now)
        for ticket in state.open:
            ticket._refs = [(w, e) for w, e in ticket._refs if windows.get(w.seconds) is w]
        state.windows = windows
        state.limits = tuple(limits)
        state.concurrency = concurrency
        state.compile()
        state.changed()
        return bool(limits) and not state.loaded

    def load_history(
        self, key_id: int, events: Iterable[tuple[float, int, int]], lifetime: Usage
    ) -> None:
        """Rebuild a key's window state from stored usage and set its lifetime totals.

        ``events`` are stored rows ``(timestamp, input_tokens, output_tokens)``, one request
        each, in any order; rows older than the longest window are skipped. ``lifetime`` is
        the key's all-time total (for a budget). Existing window state is replaced; the
        reservations of requests still in flight are kept (they are not in the store yet).
        """
        state = self._state(key_id)
        now = self._clock()
        items: list[tuple[float, int, int, int, Ticket | None]] = []
        horizon = max(state.windows, default=0)
        if horizon:
            items.extend(
                (ts, 1, input_tokens, output_tokens, None)
                for ts, input_tokens, output_tokens in events
                if now - ts < horizon
            )
        open_tickets = sorted(state.open, key=lambda t: t.at)
        for ticket in open_tickets:
            reserved = ticket.reserved
            items.append(
                (
                    ticket.at,
                    reserved.requests,
                    reserved.input_tokens,
                    reserved.output_tokens,
                    ticket,
                )
            )
            ticket._refs = []
        items.sort(key=lambda item: item[0])
        windows: dict[int, _Window] = {}
        for seconds in state.windows:
            window = _Window(seconds)
            for ts, requests, input_tokens, output_tokens, owner in items:
                if now - ts >= seconds:
                    continue
                entry = window.add(ts, requests, input_tokens, output_tokens)
                if owner is not None:
                    owner._refs.append((window, entry))
            windows[seconds] = window
        state.windows = windows
        state.lifetime_requests = lifetime.requests
        state.lifetime_input = lifetime.input_tokens
        state.lifetime_output = lifetime.output_tokens
        for ticket in open_tickets:
            state.lifetime_requests += ticket.reserved.requests
            state.lifetime_input += ticket.reserved.input_tokens
            state.lifetime_output += ticket.reserved.output_tokens
        state.loaded = True
        state.compile()
        state.changed()

    def forget(self, key_id: int) -> None:
        """Drop everything known about a key; its open tickets settle as no-ops."""
        state = self._keys.pop(key_id, None)
        if state is not None:
            state.changed()

    def keys(self) -> set[int]:
        """Keys the limiter holds state for."""
        return set(self._keys)

    # -- the request path ----------------------------------------------------------------

    def admit(
        self, key_id: int, expected: Usage, *, flexible_output: bool = False
    ) -> Ticket | Refusal:
        """Admit a request and reserve its expected cost, or say why not.

        Admitted iff for every limit ``used + expected <= amount`` (``used`` includes the
        reservations of requests in flight) and fewer than ``concurrency`` requests are in
        flight. A refusal for good (budget, cost above the limit) wins over a window refusal,
        which wins over concurrency; of several full windows the one freeing last is named.

        With ``flexible_output`` (the client set no output cap, so the gateway may set one)
        the expected output shrinks to what the token limits leave (at least one token): the
        ticket's ``reserved.output_tokens`` is then the cap to send upstream.
        """
        state = self._state(key_id)
        now = self._clock()
        for win in state.windows.values():
            win.expire(now)
        requests = expected.requests
        input_tokens = expected.input_tokens
        output_tokens = expected.output_tokens
        if flexible_output and output_tokens:
            room = self._output_room(state, requests, input_tokens)
            if room < output_tokens:
                # At least one token: with no room left, the refusal says when there is.
                output_tokens = max(1, room)
                expected = Usage(requests, input_tokens, output_tokens)
        worst: Refusal | None = None
        for limit, window, code in state.checks:
            cost = _value(code, requests, input_tokens, output_tokens)
            if window is None:
                used = _value(
                    code, state.lifetime_requests, state.lifetime_input, state.lifetime_output
                )
            else:
                used = window.used(code)
            amount = limit.amount
            if used + cost <= amount:
                continue
            if window is None:
                return budget_refusal(limit, used, cost)
            if cost > amount:
                return too_large_refusal(limit, cost)
            retry = window.retry_after(code, used + cost - amount, now)
            if worst is None or worst.retry_after is None or retry > worst.retry_after:
                worst = window_refusal(limit, retry)
        if worst is not None:
            return worst
        if state.concurrency is not None and len(state.open) >= state.concurrency:
            return concurrency_refusal(state.concurrency)
        refs = [
            (window, window.add(now, requests, input_tokens, output_tokens))
            for window in state.windows.values()
        ]
        state.lifetime_requests += requests
        state.lifetime_input += input_tokens
        state.lifetime_output += output_tokens
        ticket = Ticket(key_id, expected, now, False, refs, state)
        state.open.add(ticket)
        state.touched()
        return ticket

    def settle(self, ticket: Ticket, actual: Usage) -> None:
        """Replace a reservation with the request's real usage; a second call does nothing.

        The difference belongs to the moment of the reservation: it is added to each window
        that still holds that moment, and always to the lifetime totals. A failed request
        settles with what it used (often 0 tokens, still 1 request).
        """
        if ticket.settled:
            return
        ticket.settled = True
        state = ticket._state
        refs = ticket._refs
        ticket._refs = []
        if state is None or self._keys.get(ticket.key_id) is not state:
            return
        state.open.discard(ticket)
        reserved = ticket.reserved
        d_requests = actual.requests - reserved.requests
        d_input = actual.input_tokens - reserved.input_tokens
        d_output = actual.output_tokens - reserved.output_tokens
        state.lifetime_requests += d_requests
        state.lifetime_input += d_input
        state.lifetime_output += d_output
        if d_requests or d_input or d_output:
            now = self._clock()
            windows = state.windows
            for window, entry in refs:
                if windows.get(window.seconds) is not window:
                    continue
                window.expire(now)
                if not entry.dead:
                    window.adjust(entry, d_requests, d_input, d_output)
        state.touched()

    def in_flight(self, key_id: int) -> int:
        """Requests of this key admitted and not yet settled."""
        state = self._keys.get(key_id)
        return 0 if state is None else len(state.open)

    # -- reporting -------------------------------------------------------------------------

    def states(self, key_id: int) -> list[LimitState]:
        """Every limit of the key, windows and budget, in configured order."""
        state = self._keys.get(key_id)
        if state is None:
            return []
        now = self._clock()
        for win in state.windows.values():
            win.expire(now)
        result: list[LimitState] = []
        for limit, window, code in state.checks:
            if window is None:
                used = _value(
                    code, state.lifetime_requests, state.lifetime_input, state.lifetime_output
                )
                result.append(limit_state(limit, used, None, now))
            else:
                oldest = window.oldest(code)
                since = None if oldest is None else oldest.ts
                result.append(limit_state(limit, window.used(code), since, now))
        return result

    def tightest(self, key_id: int, *, fresh: bool = False) -> Tightest | None:
        """The key's tightest windows; None when it has no window.

        With a ``summary_max_age`` the remaining values may lag the newest requests by up to
        that many seconds (summing them for every request costs more than the request's own
        bookkeeping); ``fresh`` forces exact values, as a refusal's headers must be.
        """
        state = self._keys.get(key_id)
        if state is None or not state.windows:
            return None
        now = self._clock()
        summary = state.summary
        if (
            summary is None
            or (state.summary_dirty and (fresh or now - summary.built_at >= self._summary_max_age))
            or _expired(summary.guards, now)
        ):
            summary = self._summarize(state, now)
        return summary

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _output_room(state: _KeyState, requests: int, input_tokens: int) -> int:
        """The output tokens every token limit still has room for, beside this input."""
        room: int | None = None
        for limit, window, code in state.checks:
            if code not in (_TOKENS, _OUTPUT):
                continue
            if window is None:
                used = _value(
                    code, state.lifetime_requests, state.lifetime_input, state.lifetime_output
                )
            else:
                used = window.used(code)
            left = limit.amount - used - _value(code, requests, input_tokens, 0)
            room = left if room is None else min(room, left)
        return 2**62 if room is None else room

    def _state(self, key_id: int) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        return state

    @staticmethod
    def _seed(state: _KeyState, seconds: int, source: _Window | None, now: float) -> _Window:
        """A new window filled from ``source`` or, without one, from the open reservations."""
        window = _Window(seconds)
        if source is None:
            for ticket in sorted(state.open, key=lambda t: t.at):
                if now - ticket.at < seconds:
                    reserved = ticket.reserved
                    entry = window.add(
                        ticket.at, reserved.requests, reserved.input_tokens, reserved.output_tokens
                    )
                    ticket._refs.append((window, entry))
            return window
        copies: dict[_Entry, _Entry] = {}
        for entry in source.entries:
            if now - entry.ts < seconds:
                copies[entry] = window.add(entry.ts, entry.requests, entry.input, entry.output)
        for ticket in state.open:
            added = [(window, copies[e]) for w, e in ticket._refs if w is source and e in copies]
            ticket._refs.extend(added)
        return window

    @staticmethod
    def _summarize(state: _KeyState, now: float) -> Tightest:
        windows = state.windows
        for win in windows.values():
            win.expire(now)
        # Slots 0-3: the tightest window of each metric; slot 4: of any token metric.
        best: list[tuple[float, Limit, _Window, int, int] | None] = [None] * 5
        for limit, window, code in state.checks:
            if window is None:
                continue
            remaining = max(0, limit.amount - window.used(code))
            ratio = remaining / limit.amount if limit.amount else 0.0
            for slot in (code, 4) if code != _REQUESTS else (code,):
                current = best[slot]
                if current is None or ratio < current[0]:
                    best[slot] = (ratio, limit, window, code, remaining)
        uses: list[WindowUse | None] = []
        for chosen in best:
            if chosen is None:
                uses.append(None)
                continue
            _, limit, window, code, remaining = chosen
            oldest = window.oldest(code)
            deadline = None if oldest is None else oldest.ts + window.seconds
            uses.append(WindowUse(limit.amount, remaining, deadline))
        guards = tuple((w.entries[0].ts, w.seconds) for w in windows.values() if w.entries)
        summary = Tightest(now, guards, tuple(uses[:4]), uses[4])
        state.summary = summary
        state.summary_dirty = False
        return summary


def _expired(guards: tuple[tuple[float, int], ...], now: float) -> bool:
    """Whether the oldest entry of some window has left it since the cache was built."""
    return any(now - ts >= seconds for ts, seconds in guards)


# The refusals, worded once for every engine (this one and opulon.limiter_redis).


def window_refusal(limit: Limit, retry_after: float) -> Refusal:
    """``limit``'s window is full; it has room for the request in ``retry_after`` seconds."""
    message = f"limit {limit} reached; resets in {format_duration(retry_after)}"
    return Refusal(limit, "window", retry_after, message)


def too_large_refusal(limit: Limit, cost: int) -> Refusal:
    """The request's expected ``cost`` alone exceeds the window ``limit``."""
    code = _METRIC_CODES[limit.metric]
    message = (
        f"this request's expected cost ({_cost_text(code, cost)}) exceeds the whole limit {limit}"
    )
    return Refusal(limit, "window", None, message, too_large=True)


def budget_refusal(limit: Limit, used: int, cost: int) -> Refusal:
    """The lifetime budget ``limit`` is spent, or has less than ``cost`` left."""
    if used >= limit.amount:
        message = f"lifetime budget {limit} spent"
        return Refusal(limit, "budget", None, message)
    code = _METRIC_CODES[limit.metric]
    message = (
        f"this request's expected cost ({_cost_text(code, cost)}) exceeds what remains "
        f"of the lifetime budget {limit} ({limit.amount - used} left)"
    )
    return Refusal(limit, "budget", None, message, too_large=True)


def concurrency_refusal(concurrency: int) -> Refusal:
    """``concurrency`` requests of the key are in flight already."""
    message = f"concurrency limit {concurrency} reached; retry when a request finishes"
    return Refusal(None, "concurrency", CONCURRENCY_RETRY_AFTER, message)
