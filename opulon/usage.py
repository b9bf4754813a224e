"""Usage metadata: one row per request, written off the request path.

A row holds exactly what privacy invariant 2 allows: key id and display prefix, timestamp,
model, HTTP status, latency and token counts. Rows wait in memory and are written in batches
by :class:`UsageWriter` on its own connection; :meth:`UsageWriter.flush` writes everything
still waiting, which a graceful shutdown calls last.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from opulon.limit_use import LimitState, limit_state
from opulon.limits import Limit, Usage
from opulon.storage import (
    ROLLUP_LATENCY_BOUNDS_MS,
    ROLLUP_LATENCY_COLUMNS,
    USAGE_COLUMNS,
    USAGE_ROLLUPS,
    SqlDatabase,
    Store,
    connect,
    rollup_upsert_sql,
)

if TYPE_CHECKING:
    from opulon.store_postgres import PgConnection


class UsageRow(NamedTuple):
    """One request's metadata: exactly the columns of the ``usage`` table, in order."""

    key_id: int
    key_prefix: str
    ts: float
    model: str
    status: int
    latency_ms: float
    input_tokens: int
    output_tokens: int


assert UsageRow._fields == USAGE_COLUMNS

# Rows go in as multi-row statements: sqlite3 releases the GIL around every step, so one
# statement per row hands the GIL to and from the event loop once per row.
_ROWS_PER_STATEMENT = 128


@functools.cache
def _insert_sql(rows: int) -> str:
    row = "(" + ", ".join("?" for _ in USAGE_COLUMNS) + ")"
    return (
        f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) "
        f"VALUES {', '.join(row for _ in range(rows))}"
    )


@functools.cache
def _rollup_sql(table: str, period: str, groups: int) -> str:
    return rollup_upsert_sql(table, period, groups)


def _execute_rows(
    conn: sqlite3.Connection,
    sql: Callable[[int], str],
    rows: Sequence[Sequence[object]],
) -> None:
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        piece = rows[start : start + _ROWS_PER_STATEMENT]
        conn.execute(sql(len(piece)), [value for row in piece for value in row])


_BUCKETS = len(ROLLUP_LATENCY_COLUMNS)


def rollup_rows(rows: Sequence[UsageRow], seconds: int) -> list[tuple[object, ...]]:
    """Rows aggregated per (period start, key, prefix, model, status), as rollup upserts take
    them: requests, input and output tokens, then the latency histogram."""
    groups: dict[tuple[int, int, str, str, int], list[int]] = {}
    for row in rows:
        whole = int(row.ts)
        group = (whole - whole % seconds, row.key_id, row.key_prefix, row.model, row.status)
        counts = groups.get(group)
        if counts is None:
            counts = groups[group] = [0] * (3 + _BUCKETS)
        counts[0] += 1
        counts[1] += row.input_tokens
        counts[2] += row.output_tokens
        counts[3 + bisect_right(ROLLUP_LATENCY_BOUNDS_MS, row.latency_ms)] += 1
    return [(*group, *counts) for group, counts in groups.items()]


log = logging.getLogger("opulon.gateway")

# The background writer runs at a lower CPU priority than the event loop, so on a busy core
# its batches fill idle time instead of stalling requests.
_WRITER_NICENESS = 10
_SLICE = 512  # rows per background transaction


class UsageWriter:
    """Collects rows in memory and writes them in batches.

    :meth:`start` runs the writes on a background thread of its own (lower CPU priority);
    :meth:`close` stops it and writes whatever is still waiting, so nothing is lost.
    """

    def __init__(self, where: Path | Store) -> None:
        """Write into the SQLite file at ``where``, or into the store ``where`` is."""
        # No per-row foreign-key look-ups on SQLite: write() checks the batch's keys once,
        # inside the same IMMEDIATE transaction, so a key deleted meanwhile cannot slip in.
        self._conn: sqlite3.Connection | PgConnection = (
            where.connect(foreign_keys=False, lazy_commit=True)
            if isinstance(where, Store)
            else connect(where, foreign_keys=False)
        )
        self._pending: list[UsageRow] = []
        self._write_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval: float) -> None:
        """Write waiting rows every ``interval`` seconds on a background thread."""
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="opulon-usage-writer", daemon=True
        )
        self._thread.start()

    def _run(self, interval: float) -> None:
        with contextlib.suppress(OSError, AttributeError):  # best effort: Linux threads
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICENESS)
        while not self._stop.wait(interval):
            try:
                self._write_waiting()
            except Exception as exc:  # the rows stay waiting; the next round tries again
                log.error(
                    "writing %d usage rows failed (%s); will retry",
                    self.pending,
                    type(exc).__name__,
                )

    def _write_waiting(self) -> int:
        """Write every waiting row, a slice per transaction; returns how many were written.

        The lock is held from taking the rows to the last commit, so a :meth:`flush` that
        comes meanwhile waits for this batch instead of finding nothing left to write.
        """
        with self._write_lock:
            rows = self.take()
            for start in range(0, len(rows), _SLICE):
                try:
                    self.write(rows[start : start + _SLICE])
                except BaseException:
                    self.requeue(rows[start:])
                    raise
            return len(rows)

    def add(self, row: UsageRow) -> None:
        """Queue a row (cheap: called on the request path)."""
        self._pending.append(row)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def take(self) -> list[UsageRow]:
        rows, self._pending = self._pending, []
        return rows

    def write(self, rows: Sequence[UsageRow]) -> None:
        """Write a batch in one transaction; safe to call from a worker thread."""
        if not rows:
            return
        if not isinstance(self._conn, sqlite3.Connection):
            self._write_postgresql(self._conn, rows)
            return
        with self._write_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # Rows of a key deleted while they waited are dropped: its metadata goes too.
                ids = list({row.key_id for row in rows})
                found = self._conn.execute(
                    f"SELECT id FROM keys WHERE id IN ({', '.join('?' for _ in ids)})", ids
                ).fetchall()
                if len(found) != len(ids):
                    alive = {key_id for (key_id,) in found}
                    rows = [row for row in rows if row.key_id in alive]
                _execute_rows(self._conn, _insert_sql, rows)
                # The rollups get one upsert per group of the batch, not one per row.
                for table, period, seconds in USAGE_ROLLUPS:
                    _execute_rows(
                        self._conn,
                        functools.partial(_rollup_sql, table, period),
                        rollup_rows(rows, seconds),
                    )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _write_postgresql(self, conn: PgConnection, rows: Sequence[UsageRow]) -> None:
        # One COPY per batch; the table's statement trigger rolls the batch up. The batch's
        # keys are locked (FOR SHARE) first: a key deleted meanwhile, on any node, waits for
        # this transaction, or is gone before it and its rows are dropped.
        with self._write_lock, conn.atomic():
            ids = sorted({row.key_id for row in rows})
            found = conn.execute(
                f"SELECT id FROM keys WHERE id IN ({', '.join('?' for _ in ids)}) FOR SHARE",
                ids,
            ).fetchall()
            if len(found) != len(ids):
                alive = {key_id for (key_id,) in found}
                rows = [row for row in rows if row.key_id in alive]
            conn.copy_rows("usage", USAGE_COLUMNS, rows)

    def requeue(self, rows: Sequence[UsageRow]) -> None:
        """Put back rows whose write failed, ahead of newer ones."""
        self._pending[:0] = rows

    def flush(self) -> int:
        """Write everything waiting now, after any batch being written; returns how many."""
        return self._write_waiting()

    def close(self) -> None:
        """Stop the background thread after its batch, write what is waiting, then close."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.flush()
        with self._write_lock:
            self._conn.close()


def window_history(db: SqlDatabase, key_id: int, since: float) -> list[tuple[float, int, int]]:
    """(timestamp, input tokens, output tokens) of a key's requests since ``since``."""
    return [
        (float(ts), int(i), int(o))
        for ts, i, o in db.execute(
            "SELECT ts, input_tokens, output_tokens FROM usage WHERE key_id = ? AND ts >= ? "
            "ORDER BY ts",
            [key_id, since],
        ).fetchall()
    ]


def lifetime_usage(db: SqlDatabase, key_id: int) -> Usage:
    requests, input_tokens, output_tokens = db.execute(
        "SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) "
        "FROM usage WHERE key_id = ?",
        [key_id],
    ).fetchone()
    return Usage(int(requests), int(input_tokens), int(output_tokens))


_METRIC_SQL = {
    "requests": "count(*)",
    "tokens": "coalesce(sum(input_tokens + output_tokens), 0)",
    "input_tokens": "coalesce(sum(input_tokens), 0)",
    "output_tokens": "coalesce(sum(output_tokens), 0)",
}


# The rows that hold some of a metric: the oldest of them in a window is what frees it up.
_HOLDS_SQL = {
    "requests": "true",
    "tokens": "input_tokens + output_tokens > 0",
    "input_tokens": "input_tokens > 0",
    "output_tokens": "output_tokens > 0",
}


def stored_limit_states(
    db: SqlDatabase, key_id: int, limits: Sequence[Limit], now: float | None = None
) -> list[LimitState]:
    """Each limit's use according to the stored rows (the running server adds what is in flight).

    Sliding windows: a row counts while ``now - ts < window``; the reset is when the oldest
    row inside the window that holds some of the metric leaves it.
    """
    moment = time.time() if now is None else now
    states: list[LimitState] = []
    for limit in limits:
        if limit.window_seconds is None:
            (used,) = db.execute(
                f"SELECT {_METRIC_SQL[limit.metric]} FROM usage WHERE key_id = ?", [key_id]
            ).fetchone()
            oldest = None
        else:
            used, oldest = db.execute(
                f"SELECT {_METRIC_SQL[limit.metric]}, "
                f"min(CASE WHEN {_HOLDS_SQL[limit.metric]} THEN ts END) FROM usage "
                "WHERE key_id = ? AND ts > ?",
                [key_id, moment - limit.window_seconds],
            ).fetchone()
        states.append(limit_state(limit, int(used), oldest, moment))
    return states
