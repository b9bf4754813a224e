"""Rolling limits enforced by a live gateway: exact under concurrency, and across restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_helpers import Gateway, cli, start_gateway

from opulon.usage_extract import estimate_input_tokens

CHAT: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "limits"}]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("limits"))
    yield gw
    if gw.process is not None:
        gw.stop()
    gw.mock.stop()


async def _simultaneous(
    gateway: Gateway, key: str, count: int, body: dict[str, Any], **headers: str
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one() -> httpx.Response:
            response = await client.post(
                gateway.url + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}", **headers},
            )
            await response.aread()
            return response

        return await asyncio.gather(*(one() for _ in range(count)))


def test_fifty_simultaneous_requests_against_ten_per_minute_admit_exactly_ten(
    gateway: Gateway,
) -> None:
    key = gateway.new_key("requests:10/1m")
    responses = asyncio.run(_simultaneous(gateway, key, 50, CHAT))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 40
    for refused in (r for r in responses if r.status_code == 429):
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        message = refused.json()["error"]["message"]
        assert message.startswith("limit requests:10/1m reached; resets in ")
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(gateway.rows(key, wait_for=10)) == 10
    # Refusals are not usage rows (they reached no provider), but each has its log line.
    deadline = time.monotonic() + 3
    expected = f"{key[:16]} /v1/chat/completions gpt-4o 429 "
    while gateway.output.read_text().count(expected) < 40:
        assert time.monotonic() < deadline, "refusals were not logged"
        time.sleep(0.05)


def test_the_same_holds_for_streaming_requests(gateway: Gateway) -> None:
    key = gateway.new_key("requests:10/1m")
    responses = asyncio.run(_simultaneous(gateway, key, 50, {**CHAT, "stream": True}))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 40
    assert all(r.text.rstrip().endswith("data: [DONE]") for r in responses if r.status_code == 200)


def test_a_concurrency_limit_admits_exactly_that_many_at_once(gateway: Gateway) -> None:
    key = gateway.new_key()
    cli(gateway.home, "keys", "update", key[:16], "--concurrency", "4")
    time.sleep(0.6)  # the server picks the change up within a second
    responses = asyncio.run(
        _simultaneous(gateway, key, 50, {**CHAT, "stream": True, "mock": {"chunk-delay-ms": 40}})
    )
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 4 and statuses.count(429) == 46
    refused = next(r for r in responses if r.status_code == 429)
    assert "concurrency" in refused.json()["error"]["message"]
    assert "retry-after" in refused.headers
    # Once those finish, the key may send again.
    assert asyncio.run(_simultaneous(gateway, key, 1, CHAT))[0].status_code == 200


def test_concurrent_streams_overshoot_a_token_window_only_by_what_they_used_beyond_reservation(
    gateway: Gateway,
) -> None:
    # A long prompt and a small max_tokens: each request uses more than it reserved.
    body = {
        **CHAT,
        "messages": [{"role": "user", "content": "y" * 4000}],
        "stream": True,
        "max_tokens": 1,
        "mock": {"chunk-delay-ms": 20},
    }
    reserved = estimate_input_tokens(json.dumps(body).encode()) + 1
    limit = reserved * 6  # room for exactly six reservations
    key = gateway.new_key(f"tokens:{limit}/1m")
    responses = asyncio.run(_simultaneous(gateway, key, 20, body))
    admitted = [r for r in responses if r.status_code == 200]
    assert len(admitted) == 6
    rows = gateway.rows(key, wait_for=6)
    used = sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    beyond_reservation = sum(
        max(0, r["input_tokens"] + r["output_tokens"] - reserved) for r in rows
    )
    assert beyond_reservation > 0
    assert limit < used <= limit + beyond_reservation
    after = asyncio.run(_simultaneous(gateway, key, 1, body))[0]
    assert after.status_code == 429
    assert after.json()["error"]["message"].startswith(f"limit tokens:{limit}/1m reached")


def test_a_limit_changed_with_the_cli_applies_within_one_second(gateway: Gateway) -> None:
    key = gateway.new_key("requests:2/1m")
    statuses = [r.status_code for r in asyncio.run(_simultaneous(gateway, key, 3, CHAT))]
    assert sorted(statuses) == [200, 200, 429]
    cli(gateway.home, "keys", "update", key[:16], "--limit", "requests:5/1m")
    changed = time.monotonic()
    while asyncio.run(_simultaneous(gateway, key, 1, CHAT))[0].status_code != 200:
        assert time.monotonic() - changed < 1.0
        time.sleep(0.05)
    shown = json.loads(cli(gateway.home, "keys", "show", key[:16], "--json"))
    assert shown["usage"][0]["limit"] == "requests:5/1m"
    assert shown["usage"][0]["used"] == 3 and shown["usage"][0]["remaining"] == 2


def test_expiry_applies_to_the_second(gateway: Gateway) -> None:
    key = gateway.new_key()
    expires = int(time.time()) + 3
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    cli(gateway.home, "keys", "update", key[:16], "--expires", stamp)
    while time.time() < expires - 0.5:
        time.sleep(0.05)
    assert asyncio.run(_simultaneous(gateway, key, 1, CHAT))[0].status_code == 200
    while time.time() < expires + 0.05:
        time.sleep(0.02)
    refused = asyncio.run(_simultaneous(gateway, key, 1, CHAT))[0]
    assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]


def test_a_restart_forgives_nothing(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    try:
        key = gateway.new_key("requests:3/1h", "tokens:1M/1d")
        statuses = [r.status_code for r in asyncio.run(_simultaneous(gateway, key, 4, CHAT))]
        assert sorted(statuses) == [200, 200, 200, 429]
        gateway.stop()
        gateway.start()
        refused = asyncio.run(_simultaneous(gateway, key, 1, CHAT))[0]
        assert refused.status_code == 429
        assert refused.json()["error"]["message"].startswith("limit requests:3/1h reached")
        assert 3000 < int(refused.headers["retry-after"]) <= 3600
    finally:
        if gateway.process is not None:
            gateway.stop()
        gateway.mock.stop()


def test_keys_list_and_show_report_each_limits_use(gateway: Gateway) -> None:
    key = gateway.new_key("requests:10/1m", "tokens:100k/1h")
    asyncio.run(_simultaneous(gateway, key, 3, CHAT))
    rows = gateway.rows(key, wait_for=3)
    tokens = sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    shown = json.loads(cli(gateway.home, "keys", "show", key[:16], "--json"))
    assert [(u["limit"], u["used"], u["remaining"]) for u in shown["usage"]] == [
        ("requests:10/1m", 3, 7),
        ("tokens:100k/1h", tokens, 100_000 - tokens),
    ]
    assert 0 < shown["usage"][0]["reset_seconds"] <= 60
    listed = {k["prefix"]: k for k in json.loads(cli(gateway.home, "keys", "list", "--json"))}
    assert listed[key[:16]]["usage"] == shown["usage"] or listed[key[:16]]["usage"][0]["used"] == 3
    human = cli(gateway.home, "keys", "show", key[:16])
    assert "3 used, 7 left" in human
