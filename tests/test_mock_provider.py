"""The mock provider speaks OpenAI and Anthropic well enough for the official SDKs."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import anthropic
import httpx
import openai
import pytest

from opulon.mock_provider import MockConfig, MockProvider

CLAUDE = "claude-3-5-haiku-latest"
TIMEOUT = httpx.Timeout(5.0)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProvider]:
    with MockProvider() as provider:
        yield provider


@pytest.fixture
def fresh() -> Iterator[MockProvider]:
    """A provider of its own, for tests that read counters or change the configuration."""
    with MockProvider() as provider:
        yield provider


def oai(mock: MockProvider, api_key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=mock.url + "/v1", api_key=api_key, max_retries=0, timeout=5)


def ant(mock: MockProvider, api_key: str = "sk-ant-test") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock.url, api_key=api_key, max_retries=0, timeout=5)


def tokens(*texts: str) -> int:
    return max(1, len("\n".join(texts)) // 4)


def sse_events(lines: list[str]) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of a server-sent event stream."""
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, line[len("data: ") :]))
            name = None
    return events


def stream_lines(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout: httpx.Timeout = TIMEOUT,
) -> tuple[list[str], BaseException | None]:
    """POST and read a stream line by line; returns the lines and the error that ended it."""
    lines: list[str] = []
    with httpx.Client(timeout=timeout) as client:
        try:
            with client.stream("POST", url, json=body, headers=headers) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    lines.append(line)
        except httpx.HTTPError as exc:
            return lines, exc
    return lines, None


def wait_for(predicate: Callable[[], bool], seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def chat_body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


def claude_body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {
        "model": CLAUDE,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# OpenAI
# ---------------------------------------------------------------------------------------------


def test_chat_completion_echoes_and_counts_tokens(mock: MockProvider) -> None:
    system, user = "You are terse.", "hello there, how are you today?"
    raw = oai(mock).chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
    )
    assert raw.headers["x-request-id"].startswith("req_")
    completion = raw.parse()
    assert completion.model == "gpt-4o"
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == "Echo: " + user
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == tokens(system, user) == 11
    assert completion.usage.completion_tokens == 20
    assert completion.usage.total_tokens == 31


def test_short_answers_are_padded_to_the_chunk_count(mock: MockProvider) -> None:
    completion = oai(mock).chat.completions.create(
        model="some-unknown-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.model == "some-unknown-model"
    content = completion.choices[0].message.content
    assert content is not None
    assert content == "Echo: hi".ljust(20)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 20


def test_echo_uses_text_parts_and_is_cut_to_200_characters(mock: MockProvider) -> None:
    long_text = "x" * 500
    completion = oai(mock).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": [{"type": "text", "text": long_text}]}],
    )
    assert completion.choices[0].message.content == ("Echo: " + long_text)[:200]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 125


def test_chat_stream_with_include_usage(mock: MockProvider) -> None:
    text = "stream this answer please"
    stream = oai(mock).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "5"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    pieces = [p for p in pieces if p]
    assert len(pieces) == 5
    assert "".join(pieces) == "Echo: " + text
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (tokens(text), 5)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_include_usage_has_no_usage_chunk(mock: MockProvider) -> None:
    lines, error = stream_lines(
        mock.url + "/v1/chat/completions", chat_body(stream=True), {"x-mock-chunks": "3"}
    )
    assert error is None
    datas = [d for _, d in sse_events(lines)]
    assert datas[-1] == "[DONE]"
    payloads = [json.loads(d) for d in datas[:-1]]
    assert len(payloads) == 1 + 3 + 1
    assert all("usage" not in p and p["choices"] for p in payloads)


@pytest.mark.parametrize("chunks", [1, 3, 50])
def test_every_stream_piece_is_non_empty(mock: MockProvider, chunks: int) -> None:
    stream = oai(mock).chat.completions.create(
        **chat_body("abc"), stream=True, extra_headers={"x-mock-chunks": str(chunks)}
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices]
    content = [p for p in pieces[1:] if p is not None]
    assert len(content) == chunks
    assert all(content)
    assert "".join(content).rstrip() == "Echo: abc"


def test_chat_tools_non_stream_and_follow_up(mock: MockProvider) -> None:
    client = oai(mock)
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    completion = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert arguments == {"city": "mock", "unit": "celsius", "days": 1}
    assert completion.usage is not None
    assert completion.usage.completion_tokens == min(20, len(call.function.arguments))

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    follow_up = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[WEATHER_TOOL]
    )
    assert follow_up.choices[0].finish_reason == "stop"
    assert follow_up.choices[0].message.content == "Echo: weather in Paris?"


def test_chat_tools_stream(mock: MockProvider) -> None:
    stream = oai(mock).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "4"},
    )
    chunks = list(stream)
    first = chunks[0].choices[0].delta.tool_calls
    assert first is not None
    assert first[0].id is not None
    assert first[0].function is not None
    assert first[0].function.name == "get_weather"
    parts: list[str] = []
    for chunk in chunks[1:]:
        if chunk.choices and chunk.choices[0].delta.tool_calls:
            function = chunk.choices[0].delta.tool_calls[0].function
            assert function is not None
            parts.append(function.arguments or "")
    assert len(parts) == 4
    assert json.loads("".join(parts))["city"] == "mock"
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_completions_plain_and_stream(mock: MockProvider) -> None:
    client = oai(mock)
    prompt = "Say something nice"
    completion = client.completions.create(model="gpt-4o-mini", prompt=prompt)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "Echo: " + prompt
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 20)

    stream = client.completions.create(
        model="gpt-4o-mini",
        prompt=prompt,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "6"},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) == 6
    assert "".join(texts) == "Echo: " + prompt
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_embeddings(mock: MockProvider) -> None:
    client = oai(mock)
    packed = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta gamma"])
    assert len(packed.data) == 2
    assert [d.index for d in packed.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in packed.data)
    assert packed.data[0].embedding != packed.data[1].embedding
    assert math.isclose(sum(v * v for v in packed.data[0].embedding), 1.0, rel_tol=1e-5)
    assert packed.usage.prompt_tokens == packed.usage.total_tokens == tokens("alpha", "beta gamma")

    floats = client.embeddings.create(
        model="text-embedding-3-small", input="alpha", encoding_format="float"
    )
    assert floats.data[0].embedding == packed.data[0].embedding
    assert floats.usage.prompt_tokens == 1

    raw = httpx.post(
        mock.url + "/v1/embeddings",
        json={"model": "m", "input": "alpha", "encoding_format": "base64"},
        timeout=TIMEOUT,
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(decoded) == floats.data[0].embedding


def test_responses_plain(mock: MockProvider) -> None:
    response = oai(mock).responses.create(
        model="gpt-4o", instructions="Be brief.", input="tell me about responses"
    )
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "gpt-4o"
    assert response.output_text == "Echo: tell me about responses"
    assert response.usage is not None
    assert response.usage.input_tokens == tokens("Be brief.", "tell me about responses")
    assert response.usage.output_tokens == 20
    assert response.usage.total_tokens == response.usage.input_tokens + 20
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0


def test_responses_stream_events(mock: MockProvider) -> None:
    client = oai(mock)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "stream me"}]}]
    events = list(
        client.responses.create(
            model="gpt-4o", input=items, stream=True, extra_headers={"x-mock-chunks": "3"}
        )
    )
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Echo: stream me"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 3

    with client.responses.stream(model="gpt-4o", input="helper stream") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Echo: helper stream".ljust(20)
    assert final.usage is not None
    assert final.usage.input_tokens == tokens("helper stream")

    lines, error = stream_lines(
        mock.url + "/v1/responses", {"model": "m", "input": "x", "stream": True}, {}
    )
    assert error is None
    for name, data in sse_events(lines):
        assert name == json.loads(data)["type"]


def test_models_openai_and_anthropic(mock: MockProvider) -> None:
    expected = list(MockConfig().models)
    assert [m.id for m in oai(mock).models.list()] == expected
    assert [m.id for m in ant(mock).models.list()] == expected
    assert oai(mock).models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        oai(mock).models.retrieve("no-such-model")


# ---------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------


def test_messages_plain(mock: MockProvider) -> None:
    raw = ant(mock).messages.with_raw_response.create(
        model=CLAUDE,
        max_tokens=100,
        system="You are a helpful assistant.",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hello claude, how are you?"}]}
        ],
    )
    assert raw.headers["request-id"].startswith("req_")
    message = raw.parse()
    assert message.type == "message"
    assert message.model == CLAUDE
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text == "Echo: hello claude, how are you?"
    assert message.usage.input_tokens == tokens(
        "You are a helpful assistant.", "hello claude, how are you?"
    )
    assert message.usage.output_tokens == 20


def test_messages_stream_events_and_final_usage(mock: MockProvider) -> None:
    # The SDK hides ping events, so the wire order is checked on the raw stream.
    lines, error = stream_lines(
        mock.url + "/v1/messages",
        claude_body("stream, claude", stream=True),
        {"x-mock-chunks": "4"},
    )
    assert error is None
    raw = sse_events(lines)
    assert [name for name, _ in raw] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(json.loads(data)["type"] == name for name, data in raw)

    client = ant(mock)
    events = list(
        client.messages.create(
            **claude_body("stream, claude"), stream=True, extra_headers={"x-mock-chunks": "4"}
        )
    )
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == tokens("stream, claude")
    assert start.message.usage.output_tokens == 1
    assert delta.type == "message_delta"
    assert delta.usage.output_tokens == 4

    with client.messages.stream(**claude_body("final usage please")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: final usage please"
    assert final.usage.input_tokens == tokens("final usage please")
    assert final.usage.output_tokens == 20
    assert final.stop_reason == "end_turn"


def test_messages_tool_use(mock: MockProvider) -> None:
    tool: dict[str, Any] = {
        "name": "lookup",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
    client = ant(mock)
    message = client.messages.create(**claude_body("find it"), tools=[tool])
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("lookup", {"query": "mock"})
    with client.messages.stream(**claude_body("find it"), tools=[tool]) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"query": "mock"}


def test_count_tokens_matches_messages(mock: MockProvider) -> None:
    client = ant(mock)
    body = claude_body("count these tokens, please, all of them")
    counted = client.messages.count_tokens(
        model=CLAUDE, system="sys prompt", messages=body["messages"]
    )
    message = client.messages.create(**body, system="sys prompt")
    assert counted.input_tokens == message.usage.input_tokens
    assert counted.input_tokens == tokens("sys prompt", "count these tokens, please, all of them")


# ---------------------------------------------------------------------------------------------
# Auth, errors, other paths
# ---------------------------------------------------------------------------------------------


def test_api_key_is_checked_per_api_style() -> None:
    with MockProvider(MockConfig(api_key="secret")) as mock:
        assert oai(mock, "secret").models.list().data
        assert ant(mock, "secret").messages.create(**claude_body()).content

        with pytest.raises(openai.AuthenticationError) as oai_error:
            oai(mock, "wrong").chat.completions.create(**chat_body())
        assert oai_error.value.status_code == 401
        assert oai_error.value.code == "invalid_api_key"
        with pytest.raises(anthropic.AuthenticationError) as ant_error:
            ant(mock, "wrong").messages.create(**claude_body())
        body = ant_error.value.body
        assert isinstance(body, dict)
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"

        # The OpenAI style wants a bearer token; the Anthropic style takes an x-api-key header
        # (or a bearer token, which the Anthropic SDK sends).
        with httpx.Client(timeout=TIMEOUT) as client:
            swapped = client.post(
                mock.url + "/v1/chat/completions", json=chat_body(), headers={"x-api-key": "secret"}
            )
            by_header = client.post(
                mock.url + "/v1/messages", json=claude_body(), headers={"x-api-key": "secret"}
            )
            missing = client.post(mock.url + "/v1/messages/count_tokens", json=claude_body())
        assert swapped.status_code == 401
        assert swapped.json()["error"]["code"] == "invalid_api_key"
        assert by_header.status_code == 200
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert mock.stats()["auth_failures"] == 4


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


def test_bad_requests_get_400(mock: MockProvider) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        bad_header = client.post(
            mock.url + "/v1/chat/completions", json=chat_body(), headers={"x-mock-chunks": "0"}
        )
        no_model = client.post(mock.url + "/v1/messages", json={"messages": []})
        not_json = client.post(mock.url + "/v1/chat/completions", content=b"{nope")
    assert bad_header.status_code == 400
    assert "x-mock-chunks" in bad_header.json()["error"]["message"]
    assert no_model.status_code == 400
    assert no_model.json()["error"]["type"] == "invalid_request_error"
    assert not_json.status_code == 400


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
# Counters, fast mode, serving
# ---------------------------------------------------------------------------------------------


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
        MockConfig(chunks=0)
    with pytest.raises(ValueError):
        MockConfig(error_status=200)
    with pytest.raises(ValueError):
        MockProvider(host="0.0.0.0")


def test_module_runs_as_a_command() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "opulon.mock_provider", "--port", "0", "--fast"],
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
