"""The official SDKs against a live ``opulon serve`` in front of the mock provider."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gateway_helpers import Gateway, start_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "What is a gateway?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("gw"))
    gw.create_key("main")
    gw.create_key("narrow", "--models", "gpt-4o-mini")
    yield gw
    gw.stop()
    gw.mock.stop()


@pytest.fixture
def key(gateway: Gateway) -> str:
    """A key of this test's own, so its usage rows are its own."""
    return gateway.new_key()


@pytest.fixture
def oai(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture
def direct() -> Any:
    def make(gateway: Gateway) -> openai.OpenAI:
        from gateway_helpers import UPSTREAM_KEY

        return openai.OpenAI(base_url=gateway.mock.url + "/v1", api_key=UPSTREAM_KEY, max_retries=0)

    return make


@pytest.fixture
def claude(gateway: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)


def _only_row(gateway: Gateway, key: str) -> dict[str, Any]:
    rows = gateway.rows(key, wait_for=1)
    assert len(rows) == 1
    return rows[0]


def _strip_ids(chunk: Any) -> Any:
    data = chunk.model_dump()
    for name in ("id", "created", "system_fingerprint"):
        data.pop(name, None)
    return data


def test_chat_plain_records_model_status_and_tokens(
    gateway: Gateway, oai: openai.OpenAI, key: str
) -> None:
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content.strip() == "Echo: What is a gateway?"
    row = _only_row(gateway, key)
    assert reply.usage is not None
    assert (row["model"], row["status"]) == ("gpt-4o-mini", 200)
    assert (row["input_tokens"], row["output_tokens"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert row["latency_ms"] > 0 and row["key_prefix"] == key[:16]


def test_chat_stream_without_include_usage_equals_the_provider_stream(
    gateway: Gateway, oai: openai.OpenAI, direct: Any, key: str
) -> None:
    via_gateway = list(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    straight = list(
        direct(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    )
    assert [_strip_ids(c) for c in via_gateway] == [_strip_ids(c) for c in straight]
    assert all(chunk.usage is None for chunk in via_gateway)  # the added usage chunk was stripped
    row = _only_row(gateway, key)
    assert row["output_tokens"] == 20 and row["input_tokens"] > 0  # read from the stripped chunk


def test_chat_stream_with_include_usage_keeps_the_usage_chunk(
    gateway: Gateway, oai: openai.OpenAI, direct: Any, key: str
) -> None:
    kwargs: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "stream": True,
                              "stream_options": {"include_usage": True}}  # fmt: skip
    via_gateway = list(oai.chat.completions.create(**kwargs))
    straight = list(direct(gateway).chat.completions.create(**kwargs))
    assert [_strip_ids(c) for c in via_gateway] == [_strip_ids(c) for c in straight]
    usage = via_gateway[-1].usage
    assert usage is not None and via_gateway[-1].choices == []
    row = _only_row(gateway, key)
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_chat_with_tools(gateway: Gateway, oai: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    reply = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=tools)
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    streamed = list(
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=tools, stream=True)
    )
    names = [
        tc.function.name
        for c in streamed if c.choices
        for tc in (c.choices[0].delta.tool_calls or []) if tc.function and tc.function.name
    ]  # fmt: skip
    assert names == ["get_weather"]


def test_completions_plain_and_streaming(gateway: Gateway, oai: openai.OpenAI, key: str) -> None:
    reply = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=5)
    assert reply.choices[0].text.strip() == "Echo: Say hi"
    chunks = list(
        oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip() == "Echo: Say hi"
    rows = gateway.rows(key, wait_for=2)
    assert [r["output_tokens"] for r in rows] == [20, 20]


def test_embeddings(gateway: Gateway, oai: openai.OpenAI, key: str) -> None:
    reply = oai.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 8
    row = _only_row(gateway, key)
    assert row["input_tokens"] == reply.usage.prompt_tokens and row["output_tokens"] == 0


def test_responses_plain_and_streaming(gateway: Gateway, oai: openai.OpenAI, key: str) -> None:
    reply = oai.responses.create(model="gpt-4o", input="Describe yourself")
    assert reply.output_text.strip() == "Echo: Describe yourself"
    events = list(oai.responses.create(model="gpt-4o", input="Describe yourself", stream=True))
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.usage is not None
    rows = gateway.rows(key, wait_for=2)
    assert reply.usage is not None
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (
        reply.usage.input_tokens,
        reply.usage.output_tokens,
    )
    usage = completed[0].response.usage
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )


def test_models_lists_what_this_key_may_use(gateway: Gateway, oai: openai.OpenAI) -> None:
    ids = {m.id for m in oai.models.list()}
    assert {"gpt-4o-mini", "gpt-4o"} <= ids
    assert not any(m.startswith("claude") for m in ids)  # Anthropic's are for Anthropic clients
    narrow = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=gateway.keys["narrow"], max_retries=0
    )
    assert [m.id for m in narrow.models.list()] == ["gpt-4o-mini"]
    assert oai.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        narrow.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("claude-sonnet-4-5")
    assert oai.models.retrieve("gpt-5-not-listed").id == "gpt-5-not-listed"  # served by gpt-*


def test_anthropic_clients_list_and_retrieve_anthropic_models(
    gateway: Gateway, claude: anthropic.Anthropic
) -> None:
    ids = [m.id for m in claude.models.list()]
    assert "claude-sonnet-4-5" in ids and all(m.startswith("claude") for m in ids)
    model = claude.models.retrieve("claude-sonnet-4-5")
    assert (model.id, model.type) == ("claude-sonnet-4-5", "model")
    assert claude.models.retrieve("claude-opus-9").id == "claude-opus-9"  # served by claude-*
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("gpt-4o")
    narrow = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.keys["narrow"])
    assert list(narrow.models.list()) == []


def test_messages_plain_and_streaming(
    gateway: Gateway, claude: anthropic.Anthropic, key: str
) -> None:
    message = claude.messages.create(model="claude-test-model", max_tokens=100, messages=MESSAGES)
    assert message.content[0].text.strip() == "Echo: What is a gateway?"  # type: ignore[union-attr]
    with claude.messages.stream(
        model="claude-test-model", max_tokens=100, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() == "Echo: What is a gateway?"
    rows = gateway.rows(key, wait_for=2)
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    assert rows[1]["model"] == "claude-test-model" and rows[1]["status"] == 200


# The provider sends a chunk every 250 ms; a gateway that buffered would hand them over together.
SLOW_STREAM = {"mock": {"chunks": 5, "chunk-delay-ms": 250}}


def _gaps(arrivals: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def test_chat_stream_chunks_reach_the_client_as_the_provider_sends_them(
    oai: openai.OpenAI,
) -> None:
    arrivals: list[float] = []
    text = ""
    for chunk in oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_body=SLOW_STREAM
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text += chunk.choices[0].delta.content
    assert text.strip() == "Echo: What is a gateway?"
    assert len(arrivals) == 5
    # Late is possible on a busy machine; together (a gap near 0) only if the gateway held them.
    assert min(_gaps(arrivals)) >= 0.1, _gaps(arrivals)


def test_message_stream_chunks_reach_the_client_as_the_provider_sends_them(
    claude: anthropic.Anthropic,
) -> None:
    arrivals: list[float] = []
    with claude.messages.stream(
        model="claude-test-model", max_tokens=100, messages=MESSAGES, extra_body=SLOW_STREAM
    ) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    assert min(_gaps(arrivals)) >= 0.1, _gaps(arrivals)


def test_count_tokens(gateway: Gateway, claude: anthropic.Anthropic, key: str) -> None:
    counted = claude.messages.count_tokens(model="claude-test-model", messages=MESSAGES)
    assert counted.input_tokens > 0
    row = _only_row(gateway, key)
    assert row["status"] == 200 and (row["input_tokens"], row["output_tokens"]) == (0, 0)


def test_refusals_surface_as_the_sdks_own_exceptions(gateway: Gateway) -> None:
    bad = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key="op-ul-aaaaaaaaaa" + "x" * 40, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError, match="not known"):
        bad.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    narrow = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=gateway.keys["narrow"], max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'gpt-4o'"):
        narrow.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    main = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.keys["main"], max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not served"):
        main.chat.completions.create(model="mistral-large", messages=MESSAGES)
    narrow_claude = anthropic.Anthropic(
        base_url=gateway.url, api_key=gateway.keys["narrow"], max_retries=0
    )
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        narrow_claude.messages.create(model="claude-test-model", max_tokens=10, messages=MESSAGES)
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gateway.url, api_key="nope", max_retries=0).messages.create(
            model="claude-test-model", max_tokens=10, messages=MESSAGES
        )


def test_error_shapes_follow_the_called_api(gateway: Gateway) -> None:
    headers = {"authorization": "Bearer op-ul-aaaaaaaaaa" + "x" * 40}
    body = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, json={}).json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    body = httpx.post(gateway.url + "/v1/messages", headers=headers, json={}).json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "authentication_error"


def test_the_upstream_gets_the_provider_key_not_the_opulon_key(
    gateway: Gateway, oai: openai.OpenAI
) -> None:
    failures = gateway.mock.stats()["auth_failures"]
    oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert gateway.mock.stats()["auth_failures"] == failures
