"""The tests' mock provider: the demo provider's answers, with faults, counters and a record."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from mock_provider import MockConfig, MockProvider
from provider_helpers import (
    TIMEOUT,
    ant,
    chat_body,
    claude_body,
    oai,
    stream_lines,
    wait_for,
)

from opulon.demo_provider import DemoProvider

MOCK_SCRIPT = Path(__file__).with_name("mock_provider.py")


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProvider]:
    with MockProvider() as provider:
        yield provider


@pytest.fixture
def fresh() -> Iterator[MockProvider]:
    """A provider of its own, for tests that read counters or change the configuration."""
    with MockProvider() as provider:
        yield provider


# ---------------------------------------------------------------------------------------------
# The demo provider's answers, with the account headers of a real provider
# ---------------------------------------------------------------------------------------------


def _without_ids(payload: Any) -> Any:
    if isinstance(payload, dict):
        return {
            k: _without_ids(v)
            for k, v in payload.items()
            if k not in ("id", "created", "created_at")
        }
    if isinstance(payload, list):
        return [_without_ids(v) for v in payload]
    return payload


@pytest.mark.parametrize(
    ("path", "body", "headers", "account_header"),
    [
        ("/v1/chat/completions", chat_body("same answer"), {}, "openai-organization"),
        ("/v1/embeddings", {"model": "m", "input": ["a", "b"]}, {}, "openai-organization"),
        ("/v1/messages", claude_body("same answer"), {}, "anthropic-organization-id"),
        ("/v1/models", None, {"anthropic-version": "2023-06-01"}, "anthropic-organization-id"),
    ],
)
def test_answers_are_the_demo_providers(
    mock: MockProvider,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    account_header: str,
) -> None:
    with DemoProvider() as demo, httpx.Client(timeout=TIMEOUT, headers=headers) as client:
        answers = [
            client.post(p.url + path, json=body) if body else client.get(p.url + path)
            for p in (demo, mock)
        ]
    assert [a.status_code for a in answers] == [200, 200]
    assert _without_ids(answers[1].json()) == _without_ids(answers[0].json())
    # A real provider names the operator's account and sets cookies; the demo does not.
    for name in (account_header, "set-cookie"):
        assert name in answers[1].headers and name not in answers[0].headers


# ---------------------------------------------------------------------------------------------
# Auth, errors, other paths
# ---------------------------------------------------------------------------------------------


def test_refused_api_keys_are_counted() -> None:
    with MockProvider(MockConfig(api_key="secret")) as mock:
        assert oai(mock, "secret").models.list().data
        with pytest.raises(openai.AuthenticationError):
            oai(mock, "wrong").chat.completions.create(**chat_body())
        with pytest.raises(anthropic.AuthenticationError):
            ant(mock, "wrong").messages.create(**claude_body())
        missing = httpx.post(mock.url + "/v1/files", content=b"x" * 10, timeout=TIMEOUT)
        assert missing.status_code == 401
        assert mock.stats()["auth_failures"] == 3


@pytest.mark.parametrize("status", [400, 429, 500])
def test_error_status_header_uses_each_api_shape(mock: MockProvider, status: int) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        headers = {"x-mock-status": str(status)}
        chat = client.post(mock.url + "/v1/chat/completions", json=chat_body(), headers=headers)
        messages = client.post(mock.url + "/v1/messages", json=claude_body(), headers=headers)
    assert chat.status_code == messages.status_code == status
    error = chat.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (
        error["type"]
        == {400: "invalid_request_error", 429: "requests", 500: "server_error"}[status]
    )
    body = messages.json()
    assert body["type"] == "error"
    assert (
        body["error"]["type"]
        == {
            400: "invalid_request_error",
            429: "rate_limit_error",
            500: "api_error",
        }[status]
    )
    assert ("retry-after" in chat.headers) == (status == 429)


def test_sdks_raise_their_error_types(mock: MockProvider) -> None:
    with pytest.raises(openai.RateLimitError):
        oai(mock).chat.completions.create(**chat_body(), extra_headers={"x-mock-status": "429"})
    with pytest.raises(anthropic.InternalServerError):
        ant(mock).messages.create(**claude_body(), extra_headers={"x-mock-status": "500"})


def test_server_wide_config_and_header_override(fresh: MockProvider) -> None:
    fresh.config = replace(fresh.config, error_status=503, reply="fixed reply")
    with httpx.Client(timeout=TIMEOUT) as client:
        failing = client.post(fresh.url + "/v1/chat/completions", json=chat_body())
        assert failing.status_code == 503
        ok = client.post(
            fresh.url + "/v1/chat/completions",
            json=chat_body(),
            headers={"x-mock-status": "none", "x-mock-chunks": "2"},
        )
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == "fixed reply"
        replied = client.post(
            fresh.url + "/v1/messages",
            json=claude_body(),
            headers={"x-mock-status": "none", "x-mock-reply": "from a header"},
        )
        assert replied.json()["content"][0]["text"] == "from a header".ljust(20)


def test_bad_switches_get_400(mock: MockProvider) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        bad_header = client.post(
            mock.url + "/v1/chat/completions", json=chat_body(), headers={"x-mock-chunks": "0"}
        )
        bad_body = client.post(
            mock.url + "/v1/messages", json={**claude_body(), "mock": {"status": 200}}
        )
        not_an_object = client.post(
            mock.url + "/v1/chat/completions", json={**chat_body(), "mock": "fail"}
        )
    assert bad_header.status_code == 400
    assert "x-mock-chunks" in bad_header.json()["error"]["message"]
    assert bad_body.status_code == 400
    assert bad_body.json()["error"]["type"] == "invalid_request_error"
    assert not_an_object.status_code == 400


def test_other_paths_read_the_whole_body(mock: MockProvider) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        request = client.build_request(
            "POST",
            mock.url + "/v1/files",
            files={"file": ("data.jsonl", b"z" * 300_000)},
            data={"purpose": "batch"},
        )
        size = len(request.read())
        upload = client.send(request)
        image = client.post(mock.url + "/v1/images/generations", json={"prompt": "a cat"})
    assert upload.status_code == 200
    assert upload.json() == {
        "object": "mock",
        "path": "/v1/files",
        "raw_path": "/v1/files",
        "bytes_received": size,
    }
    assert image.json()["path"] == "/v1/images/generations"
    assert "usage" not in image.json()


# ---------------------------------------------------------------------------------------------
# Timing faults
# ---------------------------------------------------------------------------------------------


def test_latency(mock: MockProvider) -> None:
    started = time.monotonic()
    response = httpx.post(
        mock.url + "/v1/chat/completions",
        json=chat_body(),
        headers={"x-mock-latency-ms": "300"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_chunk_delay_spreads_the_stream(mock: MockProvider) -> None:
    arrivals: list[float] = []
    with (
        httpx.Client(timeout=TIMEOUT) as client,
        client.stream(
            "POST",
            mock.url + "/v1/chat/completions",
            json=chat_body(stream=True),
            headers={"x-mock-chunks": "4", "x-mock-chunk-delay-ms": "100"},
        ) as response,
    ):
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] >= 0.25


@pytest.mark.parametrize(
    ("path", "body", "marker"),
    [
        ("/v1/chat/completions", chat_body("disconnect me please", stream=True), '"content":"'),
        ("/v1/messages", claude_body("disconnect me please", stream=True), "text_delta"),
        ("/v1/responses", {"model": "m", "input": "x", "stream": True}, "output_text.delta"),
    ],
)
def test_disconnect_after_cuts_the_stream(
    fresh: MockProvider, path: str, body: dict[str, Any], marker: str
) -> None:
    lines, error = stream_lines(fresh.url + path, body, {"x-mock-disconnect-after": "3"})
    assert isinstance(error, httpx.RemoteProtocolError)
    content = [
        line
        for line in lines
        if line.startswith("data: ") and marker in line and '"content":""' not in line
    ]
    assert len(content) == 3
    assert not any("[DONE]" in line or "message_stop" in line for line in lines)
    assert not any("response.completed" in line for line in lines)
    assert wait_for(lambda: fresh.stats()["requests_aborted"] == 1)


def test_disconnect_before_a_non_stream_response(fresh: MockProvider) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(
            fresh.url + "/v1/chat/completions",
            json=chat_body(),
            headers={"x-mock-disconnect-after": "0"},
            timeout=TIMEOUT,
        )


def test_stall_after_hangs_until_the_client_leaves(fresh: MockProvider) -> None:
    short = httpx.Timeout(5.0, read=0.5)
    started = time.monotonic()
    lines, error = stream_lines(
        fresh.url + "/v1/chat/completions",
        chat_body("stall", stream=True),
        {"x-mock-stall-after": "2"},
        timeout=short,
    )
    assert isinstance(error, httpx.ReadTimeout)
    assert time.monotonic() - started < 3
    content = [line for line in lines if '"content":"' in line and '"content":""' not in line]
    assert len(content) == 2
    assert wait_for(lambda: fresh.stats()["requests_cancelled"] == 1)

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            fresh.url + "/v1/messages",
            json=claude_body(),
            headers={"x-mock-stall-after": "0"},
            timeout=short,
        )
    assert wait_for(lambda: fresh.stats()["requests_cancelled"] == 2)


# ---------------------------------------------------------------------------------------------
# Recording, counters, fast mode, serving
# ---------------------------------------------------------------------------------------------


def test_record_keeps_what_was_received() -> None:
    with MockProvider(MockConfig(record=True)) as mock:
        httpx.post(
            mock.url + "/v1/chat/completions?beta=true",
            content=b'{"model": "m", "messages": []}',
            headers={"x-trace": "t1"},
            timeout=TIMEOUT,
        )
        httpx.post(mock.url + "/v1/files", content=b"raw bytes", timeout=TIMEOUT)
        first, second = mock.received()
    assert (first.method, first.raw_path) == ("POST", "/v1/chat/completions?beta=true")
    assert ("x-trace", "t1") in first.headers
    assert first.body == b'{"model": "m", "messages": []}'
    assert (second.raw_path, second.body) == ("/v1/files", b"raw bytes")
    with MockProvider() as mock:
        httpx.post(mock.url + "/v1/chat/completions", json=chat_body(), timeout=TIMEOUT)
        assert mock.received() == []


def test_stats_counters_and_reset(fresh: MockProvider) -> None:
    client = oai(fresh)
    client.chat.completions.create(**chat_body())
    list(client.chat.completions.create(**chat_body(), stream=True))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**chat_body(), extra_headers={"x-mock-status": "500"})

    # A client that goes away in the middle of a slow stream.
    def leave_early() -> None:
        with (
            httpx.Client(timeout=TIMEOUT) as http,
            http.stream(
                "POST",
                fresh.url + "/v1/chat/completions",
                json=chat_body(stream=True),
                headers={"x-mock-chunk-delay-ms": "200"},
            ) as response,
        ):
            next(response.iter_lines())

    worker = threading.Thread(target=leave_early)
    worker.start()
    worker.join(5)
    assert not worker.is_alive()
    assert wait_for(lambda: fresh.stats()["requests_cancelled"] == 1)

    expected = {
        "requests_started": 4,
        "requests_completed": 3,
        "requests_cancelled": 1,
        "requests_aborted": 0,
        "auth_failures": 0,
    }
    assert wait_for(lambda: fresh.stats() == expected)
    assert httpx.get(fresh.url + "/_mock/stats", timeout=TIMEOUT).json() == expected
    reset = httpx.post(fresh.url + "/_mock/reset", timeout=TIMEOUT)
    assert reset.status_code == 200
    assert set(fresh.stats().values()) == {0}


def test_fast_mode_answers_with_a_fixed_body() -> None:
    with MockProvider(MockConfig(fast=True, chunks=5)) as mock:
        with httpx.Client(timeout=TIMEOUT) as client:
            url = mock.url + "/v1/chat/completions"
            first = client.post(url, json=chat_body("one"))
            second = client.post(url, json=chat_body("two", model="gpt-4o-mini"))
            overridden = client.post(url, json=chat_body("three"), headers={"x-mock-chunks": "2"})
        assert first.content == second.content
        assert first.json()["model"] == "mock-fast"
        assert overridden.json()["model"] == "gpt-4o"
        completion = oai(mock).chat.completions.create(**chat_body())
        assert completion.model == "mock-fast"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 5
        streamed = list(oai(mock).chat.completions.create(**chat_body("s"), stream=True))
        assert streamed[0].model == "gpt-4o"
        # A stream's handler finishes just after the client has read the last byte.
        assert wait_for(lambda: mock.stats()["requests_completed"] == 5)


def test_config_and_host_are_validated() -> None:
    with pytest.raises(ValueError):
        MockConfig(chunks=0)  # the demo provider's checks hold
    with pytest.raises(ValueError):
        MockConfig(latency_ms=-1)
    with pytest.raises(ValueError):
        MockConfig(error_status=200)
    with pytest.raises(ValueError):
        MockProvider(host="0.0.0.0")


def test_script_runs_as_a_command() -> None:
    process = subprocess.Popen(
        [sys.executable, str(MOCK_SCRIPT), "--port", "0", "--fast"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(10)
        assert lines
        assert lines[0].startswith("Opulon mock provider listening on http://127.0.0.1:")
        url = lines[0].split()[-1]
        response = httpx.post(url + "/v1/chat/completions", json=chat_body(), timeout=TIMEOUT)
        assert response.json()["model"] == "mock-fast"
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    # No access log: nothing else is printed, and client addresses never are.
    assert stdout == ""
    assert "127.0.0.1" not in stderr
