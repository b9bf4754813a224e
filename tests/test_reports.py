from __future__ import annotations

import random
import sqlite3
from bisect import bisect_right
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database
from usage_seed import DAY, MINUTE, ROWS

from opulon.errors import InvalidInput, NotFound
from opulon.keys import KeyRecord, KeyStore
from opulon.limiter import LimitState
from opulon.limits import parse_budget, parse_limit
from opulon.reports import (
    ReportQuery,
    UsageReport,
    build_report,
    exact_percentile,
    histogram_percentile,
    parse_moment,
    resolve_query,
)
from opulon.storage import (
    ROLLUP_LATENCY_BOUNDS_MS,
    ROLLUP_LATENCY_COLUMNS,
    USAGE_ROLLUPS,
    Store,
    install_rollup_trigger,
    migrations,
)
from opulon.usage import UsageRow, UsageWriter

NOW = datetime(2026, 11, 25, 14, 30, tzinfo=UTC).timestamp()


def _seed(store: Store) -> dict[str, KeyRecord]:
    keys = KeyStore(store)
    records = {
        "alice": keys.create(
            "alice",
            limits=[
                parse_limit("requests:3/1h"),
                parse_limit("tokens:5000/1d"),
                parse_budget("tokens:1M"),
            ],
        )[0],
        "bob": keys.create("bob", limits=[parse_limit("requests:100/30d")])[0],
        "carol": keys.create("carol")[0],
    }
    for name, age, model, status, latency, input_tokens, output_tokens in ROWS:
        record = records[name]
        store.db.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [record.id, record.prefix, NOW - age, model, status, latency, input_tokens,
             output_tokens],
        )  # fmt: skip
    return records


def _report(store: Store, since: str = "24h", **options: Any) -> UsageReport:
    by = options.pop("by", "key")
    key = options.pop("key", None)
    model = options.pop("model", None)
    until = options.pop("until", None)
    query = resolve_query(since=since, until=until, by=by, key=key, model=model, now=NOW)
    return build_report(store, query, now=NOW, **options)


def _figures(group: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        group[name]
        for name in ("requests", "input_tokens", "output_tokens", "errors", "error_rate")
    )


@pytest.fixture
def seeded(store: Store) -> dict[str, KeyRecord]:
    return _seed(store)


def test_totals_count_requests_tokens_errors_and_exact_latency_percentiles(
    store: Store, seeded: dict[str, KeyRecord]
) -> None:
    report = _report(store).to_json()
    assert report["since"] == "2026-11-24T14:30:00Z"
    assert report["until"] == "2026-11-25T14:30:00Z"
    assert report["percentiles"] == "exact"
    # Latencies 2, 100, 250, 300, 500, 600, 1200, 1500: p50 at rank 3.5, p95 at rank 6.65.
    assert report["totals"] == {
        "requests": 8,
        "input_tokens": 5800,
        "output_tokens": 1100,
        "tokens": 6900,
        "errors": 3,
        "error_rate": 0.375,
        "latency_p50_ms": 400.0,
        "latency_p95_ms": 1395.0,
    }


def test_breakdown_by_key_lists_every_key_with_its_figures(
    store: Store, seeded: dict[str, KeyRecord]
) -> None:
    groups = _report(store, by="key").to_json()["groups"]
    # Most requests first; bob and carol tie.
    assert groups[0]["key"] == seeded["alice"].prefix
    assert {g["name"]: (g["key"], *_figures(g)) for g in groups} == {
        "alice": (seeded["alice"].prefix, 4, 3500, 700, 1, 0.25),
        "bob": (seeded["bob"].prefix, 2, 1600, 300, 1, 0.5),
        "carol": (seeded["carol"].prefix, 2, 700, 100, 1, 0.5),
    }
    # alice: 2, 100, 300, 500 ms.
    assert (groups[0]["latency_p50_ms"], groups[0]["latency_p95_ms"]) == (200.0, 470.0)


def test_breakdown_by_model_and_by_status(store: Store, seeded: dict[str, KeyRecord]) -> None:
    models = _report(store, by="model").to_json()["groups"]
    assert [(g["model"], *_figures(g)) for g in models] == [
        ("gpt-4o", 5, 3700, 700, 2, 0.4),
        ("claude-haiku", 3, 2100, 400, 1, 0.3333),
    ]
    statuses = _report(store, by="status").to_json()["groups"]
    assert [(g["status"], g["requests"], g["errors"]) for g in statuses] == [
        (200, 5, 0),
        (429, 1, 1),
        (499, 1, 1),
        (500, 1, 1),
    ]


def test_breakdown_by_day_and_by_hour_covers_every_bucket_of_the_span(
    store: Store, seeded: dict[str, KeyRecord]
) -> None:
    days = _report(store, since="7d", by="day").to_json()["groups"]
    assert [(g["day"], g["requests"]) for g in days] == [
        ("2026-11-18T00:00:00Z", 0),
        ("2026-11-19T00:00:00Z", 0),
        ("2026-11-20T00:00:00Z", 0),
        ("2026-11-21T00:00:00Z", 0),
        ("2026-11-22T00:00:00Z", 1),  # bob, 3 days ago
        ("2026-11-23T00:00:00Z", 0),
        ("2026-11-24T00:00:00Z", 1),  # alice, 30 hours ago
        ("2026-11-25T00:00:00Z", 8),
    ]
    hours = _report(store, by="hour").to_json()["groups"]
    assert len(hours) == 25
    assert hours[0]["hour"] == "2026-11-24T14:00:00Z"
    assert hours[-1]["hour"] == "2026-11-25T14:00:00Z"
    busy = {g["hour"][11:16]: (g["requests"], g["latency_p50_ms"]) for g in hours if g["requests"]}
    assert busy == {
        "06:00": (1, 600.0),
        "09:00": (1, 2.0),
        "11:00": (1, 1500.0),
        "12:00": (1, 500.0),
        "13:00": (2, 750.0),
        "14:00": (2, 175.0),
    }


def test_filters_by_key_model_and_span(store: Store, seeded: dict[str, KeyRecord]) -> None:
    alice = _report(store, since="7d", key=seeded["alice"].prefix).to_json()
    assert _figures(alice["totals"]) == (5, 6500, 1300, 1, 0.2)
    assert [g["key"] for g in alice["groups"]] == [seeded["alice"].prefix]

    claude = _report(store, model="claude*", by="model").to_json()
    assert _figures(claude["totals"]) == (3, 2100, 400, 1, 0.3333)
    assert [g["model"] for g in claude["groups"]] == ["claude-haiku"]

    both = _report(store, since="30d", key=seeded["bob"].prefix, model="gpt-4o").to_json()
    assert _figures(both["totals"]) == (1, 5000, 1000, 0, 0.0)

    assert _report(store, since="30d").totals.requests == 11
    older = _report(store, since="7d", until="24h").to_json()
    assert _figures(older["totals"]) == (2, 3100, 650, 0, 0.0)
    absolute = _report(store, since="2026-11-25T10:30:00Z", until="2026-11-25T14:00").to_json()
    # a2h, a50m, b3h, c40m; the rows of the last 30 minutes are after --until.
    assert _figures(absolute["totals"]) == (4, 3600, 520, 2, 0.5)


def test_a_rotated_prefix_still_finds_the_key_and_its_history(
    store: Store, seeded: dict[str, KeyRecord]
) -> None:
    rotated, _ = KeyStore(store).rotate(seeded["carol"].prefix)
    old = _report(store, key=seeded["carol"].prefix).to_json()
    assert old["groups"][0]["key"] == rotated.prefix
    assert old["totals"]["requests"] == 2


def test_limit_use_is_what_the_gateway_limiter_counts_now(
    store: Store, seeded: dict[str, KeyRecord]
) -> None:
    groups = {g["name"]: g for g in _report(store, since="1h").to_json()["groups"]}
    assert groups["alice"]["limits"] == [
        # a10m and a50m; the older one leaves the hour in 10 minutes.
        {"limit": "requests:3/1h", "used": 2, "remaining": 1, "reset_seconds": 600.0},
        # 1200 + 2400 + 600 + 0; the oldest tokens (2 hours ago) leave in 22 hours.
        {"limit": "tokens:5k/1d", "used": 4200, "remaining": 800, "reset_seconds": 79200.0},
        {"limit": "tokens:1M", "used": 7800, "remaining": 992200, "reset_seconds": 0.0},
    ]
    assert [(s["used"], s["remaining"]) for s in groups["bob"]["limits"]] == [(4, 96)]
    assert groups["carol"]["limits"] == []


def test_long_windows_summed_from_rollups_agree_with_the_limiter_replay(
    store: Store, seeded: dict[str, KeyRecord]
) -> None:
    def limits(replay_max_rows: int) -> list[LimitState]:
        report = _report(store, replay_max_rows=replay_max_rows)
        return [state for group in report.keys for state in group.limits]

    replayed = limits(10_000)
    summed = limits(0)
    assert [s.limit for s in summed] == [s.limit for s in replayed]
    assert [(s.used, s.remaining) for s in summed] == [(s.used, s.remaining) for s in replayed]
    for mine, theirs in zip(summed, replayed, strict=True):
        assert mine.reset_seconds == pytest.approx(theirs.reset_seconds, abs=0.001)


def test_histogram_percentiles_interpolate_within_the_bucket(
    store: Store, seeded: dict[str, KeyRecord]
) -> None:
    report = _report(store, exact_max_rows=0)
    assert report.percentiles == "histogram"
    assert report.totals.requests == 8
    # Rank 4 of 8 is the only latency in [300, 400): its upper bound. Rank 7.6 is 60% into
    # the only latency in [1500, 2000).
    assert report.totals.latency_p50_ms == 400.0
    assert report.totals.latency_p95_ms == pytest.approx(1800.0)


def test_percentile_helpers() -> None:
    assert exact_percentile([], 0.5) is None
    assert exact_percentile([5.0], 0.95) == 5.0
    assert exact_percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    histogram = [0] * len(ROLLUP_LATENCY_COLUMNS)
    assert histogram_percentile(histogram, 0.5) is None
    histogram[ROLLUP_LATENCY_BOUNDS_MS.index(100) + 1] = 10  # ten latencies in [100, 150)
    assert histogram_percentile(histogram, 0.5) == 125.0
    histogram[-1] = 10  # ten at 1000 s or more: the open top bucket answers its lower bound
    assert histogram_percentile(histogram, 0.95) == 1_000_000


@pytest.mark.parametrize(
    ("option", "text"),
    [("--since", "x"), ("--since", "0h"), ("--since", "24"), ("--until", "2026-13-01"),
     ("--since", "1900-01-01"), ("--until", "2999-01-01")],
)  # fmt: skip
def test_bad_moments_are_refused_with_a_hint(option: str, text: str) -> None:
    with pytest.raises(InvalidInput, match=r"use 24h, 7d, 30d or a date like 2026-11-01"):
        parse_moment(text, option=option, now=NOW)


def test_bad_queries_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"--since .* must be before --until"):
        resolve_query(since="1d", until="2d", now=NOW)
    with pytest.raises(InvalidInput, match="invalid --by 'week'"):
        resolve_query(by="week", now=NOW)
    with pytest.raises(InvalidInput, match="invalid --key 'alice'"):
        resolve_query(key="alice", now=NOW)
    with pytest.raises(InvalidInput, match="invalid --model ''"):
        resolve_query(model="", now=NOW)


def test_an_unknown_key_is_not_found(store: Store) -> None:
    query = ReportQuery(since=NOW - DAY, until=NOW, key="op-ul-zzzzzzzzzz")
    with pytest.raises(NotFound, match="no key with prefix op-ul-zzzzzzzzzz"):
        build_report(store, query, now=NOW)


# -- the rollups -------------------------------------------------------------------------------


def _expected_rollup(rows: list[tuple[Any, ...]], seconds: int) -> dict[tuple[Any, ...], list[int]]:
    """The rollup computed in Python from raw usage rows."""
    expected: dict[tuple[Any, ...], list[int]] = defaultdict(
        lambda: [0, 0, 0] + [0] * len(ROLLUP_LATENCY_COLUMNS)
    )
    for key_id, prefix, ts, model, status, latency, input_tokens, output_tokens in rows:
        period = int(ts) - int(ts) % seconds
        cell = expected[(period, key_id, prefix, model, status)]
        cell[0] += 1
        cell[1] += input_tokens
        cell[2] += output_tokens
        cell[3 + bisect_right(ROLLUP_LATENCY_BOUNDS_MS, latency)] += 1
    return dict(expected)


def _stored_rollup(
    db: Database | sqlite3.Connection, table: str
) -> dict[tuple[Any, ...], list[int]]:
    return {
        tuple(row[:5]): list(row[5:]) for row in db.execute(f"SELECT * FROM {table}").fetchall()
    }


def _assert_rollups_match_rows(db: Database | sqlite3.Connection) -> None:
    rows = db.execute("SELECT * FROM usage").fetchall()
    assert rows
    for table, _, seconds in USAGE_ROLLUPS:
        assert _stored_rollup(db, table) == _expected_rollup(rows, seconds), table


def _random_rows(records: list[KeyRecord], count: int, rng: random.Random) -> list[UsageRow]:
    return [
        UsageRow(
            record.id,
            record.prefix,
            NOW - rng.uniform(0, 3 * DAY),
            rng.choice(["gpt-4o", "claude-haiku", "o3-mini"]),
            rng.choice([200, 200, 200, 429, 500, 499]),
            rng.choice([0.3, 1.0, 1.5, 999.9, 1000.0, 2e6, rng.lognormvariate(6, 1.5)]),
            rng.randrange(5000),
            rng.randrange(800),
        )
        for record in (rng.choice(records) for _ in range(count))
    ]


def test_rollups_stay_in_step_with_rows_from_the_usage_writer(store: Store) -> None:
    records = [KeyStore(store).create(f"k{i}")[0] for i in range(3)]
    writer = UsageWriter(store)
    rng = random.Random(3)
    for _ in range(4):
        writer.write(_random_rows(records, 250, rng))
    writer.close()
    assert store.db.execute("SELECT count(*) FROM usage").fetchone()[0] == 1000
    _assert_rollups_match_rows(store.db)


def test_migration_backfills_the_rollups_from_existing_rows(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    db = Database(conn)
    migrations.apply(db, stop_before="m002_usage_rollups")
    assert "usage_hourly" not in db.table_names()
    rng = random.Random(5)
    for key_id in (1, 2):
        conn.execute("INSERT INTO keys (id, name, created_at) VALUES (?, 'k', 0)", [key_id])
    for _ in range(400):
        key_id = rng.choice((1, 2))
        conn.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [key_id, f"op-ul-000000000{key_id}", NOW - rng.uniform(0, 5 * DAY),
             rng.choice(["a", "b"]), rng.choice([200, 503]), rng.uniform(0, 5000),
             rng.randrange(100), rng.randrange(100)],
        )  # fmt: skip
    migrations.apply(db)
    _assert_rollups_match_rows(db)
    # From now on a connection's rollup trigger keeps them in step (open_store installs it).
    install_rollup_trigger(conn)
    conn.execute("INSERT INTO usage VALUES (1, 'op-ul-0000000001', ?, 'a', 200, 5, 1, 1)", [NOW])
    _assert_rollups_match_rows(db)


def test_deleting_a_key_deletes_its_rollups(store: Store) -> None:
    keys = KeyStore(store)
    gone, kept = keys.create("gone")[0], keys.create("kept")[0]
    writer = UsageWriter(store)
    writer.write(_random_rows([gone, kept], 300, random.Random(9)))
    writer.close()
    for table, _, _ in USAGE_ROLLUPS:
        assert store.db.execute(
            f"SELECT count(*) FROM {table} WHERE key_id = ?", [gone.id]
        ).fetchone()[0]
    keys.delete(gone.prefix)
    for table, _, _ in USAGE_ROLLUPS:
        left = store.db.execute(f"SELECT DISTINCT key_id FROM {table}").fetchall()
        assert left == [(kept.id,)], table
    _assert_rollups_match_rows(store.db)


def test_reports_from_rollups_equal_reports_from_raw_rows(store: Store) -> None:
    """Whatever the span, days, hours and raw edges add up to exactly the raw rows."""
    records = [KeyStore(store).create(f"k{i}")[0] for i in range(3)]
    rng = random.Random(11)
    rows = _random_rows(records, 600, rng)
    writer = UsageWriter(store)
    writer.write(rows)
    writer.close()
    spans = [
        (NOW - 3 * DAY - 5, NOW + 1),
        (NOW - 2 * DAY, NOW - DAY),
        (
            datetime(2026, 11, 23, tzinfo=UTC).timestamp(),
            datetime(2026, 11, 25, tzinfo=UTC).timestamp(),
        ),
        (NOW - 50 * MINUTE, NOW - 10 * MINUTE),
        *((NOW - rng.uniform(0, 3 * DAY), NOW - rng.uniform(0, DAY)) for _ in range(6)),
    ]
    for since, until in spans:
        if since >= until:
            continue
        inside = [row for row in rows if since <= row.ts < until]
        for by, value in (("key", lambda r: r.key_prefix), ("model", lambda r: r.model),
                          ("status", lambda r: r.status),
                          ("day", lambda r: int(r.ts) - int(r.ts) % DAY)):  # fmt: skip
            report = build_report(store, ReportQuery(since, until, by=by), now=NOW)
            expected: dict[Any, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
            for row in inside:
                cell = expected[value(row)]
                cell[0] += 1
                cell[1] += row.input_tokens
                cell[2] += row.output_tokens
                cell[3] += row.status >= 400
            got = {
                group.value: [group.figures.requests, group.figures.input_tokens,
                              group.figures.output_tokens, group.figures.errors]
                for group in report.groups
                if group.figures.requests
            }  # fmt: skip
            assert got == dict(expected), (since, until, by)
            latencies = [row.latency_ms for row in inside]
            assert report.totals.latency_p95_ms == exact_percentile(latencies, 0.95)
