from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import psycopg
import pytest
from store_engines import cut_connections

from opulon.keys import KeyStore
from opulon.limiter import Limiter
from opulon.limits import parse_budget, parse_limit
from opulon.reports import build_report, resolve_query
from opulon.storage import Store
from opulon.usage import UsageRow, UsageWriter, lifetime_usage, stored_limit_states, window_history


def _row(key_id: int, prefix: str, ts: float, tokens_in: int = 10, tokens_out: int = 5) -> UsageRow:
    return UsageRow(key_id, prefix, ts, "gpt-4o", 200, 3.5, tokens_in, tokens_out)


def test_the_writer_writes_batches_and_flushes_everything(store: Store) -> None:
    record, _ = KeyStore(store).create("a")
    writer = UsageWriter(store)
    now = time.time()
    for i in range(250):
        writer.add(_row(record.id, record.prefix, now - i))
    assert writer.pending == 250
    rows = writer.take()
    writer.write(rows[:100])
    writer.requeue(rows[100:])
    assert writer.flush() == 150
    writer.close()
    assert store.db.execute("SELECT count(*) FROM usage").fetchone()[0] == 250


def test_rows_of_a_key_deleted_while_they_waited_are_dropped(store: Store) -> None:
    keys = KeyStore(store)
    gone, _ = keys.create("gone")
    kept, _ = keys.create("kept")
    writer = UsageWriter(store)
    writer.add(_row(gone.id, gone.prefix, time.time()))
    writer.add(_row(kept.id, kept.prefix, time.time()))
    keys.delete(gone.prefix)
    writer.close()
    assert store.db.execute("SELECT key_id FROM usage").fetchall() == [(kept.id,)]


def test_stored_states_follow_sliding_windows(store: Store) -> None:
    limits = [parse_limit("requests:10/1m"), parse_limit("tokens:1k/1h"), parse_budget("tokens:1M")]
    record, _ = KeyStore(store).create("a", limits=limits)
    now = 1_800_000_000.0
    writer = UsageWriter(store)
    for age in (10, 30, 59.5, 120, 7200):
        writer.add(_row(record.id, record.prefix, now - age))
    writer.close()
    states = stored_limit_states(store.db, record.id, limits, now=now)
    assert [(s.used, s.remaining) for s in states] == [(3, 7), (60, 940), (75, 999_925)]
    assert abs(states[0].reset_seconds - 0.5) < 1e-6  # the row 59.5 s old leaves in 0.5 s
    assert abs(states[1].reset_seconds - (3600 - 120)) < 1e-6
    assert len(window_history(store.db, record.id, now - 60)) == 3
    assert lifetime_usage(store.db, record.id).requests == 5


def test_batches_larger_than_one_statement_keep_every_row_and_rollup(store: Store) -> None:
    # 700 rows in 300 groups: several multi-row statements for the rows and for the rollups.
    record, _ = KeyStore(store).create("a")
    writer = UsageWriter(store)
    start = 1_800_000_000.0
    rows = [
        UsageRow(record.id, record.prefix, start + i, f"m{i % 300}", 200, 1.0 + i % 7, i, 2 * i)
        for i in range(700)
    ]
    writer.write(rows)
    writer.close()
    usage = store.db.execute(
        "SELECT count(*), sum(input_tokens), sum(output_tokens) FROM usage"
    ).fetchone()
    assert usage == (700, sum(range(700)), 2 * sum(range(700)))
    for table in ("usage_hourly", "usage_daily"):
        total = store.db.execute(
            f"SELECT sum(requests), sum(input_tokens), sum(output_tokens), count(DISTINCT model) "
            f"FROM {table}"
        ).fetchone()
        assert total == (700, sum(range(700)), 2 * sum(range(700)), 300)
    per_model = store.db.execute(
        "SELECT requests, input_tokens FROM usage_daily WHERE model = 'm5' AND key_id = ?",
        [record.id],
    ).fetchall()
    expected = [i for i in range(700) if i % 300 == 5]
    assert sum(r for r, _ in per_model) == len(expected)
    assert sum(t for _, t in per_model) == sum(expected)


def test_a_flush_waits_for_the_batch_the_background_thread_is_writing(store: Store) -> None:
    record, _ = KeyStore(store).create("a")
    taken = threading.Event()

    class SlowWriter(UsageWriter):
        def write(self, rows: Sequence[UsageRow], mark: tuple[str, int] | None = None) -> int:
            taken.set()
            time.sleep(0.2)  # a batch in progress, its rows no longer waiting
            return super().write(rows, mark)

    writer = SlowWriter(store)
    for i in range(50):
        writer.add(_row(record.id, record.prefix, time.time() - i))
    writer.start(0.001)
    assert taken.wait(5)
    assert writer.pending == 0
    writer.flush()  # nothing waits any more, but the background batch is not written yet
    assert store.db.execute("SELECT count(*) FROM usage").fetchone()[0] == 50
    writer.close()


def test_the_live_limiter_keys_show_and_usage_report_agree_on_limit_use(store: Store) -> None:
    limits = [
        parse_limit("requests:10/1h"),
        parse_limit("tokens:1k/1h"),
        parse_limit("output_tokens:500/1m"),
        parse_budget("tokens:1M"),
    ]
    record, _ = KeyStore(store).create("a", limits=limits)
    now = 1_800_000_000.0
    writer = UsageWriter(store)
    # The oldest request in the hour used no tokens (a refusal): it frees a request in
    # 600 s, but the oldest tokens (2000 s old) free up only in 1600 s.
    writer.add(UsageRow(record.id, record.prefix, now - 3000, "gpt-4o", 429, 1.0, 0, 0))
    for age in (2000, 1000, 30, 10):
        writer.add(_row(record.id, record.prefix, now - age))
    writer.close()

    live = Limiter(clock=lambda: now)
    live.configure(record.id, limits, None)
    live.load_history(
        record.id,
        window_history(store.db, record.id, now - 3600),
        lifetime_usage(store.db, record.id),
    )
    query = resolve_query(since="24h", until=None, by="key", key=None, model=None, now=now)
    readers = {
        "server": live.states(record.id),
        "keys show": stored_limit_states(store.db, record.id, limits, now=now),
        "usage (replayed)": list(build_report(store, query, now=now).keys[0].limits),
        "usage (summed)": list(
            build_report(store, query, now=now, replay_max_rows=0).keys[0].limits
        ),
    }
    for reader, states in readers.items():
        assert [(s.limit, s.used, s.remaining) for s in states] == [
            (limits[0], 5, 5),
            (limits[1], 60, 940),
            (limits[2], 10, 490),
            (limits[3], 60, 999_940),
        ], reader
        resets = [s.reset_seconds for s in states]
        assert resets == pytest.approx([600, 1600, 30, 0], abs=0.01), reader


@pytest.mark.postgresql_only
def test_rows_wait_out_a_lost_database_connection_and_none_is_lost(store: Store) -> None:
    record, _ = KeyStore(store).create("a")
    writer = UsageWriter(store)
    writer.write([_row(record.id, record.prefix, time.time())])
    for i in range(40):
        writer.add(_row(record.id, record.prefix, time.time() - i))
    assert store.settings.database_url is not None
    assert cut_connections(store.settings.database_url) >= 2  # the writer's and the store's
    with pytest.raises(psycopg.OperationalError):
        writer.flush()
    assert writer.pending == 40  # put back, for the next round
    assert writer.flush() == 40  # on a new connection
    writer.close()
    with pytest.raises(psycopg.OperationalError):  # the store's own statement finds it lost...
        store.db.execute("SELECT 1")
    # ...and the next one opens a new connection.
    assert store.db.execute("SELECT count(*) FROM usage").fetchone()[0] == 41
    assert store.db.execute("SELECT sum(requests) FROM usage_daily").fetchone()[0] == 41


def test_the_status_page_counts_each_request_in_its_utc_day(store: Store) -> None:
    from opulon.usage_store import DatabaseUsageStore

    record, _ = KeyStore(store).create("a")
    midnight = 1_800_057_600.0  # a UTC midnight
    usage = DatabaseUsageStore(store, store.db)
    try:
        # Just before midnight belongs to the day before (a rounding CAST would move it).
        for ts in (midnight - 0.4, midnight - 3600, midnight + 0.4):
            usage.add(_row(record.id, record.prefix, ts))
        usage.flush()
        for _ in range(2):  # the second look on the connection the first one kept
            days, recent = usage.key_usage(record.id, midnight + 60)
            assert [(day.requests, day.input_tokens) for day in days[-2:]] == [(2, 20), (1, 10)]
            assert [row.ts for row in recent] == [midnight + 0.4, midnight - 0.4, midnight - 3600]
    finally:
        usage.close()
