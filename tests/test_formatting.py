"""How times, numbers and durations read, in the terminal and on the pages alike."""

from __future__ import annotations

from datetime import UTC, date, datetime

from opulon.formatting import (
    CLOCK,
    DATE,
    SECOND,
    compact,
    format_duration,
    format_reset,
    grouped,
    iso,
    latency_exact,
    latency_short,
    latency_text,
    relative_duration,
    short_date,
    utc,
    window_text,
)

MOMENT = datetime(2026, 11, 25, 14, 5, 9, 750_000, tzinfo=UTC).timestamp()


def test_times_are_utc_to_the_second_and_never_rounded_up() -> None:
    assert iso(MOMENT) == "2026-11-25T14:05:09Z"
    assert utc(MOMENT) == "2026-11-25 14:05"
    assert utc(MOMENT, SECOND) == "2026-11-25 14:05:09"
    assert utc(MOMENT, DATE) == "2026-11-25"
    assert utc(MOMENT, CLOCK) == "14:05:09"
    assert utc(None) == "-"
    assert short_date(date(2026, 3, 2)) == "Mar 2"


def test_numbers_read_in_full_or_in_short() -> None:
    assert grouped(1_234_567) == "1,234,567"
    assert [compact(n) for n in (-1500, 12_345, 999_999, 2_500_000_000)] == [
        "-1.5k", "12.3k", "1M", "2.5B",
    ]  # fmt: skip


def test_latencies_for_a_page_an_exact_table_and_a_narrow_one() -> None:
    assert [latency_text(ms) for ms in (0.4, 840, 1234.5, 12_500)] == [
        "0 ms", "840 ms", "1,234 ms", "12.5 s",
    ]  # fmt: skip
    assert latency_exact(1395) == "1,395.0 ms"
    assert [latency_short(ms) for ms in (400, 999.4, 3900)] == ["400ms", "999ms", "3.9s"]


def test_durations_in_words_in_messages_and_in_headers() -> None:
    assert [window_text(s) for s in (1, 604800, 1209600, 7200)] == [
        "1 second", "1 week", "2 weeks", "2 hours",
    ]  # fmt: skip
    assert format_duration(3600 + 59) == "1h"  # from an hour on, hours and minutes only
    assert format_duration(-5) == "0s"
    assert [relative_duration(s) for s in (3 * 86400 + 5, 86400 + 3600)] == ["3 days", "1d1h"]
    assert format_reset(0.0004) == "1ms" and format_reset(3723) == "1h2m3s"
