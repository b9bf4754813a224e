from __future__ import annotations

import calendar
import csv
import io
import itertools
import time
from collections import Counter
from typing import Any

import pytest
from cli_helpers import run_error, run_json, run_ok
from usage_seed import DAY, HOUR, MINUTE, ROWS

from opulon.keys import KeyRecord, KeyStore
from opulon.limits import parse_budget, parse_limit
from opulon.storage import Store

pytestmark = pytest.mark.usefixtures("database_from_env")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def seeded(store: Store) -> dict[str, Any]:
    """Three keys, two models, mixed statuses, at fixed ages; returns the keys and the times."""
    keys = KeyStore(store)
    records: dict[str, KeyRecord] = {
        "alice": keys.create(
            "alice", limits=[parse_limit("requests:3/1h"), parse_budget("tokens:1M")]
        )[0],
        "bob": keys.create("bob")[0],
        "carol": keys.create("carol")[0],
    }
    now = time.time()
    times = []
    for name, age, model, status, latency, input_tokens, output_tokens in ROWS:
        record = records[name]
        store.db.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [record.id, record.prefix, now - age, model, status, latency, input_tokens,
             output_tokens],
        )  # fmt: skip
        times.append(now - age)
    return {"keys": records, "now": now, "times": times}


def _table(output: str, title: str) -> list[list[str]]:
    """The rows of the Rich table under ``title``, as stripped cells (header row first)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("└"):
            break
        if line.startswith(("│", "┃")):
            rows.append(
                [cell.strip() for cell in line.strip("│┃").split("│" if line[0] == "│" else "┃")]
            )
    return rows


def test_dashboard_shows_totals_keys_models_chart_and_errors(seeded: dict[str, Any]) -> None:
    output = run_ok("usage").stdout
    header, totals = _table(output, "Totals")
    assert header == ["requests", "tokens in", "tokens out", "errors", "error %", "p50", "p95"]
    assert totals == ["8", "5,800", "1,100", "3", "37.5%", "400.0 ms", "1,395.0 ms"]
    assert "latency percentiles exact" in output

    keys = _table(output, "By key")
    alice = seeded["keys"]["alice"].prefix
    assert keys[1] == [alice, "alice", "4", "3,500", "700", "1", "25.0%", "200.0 ms", "470.0 ms"]
    named = {row[1]: row[2:5] for row in keys[1:]}
    assert named == {
        "alice": ["4", "3,500", "700"],
        "bob": ["2", "1,600", "300"],
        "carol": ["2", "700", "100"],
    }
    # alice's limits, as used now: two requests in the last hour, 7,800 tokens in all.
    limits = _table(output, "Limits (use now)")
    assert [row[0] for row in limits[1:]] == [alice, ""]
    assert [row[1] for row in limits[1:]] == ["requests:3/1h", "budget tokens:1M"]
    assert [row[2].split()[-1] for row in limits[1:]] == ["67%", "1%"]
    assert [row[3] for row in limits[1:]] == ["2 / 3", "7,800 / 1,000,000"]

    models = {row[0]: row[1:5] for row in _table(output, "By model")[1:]}
    assert models == {
        "gpt-4o": ["5", "3,700", "700", "2"],
        "claude-haiku": ["3", "2,100", "400", "1"],
    }

    errors = {row[0]: row[1:] for row in _table(output, "Errors by status")[1:]}
    assert errors == {"429": ["1", "12.5%"], "499": ["1", "12.5%"], "500": ["1", "12.5%"]}

    assert "Requests and tokens per hour" in output
    recent = [ts for ts in seeded["times"] if ts > seeded["now"] - DAY]
    per_hour = Counter(int(ts) // HOUR for ts in recent)
    chart = [line for line in output.splitlines() if "peak" in line]
    assert "requests" in chart[0] and f"peak {max(per_hour.values())}" in chart[0]
    assert "tokens" in chart[1]


def test_dashboard_main_table_follows_by(seeded: dict[str, Any]) -> None:
    output = run_ok("usage", "--by", "status").stdout
    statuses = {row[0]: row[1] for row in _table(output, "By status")[1:]}
    assert statuses == {"200": "5", "429": "1", "499": "1", "500": "1"}
    assert "Errors by status" not in output  # the main table already shows them
    assert "By key" in output and "By model" in output


def test_json_gives_the_same_figures(seeded: dict[str, Any]) -> None:
    data = run_json("usage", "--since", "7d")
    assert data["by"] == "key" and data["percentiles"] == "exact"
    assert data["filters"] == {"key": None, "model": None}
    assert data["totals"] == {
        "requests": 10,
        "input_tokens": 8900,
        "output_tokens": 1750,
        "tokens": 10650,
        "errors": 3,
        "error_rate": 0.3,
        # 2, 100, 250, 300, 400, 500, 600, 700, 1200, 1500
        "latency_p50_ms": 450.0,
        "latency_p95_ms": 1365.0,
    }
    alice = data["groups"][0]
    assert alice["key"] == seeded["keys"]["alice"].prefix
    assert (alice["requests"], alice["input_tokens"], alice["output_tokens"]) == (5, 6500, 1300)
    assert [(s["limit"], s["used"], s["remaining"]) for s in alice["limits"]] == [
        ("requests:3/1h", 2, 1),
        ("tokens:1M", 7800, 992200),
    ]
    for field in ("since", "until", "generated"):
        assert data[field].endswith("Z") and data[field][10] == "T"


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("model", {"gpt-4o": 5, "claude-haiku": 3}),
        ("status", {200: 5, 429: 1, 499: 1, 500: 1}),
    ],
)
def test_json_by_model_and_status(
    seeded: dict[str, Any], by: str, expected: dict[Any, int]
) -> None:
    data = run_json("usage", "--by", by)
    assert {group[by]: group["requests"] for group in data["groups"]} == expected


@pytest.mark.parametrize(("by", "step"), [("day", DAY), ("hour", HOUR)])
def test_json_by_day_and_hour_buckets_times_in_utc(
    seeded: dict[str, Any], by: str, step: int
) -> None:
    data = run_json("usage", "--since", "30d", "--by", by)
    expected: dict[str, int] = {}
    for ts in seeded["times"]:
        start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts) - int(ts) % step))
        expected[start] = expected.get(start, 0) + 1
    groups = data["groups"]
    assert {g[by]: g["requests"] for g in groups if g["requests"]} == expected
    # Every bucket of the span, in order, with no gap.
    starts = [calendar.timegm(time.strptime(g[by], "%Y-%m-%dT%H:%M:%SZ")) for g in groups]
    assert all(b - a == step for a, b in itertools.pairwise(starts))
    assert len(groups) in (30 * DAY // step, 30 * DAY // step + 1)


def test_csv_gives_the_main_breakdown(seeded: dict[str, Any]) -> None:
    text = run_ok("usage", "--csv", "--by", "model").stdout
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [
        ["model", "requests", "input_tokens", "output_tokens", "tokens", "errors", "error_rate",
         "latency_p50_ms", "latency_p95_ms"],
        # gpt-4o: 2, 100, 300, 600, 1200; claude-haiku: 250, 500, 1500
        ["gpt-4o", "5", "3700", "700", "4400", "2", "0.4", "300.0", "1080.0"],
        ["claude-haiku", "3", "2100", "400", "2500", "1", "0.3333", "500.0", "1400.0"],
    ]  # fmt: skip
    by_key = list(csv.reader(io.StringIO(run_ok("usage", "--csv").stdout)))
    assert by_key[0][:3] == ["key", "name", "requests"]
    assert {row[1]: row[2] for row in by_key[1:]} == {"alice": "4", "bob": "2", "carol": "2"}


def test_filters_by_key_model_and_span(seeded: dict[str, Any]) -> None:
    bob = seeded["keys"]["bob"].prefix
    data = run_json("usage", "--since", "30d", "--key", bob)
    assert (data["totals"]["requests"], data["totals"]["input_tokens"]) == (4, 6700)
    assert [g["key"] for g in data["groups"]] == [bob]

    data = run_json("usage", "--model", "claude-*")
    assert data["totals"]["requests"] == 3
    assert data["filters"]["model"] == "claude-*"

    data = run_json("usage", "--since", "7d", "--until", "24h")
    assert (data["totals"]["requests"], data["totals"]["input_tokens"]) == (2, 3100)

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seeded["now"] - 4 * HOUR))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seeded["now"] - 15 * MINUTE))
    data = run_json("usage", "--since", since, "--until", until)
    # a50m, a2h, b20m, b3h, c40m
    assert (data["totals"]["requests"], data["totals"]["output_tokens"]) == (5, 820)
    assert (data["since"], data["until"]) == (since, until)


def test_watch_draws_the_dashboard_and_stops(seeded: dict[str, Any]) -> None:
    output = run_ok("usage", "--watch", "--watch-iterations", "1").stdout
    assert _table(output, "Totals")[1][:3] == ["8", "5,800", "1,100"]


def test_an_empty_home_shows_zeros() -> None:
    data = run_json("usage")
    assert data["totals"]["requests"] == 0 and data["groups"] == []
    assert data["totals"]["latency_p50_ms"] is None
    assert "no requests" in run_ok("usage").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "invalid --since 'yesterday': use 24h, 7d, 30d or a date like 2026-11-01"),
        (["--since", "0d"], "invalid --since '0d'"),
        (["--until", "2026-02-30"], "invalid --until '2026-02-30'"),
        (["--since", "1d", "--until", "2d"], "must be before --until"),
        (["--key", "alice"], "invalid --key 'alice': give a key's display prefix"),
        (["--model", ""], "invalid --model ''"),
        (["--by", "week"], "invalid --by 'week': use one of key, model, day, hour, status"),
        (["--json", "--csv"], "give either --json or --csv, not both"),
        (["--watch", "--json"], "--watch refreshes the dashboard"),
        (["--watch", "--watch-iterations", "0"], "invalid --watch-iterations 0"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    line = run_error("usage", *args, code=2)
    assert message in line


def test_an_unknown_key_gets_one_line(store: Store) -> None:
    line = run_error("usage", "--key", "op-ul-zzzzzzzzzz", code=1)
    assert "no key with prefix op-ul-zzzzzzzzzz" in line


def test_a_narrow_console_rounds_the_figures(
    seeded: dict[str, Any], store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = seeded["keys"]["bob"]
    store.db.execute(
        "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [bob.id, bob.prefix, time.time() - 60, "gpt-4o", 200, 2500.0, 2_494_200, 12_345],
    )
    monkeypatch.setenv("COLUMNS", "80")
    output = run_ok("usage").stdout
    header, totals = _table(output, "Totals")
    assert header == ["req", "in", "out", "err", "err%", "p50", "p95"]
    # 5,800 + 2,494,200 tokens in, 1,100 + 12,345 out; seconds from one second on.
    assert totals[:5] == ["9", "2.5M", "13.4k", "3", "33.3%"]
    assert totals[5] == "500ms" and totals[6] == "2.1s"
    limits = _table(output, "Limits (use now)")
    assert [row[3] for row in limits[1:]] == ["2 / 3", "7,800 / 1M"]
