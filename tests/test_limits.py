from __future__ import annotations

from datetime import UTC, datetime

import pytest

from opulon.errors import InvalidInput
from opulon.formatting import format_duration
from opulon.limits import (
    Limit,
    parse_amount,
    parse_budget,
    parse_expires,
    parse_limit,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("requests:60/1m", Limit("requests", 60, 60)),
        ("tokens:1.5M/5h", Limit("tokens", 1_500_000, 5 * 3600)),
        ("input_tokens:250k/30s", Limit("input_tokens", 250_000, 30)),
        ("output_tokens:2B/7d", Limit("output_tokens", 2_000_000_000, 7 * 86400)),
        ("tokens:10/1d", Limit("tokens", 10, 86400)),
    ],
)
def test_limit_specs_parse(text: str, expected: Limit) -> None:
    assert parse_limit(text) == expected
    assert parse_limit(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokens:abc/1m", "invalid amount 'abc' in limit 'tokens:abc/1m'"),
        ("tokens:0/1m", "must be at least 1"),
        ("tokens:1.25k5/1m", "invalid amount"),
        ("tokens:0.5/1m", "not a whole number"),
        ("bananas:1/1m", "unknown metric 'bananas'"),
        ("tokens:100", "missing window"),
        ("tokens:100/1y", "invalid window '1y'"),
        ("tokens:100/0s", "must be at least 1s"),
        ("tokens:100/400d", "at most 366d"),
        ("tokens", "expected METRIC:AMOUNT"),
        ("", "expected METRIC:AMOUNT"),
    ],
)
def test_bad_limit_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_limit(text)


def test_budget_has_no_window() -> None:
    assert parse_budget("tokens:100M") == Limit("tokens", 100_000_000, None)
    with pytest.raises(InvalidInput, match="a budget has no window"):
        parse_budget("tokens:100M/1d")
    with pytest.raises(InvalidInput, match="invalid amount 'lots'"):
        parse_budget("tokens:lots")


def test_expiry_accepts_durations_and_dates() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_expires("30d", now=now) == datetime(2026, 12, 25, 12, 0, tzinfo=UTC)
    assert parse_expires("2027-01-31", now=now) == datetime(2027, 1, 31, tzinfo=UTC)
    assert parse_expires("2027-01-31T10:00:00+01:00", now=now) == datetime(
        2027, 1, 31, 9, tzinfo=UTC
    )
    with pytest.raises(InvalidInput, match="in the past"):
        parse_expires("2020-01-01", now=now)
    with pytest.raises(InvalidInput, match="invalid expiry 'soon'"):
        parse_expires("soon", now=now)


def test_amount_suffixes() -> None:
    assert parse_amount("1.5M", context="x") == 1_500_000
    assert parse_amount("250k", context="x") == 250_000
    assert parse_amount("7", context="x") == 7


def test_durations_read_like_a_person_writes_them() -> None:
    assert format_duration(2 * 3600 + 14 * 60) == "2h14m"
    assert format_duration(45) == "45s"
    assert format_duration(0.2) == "1s"
    assert format_duration(90061) == "1d1h"
