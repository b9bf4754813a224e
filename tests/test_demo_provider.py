"""The demo provider speaks OpenAI and Anthropic well enough for the official SDKs."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from provider_helpers import (
    CLAUDE,
    TIMEOUT,
    WEATHER_TOOL,
    ant,
    chat_body,
    claude_body,
    oai,
    sse_events,
    stream_lines,
    tokens,
)

from opulon.demo_provider import DemoConfig, DemoProvider


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoProvider]:
    with DemoProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def chunked() -> Iterator[Callable[[int], DemoProvider]]:
    """Providers that split every answer into a given number of chunks, started once each."""
    with contextlib.ExitStack() as stack:
        started: dict[int, DemoProvider] = {}

        def provider(chunks: int) -> DemoProvider:
            if chunks not in started:
                started[chunks] = stack.enter_context(DemoProvider(DemoConfig(chunks=chunks)))
            return started[chunks]

        yield provider


# ---------------------------------------------------------------------------------------------
# OpenAI
# ---------------------------------------------------------------------------------------------


def test_chat_completion_echoes_and_counts_tokens(demo: DemoProvider) -> None:
    system, user = "You are terse.", "hello there, how are you today?"
    raw = oai(demo).chat.completions.with_raw_response.create(
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


def test_short_answers_are_padded_to_the_chunk_count(demo: DemoProvider) -> None:
    completion = oai(demo).chat.completions.create(
        model="some-unknown-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.model == "some-unknown-model"
    content = completion.choices[0].message.content
    assert content is not None
    assert content == "Echo: hi".ljust(20)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 20


def test_echo_uses_text_parts_and_is_cut_to_200_characters(demo: DemoProvider) -> None:
    long_text = "x" * 500
    completion = oai(demo).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": [{"type": "text", "text": long_text}]}],
    )
    assert completion.choices[0].message.content == ("Echo: " + long_text)[:200]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 125


def test_chat_stream_with_include_usage(chunked: Callable[[int], DemoProvider]) -> None:
    text = "stream this answer please"
    stream = oai(chunked(5)).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
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


def test_chat_stream_without_include_usage_has_no_usage_chunk(
    chunked: Callable[[int], DemoProvider],
) -> None:
    lines, error = stream_lines(chunked(3).url + "/v1/chat/completions", chat_body(stream=True))
    assert error is None
    datas = [d for _, d in sse_events(lines)]
    assert datas[-1] == "[DONE]"
    payloads = [json.loads(d) for d in datas[:-1]]
    assert len(payloads) == 1 + 3 + 1
    assert all("usage" not in p and p["choices"] for p in payloads)


@pytest.mark.parametrize("chunks", [1, 3, 50])
def test_every_stream_piece_is_non_empty(
    chunked: Callable[[int], DemoProvider], chunks: int
) -> None:
    stream = oai(chunked(chunks)).chat.completions.create(**chat_body("abc"), stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices]
    content = [p for p in pieces[1:] if p is not None]
    assert len(content) == chunks
    assert all(content)
    assert "".join(content).rstrip() == "Echo: abc"


def test_chat_tools_non_stream_and_follow_up(demo: DemoProvider) -> None:
    client = oai(demo)
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


def test_chat_tools_stream(chunked: Callable[[int], DemoProvider]) -> None:
    stream = oai(chunked(4)).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
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


def test_completions_plain_and_stream(
    demo: DemoProvider, chunked: Callable[[int], DemoProvider]
) -> None:
    client = oai(demo)
    prompt = "Say something nice"
    completion = client.completions.create(model="gpt-4o-mini", prompt=prompt)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "Echo: " + prompt
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 20)

    stream = oai(chunked(6)).completions.create(
        model="gpt-4o-mini",
        prompt=prompt,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) == 6
    assert "".join(texts) == "Echo: " + prompt
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_embeddings(demo: DemoProvider) -> None:
    client = oai(demo)
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
        demo.url + "/v1/embeddings",
        json={"model": "m", "input": "alpha", "encoding_format": "base64"},
        timeout=TIMEOUT,
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(decoded) == floats.data[0].embedding


def test_responses_plain(demo: DemoProvider) -> None:
    response = oai(demo).responses.create(
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


def test_responses_stream_events(
    demo: DemoProvider, chunked: Callable[[int], DemoProvider]
) -> None:
    client = oai(demo)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "stream me"}]}]
    events = list(oai(chunked(3)).responses.create(model="gpt-4o", input=items, stream=True))
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
        demo.url + "/v1/responses", {"model": "m", "input": "x", "stream": True}
    )
    assert error is None
    for name, data in sse_events(lines):
        assert name == json.loads(data)["type"]


def test_models_openai_and_anthropic(demo: DemoProvider) -> None:
    expected = list(DemoConfig().models)
    assert [m.id for m in oai(demo).models.list()] == expected
    assert [m.id for m in ant(demo).models.list()] == expected
    assert oai(demo).models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        oai(demo).models.retrieve("no-such-model")


# ---------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------


def test_messages_plain(demo: DemoProvider) -> None:
    raw = ant(demo).messages.with_raw_response.create(
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


def test_messages_stream_events_and_final_usage(
    demo: DemoProvider, chunked: Callable[[int], DemoProvider]
) -> None:
    # The SDK hides ping events, so the wire order is checked on the raw stream.
    lines, error = stream_lines(
        chunked(4).url + "/v1/messages", claude_body("stream, claude", stream=True)
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

    events = list(ant(chunked(4)).messages.create(**claude_body("stream, claude"), stream=True))
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == tokens("stream, claude")
    assert start.message.usage.output_tokens == 1
    assert delta.type == "message_delta"
    assert delta.usage.output_tokens == 4

    with ant(demo).messages.stream(**claude_body("final usage please")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: final usage please"
    assert final.usage.input_tokens == tokens("final usage please")
    assert final.usage.output_tokens == 20
    assert final.stop_reason == "end_turn"


def test_messages_tool_use(demo: DemoProvider) -> None:
    tool: dict[str, Any] = {
        "name": "lookup",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
    client = ant(demo)
    message = client.messages.create(**claude_body("find it"), tools=[tool])
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("lookup", {"query": "mock"})
    with client.messages.stream(**claude_body("find it"), tools=[tool]) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"query": "mock"}


def test_count_tokens_matches_messages(demo: DemoProvider) -> None:
    client = ant(demo)
    body = claude_body("count these tokens, please, all of them")
    counted = client.messages.count_tokens(
        model=CLAUDE, system="sys prompt", messages=body["messages"]
    )
    message = client.messages.create(**body, system="sys prompt")
    assert counted.input_tokens == message.usage.input_tokens
    assert counted.input_tokens == tokens("sys prompt", "count these tokens, please, all of them")


# ---------------------------------------------------------------------------------------------
# Auth, errors, delays, serving
# ---------------------------------------------------------------------------------------------


def test_api_key_is_checked_per_api_style() -> None:
    with DemoProvider(DemoConfig(api_key="secret")) as demo:
        assert oai(demo, "secret").models.list().data
        assert ant(demo, "secret").messages.create(**claude_body()).content

        with pytest.raises(openai.AuthenticationError) as oai_error:
            oai(demo, "wrong").chat.completions.create(**chat_body())
        assert oai_error.value.status_code == 401
        assert oai_error.value.code == "invalid_api_key"
        with pytest.raises(anthropic.AuthenticationError) as ant_error:
            ant(demo, "wrong").messages.create(**claude_body())
        body = ant_error.value.body
        assert isinstance(body, dict)
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"

        # The OpenAI style wants a bearer token; the Anthropic style takes an x-api-key header
        # (or a bearer token, which the Anthropic SDK sends).
        with httpx.Client(timeout=TIMEOUT) as client:
            swapped = client.post(
                demo.url + "/v1/chat/completions", json=chat_body(), headers={"x-api-key": "secret"}
            )
            by_header = client.post(
                demo.url + "/v1/messages", json=claude_body(), headers={"x-api-key": "secret"}
            )
            missing = client.post(demo.url + "/v1/messages/count_tokens", json=claude_body())
        assert swapped.status_code == 401
        assert swapped.json()["error"]["code"] == "invalid_api_key"
        assert by_header.status_code == 200
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"


def test_bad_requests_get_400(demo: DemoProvider) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        no_model = client.post(demo.url + "/v1/messages", json={"messages": []})
        not_json = client.post(demo.url + "/v1/chat/completions", content=b"{nope")
        not_an_object = client.post(demo.url + "/v1/chat/completions", json=[1])
    assert no_model.status_code == 400
    assert no_model.json()["error"]["type"] == "invalid_request_error"
    assert not_json.status_code == 400
    assert not_json.json()["error"]["message"] == "The request body is not valid JSON."
    assert not_an_object.status_code == 400


def test_chunk_delay_spreads_the_stream() -> None:
    arrivals: list[float] = []
    with (
        DemoProvider(DemoConfig(chunks=4, chunk_delay_ms=100)) as demo,
        httpx.Client(timeout=TIMEOUT) as client,
        client.stream(
            "POST", demo.url + "/v1/chat/completions", json=chat_body(stream=True)
        ) as response,
    ):
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] >= 0.25


def test_config_and_host_are_validated() -> None:
    with pytest.raises(ValueError):
        DemoConfig(chunks=0)
    with pytest.raises(ValueError):
        DemoConfig(chunk_delay_ms=-1)
    with pytest.raises(ValueError):
        DemoProvider(host="0.0.0.0")


def test_module_runs_as_a_command() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "opulon.demo_provider", "--port", "0", "--api-key", "k"],
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
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=5)
        completion = client.chat.completions.create(**chat_body("hi there"))
        assert completion.choices[0].message.content == "Echo: hi there".ljust(20)
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    # No access log: nothing else is printed, and client addresses never are.
    assert stdout == ""
    assert "127.0.0.1" not in stderr
