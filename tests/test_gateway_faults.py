"""Faults upstream and at the client: the right status, the right row, and a server that lives."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_helpers import Gateway, cli, start_gateway, streams_until_killed

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "fault test"}]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("faults"), None,
        "--read-timeout", "2", "--stream-idle-timeout", "1", "--max-body", "64k",
    )  # fmt: skip
    yield gw
    if gw.process is not None:
        gw.stop()
    gw.mock.stop()


@pytest.fixture
def key(gateway: Gateway) -> str:
    return gateway.new_key()


def _post(gateway: Gateway, key: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=15,
    )


def _alive(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/healthz", timeout=5).status_code == 200


def test_upstream_errors_keep_their_status_and_client_errors_their_body(
    gateway: Gateway, key: str
) -> None:
    response = _post(gateway, key, {**CHAT, "mock": {"status": 500}})
    assert response.status_code == 500
    # The provider's own words may name the operator's account: the gateway's replace them.
    assert response.json()["error"]["message"] == "the provider 'mock-openai' failed (HTTP 500)"
    response = _post(gateway, key, {**CHAT, "mock": {"status": 400}})
    assert response.status_code == 400
    rows = gateway.rows(key, wait_for=2)
    assert [r["status"] for r in rows] == [500, 400]
    assert all(r["input_tokens"] == r["output_tokens"] == 0 for r in rows)


def test_unreachable_upstream_gives_502_in_each_api_shape(gateway: Gateway, key: str) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="dead-model", messages=CHAT["messages"])  # type: ignore[arg-type]
    assert raised.value.status_code == 502
    body = raised.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    row = gateway.rows(key, wait_for=1)[0]
    assert (row["status"], row["model"]) == (502, "dead-model")
    _alive(gateway)


def test_upstream_timeout_gives_504(gateway: Gateway, key: str) -> None:
    started = time.monotonic()
    response = _post(gateway, key, {**CHAT, "mock": {"stall-after": 0}})
    assert response.status_code == 504
    assert 1.9 < time.monotonic() - started < 5  # --read-timeout 2
    assert response.json()["error"]["code"] == "gateway_timeout"
    assert gateway.rows(key, wait_for=1)[0]["status"] == 504


def test_a_stalled_stream_ends_after_the_idle_timeout_with_504(gateway: Gateway, key: str) -> None:
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "stream": True, "mock": {"stall-after": 3}},
        headers={"authorization": f"Bearer {key}"},
        timeout=15,
    ) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    assert '"gateway_timeout"' in text  # an error event closes the stream
    row = gateway.rows(key, wait_for=1)[0]
    assert row["status"] == 504 and row["output_tokens"] == 3


def test_a_slow_stream_that_never_falls_silent_for_the_timeout_completes(
    gateway: Gateway, key: str
) -> None:
    # 6 gaps of 0.4 s: 2.4 s in all, longer than the 1 s idle timeout, never 1 s silent.
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "stream": True, "mock": {"chunks": 6, "chunk-delay-ms": 400}},
        headers={"authorization": f"Bearer {key}"},
        timeout=15,
    ) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    assert "gateway_timeout" not in text and text.rstrip().endswith("data: [DONE]")
    row = gateway.rows(key, wait_for=1)[0]
    assert row["status"] == 200 and row["output_tokens"] > 0


def test_an_upstream_that_drops_mid_stream_gives_502(gateway: Gateway, key: str) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    chunks = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model="gpt-4o", messages=CHAT["messages"], stream=True,  # type: ignore[arg-type]
            extra_body={"mock": {"disconnect-after": 4}},
        ):  # fmt: skip
            chunks.append(chunk)
    row = gateway.rows(key, wait_for=1)[0]
    assert row["status"] == 502 and row["output_tokens"] == 4
    _alive(gateway)


def test_a_client_that_disconnects_cancels_the_upstream_and_gets_a_499_row(
    gateway: Gateway, key: str
) -> None:
    cancelled = gateway.mock.stats()["requests_cancelled"]
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "stream": True, "mock": {"chunk-delay-ms": 100}},
        headers={"authorization": f"Bearer {key}"},
        timeout=15,
    ) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection
    row = gateway.rows(key, wait_for=1)[0]
    assert row["status"] == 499
    # No usage was reported: the provider may bill it all, so the reservation is charged.
    assert row["output_tokens"] == 1024 and row["input_tokens"] > 0
    deadline = time.monotonic() + 5
    while gateway.mock.stats()["requests_cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.mock.stats()["requests_cancelled"] > cancelled
    _alive(gateway)


def test_a_client_that_leaves_before_the_answer_gets_a_499_row(gateway: Gateway, key: str) -> None:
    payload = json.dumps({**CHAT, "mock": {"latency-ms": 1500}}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {key}\r\n".encode()
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        time.sleep(0.3)
    row = gateway.rows(key, wait_for=1)[0]
    assert row["status"] == 499 and row["output_tokens"] == 1024  # its reservation


def test_malformed_json_gets_400_and_oversized_bodies_413(gateway: Gateway, key: str) -> None:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    url = gateway.url + "/v1/chat/completions"
    response = httpx.post(url, content=b"{not json", headers=headers)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(url, content=b"[1, 2]", headers=headers)
    assert response.status_code == 400
    response = httpx.post(url, json={"messages": []}, headers=headers)
    assert response.status_code == 400 and "model" in response.json()["error"]["message"]
    big = {**CHAT, "padding": "x" * 70_000}
    response = httpx.post(url, json=big, headers=headers)
    assert response.status_code == 413
    anthropic_shape = httpx.post(
        gateway.url + "/v1/messages",
        content=b"{",
        headers={**headers, "anthropic-version": "2023-06-01"},
    ).json()
    assert anthropic_shape["type"] == "error"
    assert anthropic_shape["error"]["type"] == "invalid_request_error"
    _alive(gateway)


def test_an_upload_over_the_limit_without_a_length_gets_413_not_a_provider_error(
    gateway: Gateway, key: str
) -> None:
    cli(gateway.home, "providers", "update", "mock-openai", "--allow", "files")
    time.sleep(0.6)  # the server picks the change up within a second
    try:

        def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it early
            for _ in range(20):
                yield b"x" * 8192

        response = httpx.post(
            gateway.url + "/v1/files",
            content=chunks(),
            headers={"authorization": f"Bearer {key}", "content-type": "multipart/form-data"},
        )
        assert response.status_code == 413, response.text
        assert "too large: at most 64000 bytes" in response.json()["error"]["message"]
        assert gateway.rows(key, wait_for=1)[-1]["status"] == 413
    finally:
        cli(gateway.home, "providers", "update", "mock-openai", "--allow", "none")
    _alive(gateway)


def test_an_output_cap_beyond_any_model_gets_400(gateway: Gateway, key: str) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        for value in (10**19, 2**62, 100_000_001):
            response = _post(gateway, key, {**CHAT, field: value})
            assert response.status_code == 400, (field, value)
            assert "from 1 to 100000000" in response.json()["error"]["message"]
    assert _post(gateway, key, {**CHAT, "max_tokens": 100_000_000}).status_code == 200
    _alive(gateway)


def test_a_provider_429_on_messages_carries_anthropics_rate_limit_headers(
    gateway: Gateway,
) -> None:
    key = gateway.new_key("requests:100/1m")
    body = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"status": 429},
    }
    response = httpx.post(
        gateway.url + "/v1/messages",
        json=body,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 429
    assert response.headers["anthropic-ratelimit-requests-limit"] == "100"
    assert not any(name.startswith("x-ratelimit-") for name in response.headers)


def test_every_proxied_response_carries_rate_limit_headers(gateway: Gateway) -> None:
    key = gateway.new_key("requests:100/1m", "tokens:1M/1h")
    response = _post(gateway, key, CHAT)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "100"
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert "x-ratelimit-reset-requests" in response.headers


def test_a_deleted_key_is_refused_within_one_second(gateway: Gateway) -> None:
    key = gateway.new_key()
    assert _post(gateway, key, CHAT).status_code == 200
    cli(gateway.home, "keys", "delete", key[:16], "--yes")
    deleted_at = time.monotonic()
    while _post(gateway, key, CHAT).status_code == 200:
        assert time.monotonic() - deleted_at < 1.0, "still accepted a second after deletion"
        time.sleep(0.02)
    assert time.monotonic() - deleted_at < 1.0
    assert _post(gateway, key, CHAT).status_code == 401


def test_disabled_and_rotated_keys_are_refused_within_one_second(gateway: Gateway) -> None:
    key = gateway.new_key()
    cli(gateway.home, "keys", "disable", key[:16])
    changed = time.monotonic()
    while _post(gateway, key, CHAT).status_code != 401:
        assert time.monotonic() - changed < 1.0
        time.sleep(0.02)
    assert "disabled" in _post(gateway, key, CHAT).json()["error"]["message"]
    cli(gateway.home, "keys", "enable", key[:16])
    rotated = json.loads(cli(gateway.home, "keys", "rotate", key[:16], "--json"))["key"]
    changed = time.monotonic()
    while _post(gateway, key, CHAT).status_code != 401:
        assert time.monotonic() - changed < 1.0
        time.sleep(0.02)
    deadline = time.monotonic() + 1
    while _post(gateway, rotated, CHAT).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_flushes_every_row(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    try:
        key = gateway.new_key()
        with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=10) as client:
            for _ in range(30):
                assert (
                    client.post(gateway.url + "/v1/chat/completions", json=CHAT).status_code == 200
                )
        # uvicorn shuts down gracefully, then re-raises the signal as its exit status.
        assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        assert len(gateway.rows(key)) == 30
        gateway.start()
        with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=10) as client:
            for _ in range(5):
                assert (
                    client.post(gateway.url + "/v1/chat/completions", json=CHAT).status_code == 200
                )
        assert gateway.stop(signal.SIGINT) in (0, 130, -signal.SIGINT)
        assert "Traceback" not in gateway.output.read_text()
        assert len(gateway.rows(key)) == 35
    finally:
        if gateway.process is not None:
            gateway.stop()
        gateway.mock.stop()


def test_every_answer_finished_before_a_kill_9_has_its_row_after_the_restart(
    tmp_path: Path,
) -> None:
    gateway = start_gateway(tmp_path)
    try:
        key = gateway.new_key()
        finished, begun = asyncio.run(streams_until_killed(gateway, key))
        assert finished > 50, (finished, begun)
        gateway.start()  # its journal is written at once
        rows = gateway.rows(key, wait_for=finished, timeout=10)
        assert finished <= len(rows) <= begun
        # The dead process's journal is gone; the new one's alone is there.
        names = [path.name for path in (gateway.home / "journal").iterdir()]
        assert len(names) == 2 and names[0].split(".")[0] == names[1].split(".")[0], names
    finally:
        if gateway.process is not None:
            gateway.stop()
        gateway.mock.stop()
