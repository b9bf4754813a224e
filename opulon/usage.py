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
from typing import TYPE_CHECKING, Any, NamedTuple

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
from opulon.usage_journal import UsageJournal, claim_orphans

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
# How often the writer looks for journals of processes gone (on this data dir) to write.
ORPHAN_INTERVAL = 2.0

_MARK_SQL = (
    "INSERT INTO usage_journals (journal, seq) VALUES (?, ?) "
    "ON CONFLICT (journal) DO UPDATE SET seq = excluded.seq"
)


def _owned(rows: Sequence[UsageRow], credentials: Sequence[Any]) -> Sequence[UsageRow]:
    """The rows whose key still exists and issued their prefix: a key deleted meanwhile
    takes its rows along, and a newer key given the same id (SQLite reuses the highest)
    never gets an older key's rows, even from a journal written before the deletion."""
    owned = {(int(key_id), str(prefix)) for key_id, prefix in credentials}
    if all((row.key_id, row.key_prefix) in owned for row in rows):
        return rows
    return [row for row in rows if (row.key_id, row.key_prefix) in owned]


class UsageWriter:
    """Collects rows in memory and writes them in batches.

    :meth:`start` runs the writes on a background thread of its own (lower CPU priority);
    :meth:`close` stops it and writes whatever is still waiting, so nothing is lost.

    With a ``journal`` every row is on disk from the moment it is added (see
    :mod:`opulon.usage_journal`): each batch's transaction also records how far into the
    journal it reaches, and the writer writes the rows of journals whose process died.
    """

    def __init__(self, where: Path | Store, journal: UsageJournal | None = None) -> None:
        """Write into the SQLite file at ``where``, or into the store ``where`` is."""
        # No per-row foreign-key look-ups on SQLite: write() checks the batch's keys once,
        # inside the same IMMEDIATE transaction, so a key deleted meanwhile cannot slip in.
        self._conn: sqlite3.Connection | PgConnection = (
            where.connect(foreign_keys=False, lazy_commit=True)
            if isinstance(where, Store)
            else connect(where, foreign_keys=False)
        )
        self._pending: list[UsageRow] = []
        self._journal = journal
        self._through = 0  # this many rows of those added are in the store
        self._journal_failed = False  # from then on rows are not journaled
        self._foreign: set[str] = set()  # orphan journals of other stores, reported once
        self._uncertain = False  # a write failed: its rows may be in the store all the same
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
        next_look = 0.0
        while True:
            if self._journal is not None and time.monotonic() >= next_look:
                next_look = time.monotonic() + ORPHAN_INTERVAL
                try:
                    self.write_orphans()
                except Exception as exc:  # their files stay; the next look tries again
                    log.error("writing the rows of a stopped node failed (%s)", type(exc).__name__)
            if self._stop.wait(interval):
                return
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
            journal = self._journal
            if journal is not None and self._uncertain and rows:
                try:
                    rows = self._drop_stored(journal, rows)
                except BaseException:
                    self.requeue(rows)
                    raise
            for start in range(0, len(rows), _SLICE):
                piece = rows[start : start + _SLICE]
                # Rows are taken in the order they were added, which the journal numbered
                # them in (all of them, or those before it failed: the mark then covers all
                # of the journal's rows, and counts the rest, so that _drop_stored can).
                through = self._through + len(piece)
                mark = None if journal is None else (journal.name, through)
                try:
                    self.write(piece, mark)
                except BaseException:
                    self.requeue(rows[start:])
                    # The commit may have happened with only its acknowledgement lost.
                    self._uncertain = True
                    raise
                self._through = through
                if journal is not None:
                    journal.written(through)
            return len(rows)

    def _drop_stored(self, journal: UsageJournal, rows: list[UsageRow]) -> list[UsageRow]:
        """After a failed write: the rows the store holds all the same (its commit went
        through, its acknowledgement was lost) come off the front, so none is written twice."""
        if isinstance(self._conn, sqlite3.Connection) and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")  # what the failed write left open is not stored
        stored = self._stored_mark(journal.name)
        self._uncertain = False
        done = min(stored - self._through, len(rows))
        if done <= 0:
            return rows
        log.warning("%d usage rows were written although their write seemed to fail", done)
        self._through += done
        journal.written(self._through)
        return rows[done:]

    def write_orphans(self) -> int:
        """Write the rows of every journal on this data dir whose process is gone (past the
        mark the store holds for it), then remove it; how many rows were written."""
        journal = self._journal
        if journal is None:
            return 0
        written = 0
        others: set[str] = set()
        orphans = claim_orphans(
            journal.directory, store=journal.store, own=journal.name, others=others
        )
        for orphan in orphans:
            try:
                mark = self._stored_mark(orphan.name)
                batch: list[UsageRow] = []
                last = mark
                for seq, row in orphan.rows(mark):
                    batch.append(UsageRow(*row))
                    last = seq
                    if len(batch) == _SLICE:
                        written += self.write(batch, (orphan.name, last))
                        batch = []
                if batch:
                    written += self.write(batch, (orphan.name, last))
                # Its files first: a mark outlives them harmlessly, never the other way round.
                orphan.remove()
                self._forget_journal(orphan.name)
            finally:
                orphan.release()
        if written:
            log.warning("wrote %d usage rows a stopped gateway process had not written", written)
        if others - self._foreign:
            self._foreign |= others
            log.warning(
                "%s holds the usage rows of a gateway process that served another database: "
                "start a node on that database with this data dir to write them",
                journal.directory,
            )
        return written

    def _stored_mark(self, name: str) -> int:
        """How far into journal ``name`` the store holds the rows (0: none)."""
        with self._write_lock:  # both engines' connections autocommit here
            found = self._conn.execute(
                "SELECT seq FROM usage_journals WHERE journal = ?", [name]
            ).fetchone()
        return int(found[0]) if found is not None else 0

    def _forget_journal(self, name: str) -> None:
        with self._write_lock:
            self._conn.execute("DELETE FROM usage_journals WHERE journal = ?", [name])

    def add(self, row: UsageRow) -> None:
        """Queue a row (cheap: called on the request path); with a journal, it is on disk
        when this returns."""
        journal = self._journal
        if journal is not None and not self._journal_failed:
            try:
                journal.append(row)
            except Exception as exc:  # the disk is full, say: rows go on, in memory only
                self._journal_failed = True
                log.error(
                    "the usage journal in %s failed (%s): rows are kept in memory only until "
                    "the next start",
                    journal.directory,
                    getattr(exc, "strerror", None) or type(exc).__name__,
                )
        self._pending.append(row)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def take(self) -> list[UsageRow]:
        rows, self._pending = self._pending, []
        return rows

    def write(self, rows: Sequence[UsageRow], mark: tuple[str, int] | None = None) -> int:
        """Write a batch in one transaction; safe to call from a worker thread. Returns how
        many rows went in (those of keys deleted meanwhile do not).

        ``mark`` (journal, row number) is recorded in the same transaction: the store then
        holds that journal's rows up to that number.
        """
        if not rows:
            return 0
        if not isinstance(self._conn, sqlite3.Connection):
            return self._write_postgresql(self._conn, rows, mark)
        with self._write_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # Rows of a key deleted while they waited are dropped: its metadata goes too.
                ids = list({row.key_id for row in rows})
                found = self._conn.execute(
                    f"SELECT key_id, prefix FROM credentials "
                    f"WHERE key_id IN ({', '.join('?' for _ in ids)})",
                    ids,
                ).fetchall()
                rows = _owned(rows, found)
                _execute_rows(self._conn, _insert_sql, rows)
                # The rollups get one upsert per group of the batch, not one per row.
                for table, period, seconds in USAGE_ROLLUPS:
                    _execute_rows(
                        self._conn,
                        functools.partial(_rollup_sql, table, period),
                        rollup_rows(rows, seconds),
                    )
                if mark is not None:
                    self._conn.execute(_MARK_SQL, mark)
                self._conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (the disk full, say) may leave the transaction open.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            return len(rows)

    def _write_postgresql(
        self, conn: PgConnection, rows: Sequence[UsageRow], mark: tuple[str, int] | None
    ) -> int:
        # One COPY per batch; the table's statement trigger rolls the batch up. The batch's
        # keys are locked (FOR SHARE) first: a key deleted meanwhile, on any node, waits for
        # this transaction, or is gone before it and its rows are dropped.
        with self._write_lock, conn.atomic():
            ids = sorted({row.key_id for row in rows})
            found = conn.execute(
                f"SELECT c.key_id, c.prefix FROM credentials c JOIN keys k ON k.id = c.key_id "
                f"WHERE k.id IN ({', '.join('?' for _ in ids)}) FOR SHARE OF k",
                ids,
            ).fetchall()
            rows = _owned(rows, found)
            conn.copy_rows("usage", USAGE_COLUMNS, rows)
            if mark is not None:
                conn.execute(_MARK_SQL, mark)
        return len(rows)

    def requeue(self, rows: Sequence[UsageRow]) -> None:
        """Put back rows whose write failed, ahead of newer ones."""
        self._pending[:0] = rows

    def flush(self) -> int:
        """Write everything waiting now, after any batch being written; returns how many."""
        return self._write_waiting()

    def close(self) -> None:
        """Stop the background thread after its batch, write what is waiting, then close.

        With a journal: when every row is written the journal is removed; when the store
        fails, it stays, and the next writer on this data dir writes its rows.
        """
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        journal = self._journal
        try:
            try:
                self.flush()
            except BaseException:
                if journal is not None:
                    journal.close(all_written=False)
                    log.error(
                        "%d usage rows could not be written now; they are kept in %s and "
                        "written by the next start",
                        self.pending,
                        journal.directory,
                    )
                raise
            if journal is not None:
                journal.close(all_written=True)  # its files first, then its mark
                with contextlib.suppress(Exception):  # a mark outlives its files harmlessly
                    self._forget_journal(journal.name)
        finally:
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
