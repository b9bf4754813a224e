from __future__ import annotations

import json
from itertools import pairwise
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opulon.usage_extract import (
    Endpoint,
    StreamUsage,
    TokenCount,
    estimate_input_tokens,
    requested_output_tokens,
    usage_from_body,
)

ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)  # every API whose usage is read

# --- fixture streams, shaped as the real servers send them ----------------------------------


def data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def named(name: str, obj: object) -> bytes:
    return b"event: " + name.encode() + b"\n" + data(obj)


DONE = b"data: [DONE]\n\n"
CHAT_HEAD = {
    "id": "chatcmpl-BxM3kQ",
    "object": "chat.completion.chunk",
    "created": 1753700000,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_34a54ae93c",
}
CHAT_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 8,
    "total_tokens": 27,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
CHAT_WORDS = ["Hello", "!", " How", " can", " I", " help", "?"]


def chat_chunk(
    delta: dict[str, object], finish: str | None = None, extra: dict[str, object] | None = None
) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return data({**CHAT_HEAD, "choices": [choice], **(extra or {})})


NULL_USAGE: dict[str, object] = {"usage": None}  # what include_usage puts on other chunks


def chat_stream(*, include_usage: bool) -> list[bytes]:
    extra: dict[str, object] = {"usage": None} if include_usage else {}
    events = [chat_chunk({"role": "assistant", "content": "", "refusal": None}, None, extra)]
    events += [chat_chunk({"content": word}, None, extra) for word in CHAT_WORDS]
    events.append(chat_chunk({}, "stop", extra))
    if include_usage:
        events.append(data({**CHAT_HEAD, "choices": [], "usage": CHAT_USAGE}))
    events.append(DONE)
    return events


CHAT_WITH_USAGE = chat_stream(include_usage=True)
CHAT_WITHOUT_USAGE = chat_stream(include_usage=False)
CHAT_USAGE_EVENT = CHAT_WITH_USAGE[-2]


def tool_delta(**function: object) -> dict[str, object]:
    return {"tool_calls": [{"index": 0, "function": function}]}


CHAT_TOOL_CALL = [
    chat_chunk(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
            "refusal": None,
        },
        extra=NULL_USAGE,
    ),
    *[
        chat_chunk(tool_delta(arguments=part), extra=NULL_USAGE)
        for part in ['{"', "location", '":"', "Paris", '"}']
    ],
    chat_chunk({}, "tool_calls", NULL_USAGE),
    data(
        {
            **CHAT_HEAD,
            "choices": [],
            "usage": {"prompt_tokens": 58, "completion_tokens": 15, "total_tokens": 73},
        }
    ),
    DONE,
]

# Some OpenAI-compatible servers put usage on the final choice chunk instead.
CHAT_USAGE_ON_LAST_CHOICE = [
    *CHAT_WITHOUT_USAGE[:-2],
    chat_chunk(
        {}, "stop", {"usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}
    ),
    DONE,
]

COMPLETIONS_HEAD = {
    "id": "cmpl-BxM9",
    "object": "text_completion",
    "created": 1753700100,
    "model": "gpt-3.5-turbo-instruct",
}


def text_chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return data({**COMPLETIONS_HEAD, "choices": [choice], "usage": None})


COMPLETIONS = [
    *[text_chunk(t) for t in ["\n\n", "This", " is", " a", " test"]],
    text_chunk("", "length"),
    data(
        {
            **COMPLETIONS_HEAD,
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
        }
    ),
    DONE,
]

RESPONSE_OBJECT: dict[str, object] = {
    "id": "resp_67ccd2bed1ec8190b14f964abc054267",
    "object": "response",
    "created_at": 1741290958,
    "status": "in_progress",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "gpt-4.1-2025-04-14",
    "output": [],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": None,
    "user": None,
    "metadata": {},
}
RESPONSES_WORDS = ["Hi", " there", "!"]
RESPONSES_USAGE = {
    "input_tokens": 37,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 11,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 48,
}
TEXT_PART = {"type": "output_text", "text": "Hi there!", "annotations": []}
MESSAGE_ITEM = {
    "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6",
    "type": "message",
    "status": "completed",
    "role": "assistant",
    "content": [TEXT_PART],
}


def responses_stream(final: str, usage: object) -> list[bytes]:
    seq = iter(range(100))
    ids = {"item_id": MESSAGE_ITEM["id"], "output_index": 0, "content_index": 0}

    def ev(kind: str, **fields: object) -> bytes:
        return named(kind, {"type": kind, "sequence_number": next(seq), **fields})

    return [
        ev("response.created", response=RESPONSE_OBJECT),
        ev("response.in_progress", response=RESPONSE_OBJECT),
        ev(
            "response.output_item.added",
            output_index=0,
            item={**MESSAGE_ITEM, "status": "in_progress", "content": []},
        ),
        ev(
            "response.content_part.added",
            **ids,
            part={"type": "output_text", "text": "", "annotations": []},
        ),
        *[ev("response.output_text.delta", **ids, delta=w, logprobs=[]) for w in RESPONSES_WORDS],
        ev("response.output_text.done", **ids, text="Hi there!", logprobs=[]),
        ev("response.content_part.done", **ids, part=TEXT_PART),
        ev("response.output_item.done", output_index=0, item=MESSAGE_ITEM),
        ev(
            final,
            response={
                **RESPONSE_OBJECT,
                "status": final.removeprefix("response."),
                "output": [MESSAGE_ITEM],
                "usage": usage,
            },
        ),
    ]


RESPONSES = responses_stream("response.completed", RESPONSES_USAGE)

ANTHROPIC_MESSAGE: dict[str, object] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
}
ANTHROPIC_START_USAGE = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 1200,
    "cache_read_input_tokens": 2048,
    "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 2,
    "service_tier": "standard",
}
ANTHROPIC_WORDS = ["Hello", "! How can I", " help you today?"]


def anthropic_stream(final_usage: dict[str, object] | None) -> list[bytes]:
    events = [
        named(
            "message_start",
            {
                "type": "message_start",
                "message": {**ANTHROPIC_MESSAGE, "usage": ANTHROPIC_START_USAGE},
            },
        ),
        named(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
        *[
            named(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
            )
            for w in ANTHROPIC_WORDS
        ],
        named("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    if final_usage is not None:
        events.append(
            named(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": final_usage,
                },
            )
        )
        events.append(named("message_stop", {"type": "message_stop"}))
    return events


ANTHROPIC = anthropic_stream({"output_tokens": 15})
ANTHROPIC_CACHE_INPUT = 472 + 1200 + 2048

ANTHROPIC_TOOL_USE = [
    ANTHROPIC[0],
    named(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                "name": "get_weather",
                "input": {},
            },
        },
    ),
    *[
        named(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": part},
            },
        )
        for part in ["", '{"location": "San Fra', 'ncisco, CA"}']
    ],
    named("content_block_stop", {"type": "content_block_stop", "index": 0}),
    named(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 89},
        },
    ),
    named("message_stop", {"type": "message_stop"}),
]

STREAMS: list[tuple[Endpoint, list[bytes], TokenCount]] = [
    ("chat", CHAT_WITH_USAGE, TokenCount(19, 8, True)),
    ("chat", CHAT_WITHOUT_USAGE, TokenCount(0, len(CHAT_WORDS), False)),
    ("chat", CHAT_TOOL_CALL, TokenCount(58, 15, True)),
    ("chat", CHAT_USAGE_ON_LAST_CHOICE, TokenCount(12, 7, True)),
    ("completions", COMPLETIONS, TokenCount(5, 5, True)),
    ("responses", RESPONSES, TokenCount(37, 11, True)),
    ("messages", ANTHROPIC, TokenCount(ANTHROPIC_CACHE_INPUT, 15, True)),
    ("messages", ANTHROPIC_TOOL_USE, TokenCount(ANTHROPIC_CACHE_INPUT, 89, True)),
]


def run(
    endpoint: Endpoint, chunks: list[bytes], *, strip: bool = False
) -> tuple[bytes, TokenCount]:
    usage = StreamUsage(endpoint, strip_usage_chunk=strip)
    out = [usage.feed(chunk) for chunk in chunks]
    out.append(usage.flush())
    return b"".join(out), usage.count


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


CUTS = st.lists(st.integers(min_value=0), max_size=30)

# --- streams --------------------------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "events", "expected"), STREAMS)
def test_stream_fixtures_give_their_usage(
    endpoint: Endpoint, events: list[bytes], expected: TokenCount
) -> None:
    forwarded, count = run(endpoint, events)
    assert count == expected
    assert forwarded == b"".join(events)


def test_chat_usage_is_read_from_the_usage_only_chunk() -> None:
    usage = StreamUsage("chat", strip_usage_chunk=False)
    for event in CHAT_WITH_USAGE[:-2]:
        usage.feed(event)
    assert usage.count.reported is False
    usage.feed(CHAT_USAGE_EVENT)
    assert usage.count == TokenCount(19, 8, True)


def test_chat_without_usage_estimates_output_as_the_number_of_content_deltas() -> None:
    _, count = run("chat", CHAT_WITHOUT_USAGE)
    # The role chunk ("content":"") and the finish chunk carry no text: not counted.
    assert count == TokenCount(0, 7, False)


def test_tool_call_deltas_count_towards_the_estimate() -> None:
    cut_before_usage = CHAT_TOOL_CALL[:-2]
    _, count = run("chat", cut_before_usage)
    # The first chunk names the function, then five argument fragments.
    assert count == TokenCount(0, 6, False)


def test_a_stream_cut_off_before_usage_counts_what_was_seen() -> None:
    usage = StreamUsage("chat", strip_usage_chunk=False)
    for event in CHAT_WITH_USAGE[:4]:
        usage.feed(event)
    assert usage.count == TokenCount(0, 3, False)


def test_text_that_mentions_token_keys_is_not_taken_for_usage() -> None:
    events = [
        chat_chunk({"content": "prompt_tokens"}, extra=NULL_USAGE),
        chat_chunk({"content": '"usage": {"completion_tokens": 3}'}, extra=NULL_USAGE),
    ]
    _, count = run("chat", events)
    assert count == TokenCount(0, 2, False)


def test_usage_on_the_last_choice_chunk_is_accepted_and_never_stripped() -> None:
    forwarded, count = run("chat", CHAT_USAGE_ON_LAST_CHOICE, strip=True)
    assert count == TokenCount(12, 7, True)
    assert forwarded == b"".join(CHAT_USAGE_ON_LAST_CHOICE)


def test_stripping_removes_exactly_the_usage_chunk() -> None:
    forwarded, count = run("chat", CHAT_WITH_USAGE, strip=True)
    expected = b"".join(e for e in CHAT_WITH_USAGE if e is not CHAT_USAGE_EVENT)
    assert forwarded == expected
    assert forwarded.endswith(b"}\n\n" + DONE)
    assert count == TokenCount(19, 8, True)


def test_stripping_works_for_completions_too() -> None:
    forwarded, count = run("completions", COMPLETIONS, strip=True)
    assert forwarded == b"".join(COMPLETIONS[:-2] + COMPLETIONS[-1:])
    assert count == TokenCount(5, 5, True)


def test_a_usage_less_choices_empty_chunk_is_not_stripped() -> None:
    # Azure OpenAI opens with a chunk of prompt filter results and no choices.
    azure_first = data(
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [],
        }
    )
    events = [azure_first, *CHAT_WITH_USAGE]
    forwarded, _ = run("chat", events, strip=True)
    assert forwarded.startswith(azure_first)
    assert CHAT_USAGE_EVENT not in forwarded


def test_strip_mode_holds_back_only_an_unfinished_event() -> None:
    usage = StreamUsage("chat", strip_usage_chunk=True)
    first, second = CHAT_WITH_USAGE[0], CHAT_WITH_USAGE[1]
    assert usage.feed(first + second[:10]) == first
    assert usage.feed(second[10:]) == second
    assert usage.feed(CHAT_USAGE_EVENT[:-1]) == b""
    assert usage.feed(CHAT_USAGE_EVENT[-1:]) == b""
    assert usage.feed(DONE) is DONE
    assert usage.flush() == b""


def test_strip_mode_returns_the_chunk_itself_when_it_is_whole_events() -> None:
    usage = StreamUsage("chat", strip_usage_chunk=True)
    chunk = CHAT_WITH_USAGE[0] + CHAT_WITH_USAGE[1]
    assert usage.feed(chunk) is chunk


def test_flush_forwards_an_unfinished_tail_as_is() -> None:
    usage = StreamUsage("chat", strip_usage_chunk=True)
    assert usage.feed(b'data: {"partial') == b""
    assert usage.flush() == b'data: {"partial'
    assert usage.flush() == b""


def test_flush_reads_usage_from_an_unterminated_last_event() -> None:
    unterminated = CHAT_USAGE_EVENT.rstrip(b"\n")
    for strip in (False, True):
        usage = StreamUsage("chat", strip_usage_chunk=strip)
        usage.feed(b"".join(CHAT_WITH_USAGE[:-2]))
        usage.feed(unterminated)
        assert usage.count.reported is False
        assert usage.flush() == (unterminated if strip else b"")
        assert usage.count == TokenCount(19, 8, True)


@pytest.mark.parametrize("endpoint", ["responses", "messages", "embeddings", "other"])
def test_only_openai_text_streams_can_strip(endpoint: Endpoint) -> None:
    with pytest.raises(ValueError, match="strip"):
        StreamUsage(endpoint, strip_usage_chunk=True)


def test_completions_estimate_counts_text_chunks() -> None:
    _, count = run("completions", COMPLETIONS[:-2])
    assert count == TokenCount(0, 5, False)


def test_responses_usage_comes_from_the_completed_event() -> None:
    usage = StreamUsage("responses", strip_usage_chunk=False)
    for event in RESPONSES[:-1]:
        usage.feed(event)
    assert usage.count == TokenCount(0, len(RESPONSES_WORDS), False)
    usage.feed(RESPONSES[-1])
    assert usage.count == TokenCount(37, 11, True)


def test_responses_incomplete_event_reports_usage() -> None:
    stream = responses_stream(
        "response.incomplete", {**RESPONSES_USAGE, "output_tokens": 16, "total_tokens": 53}
    )
    assert run("responses", stream)[1] == TokenCount(37, 16, True)


def test_responses_failed_without_usage_falls_back_to_the_estimate() -> None:
    stream = responses_stream("response.failed", None)
    assert run("responses", stream)[1] == TokenCount(0, len(RESPONSES_WORDS), False)


def test_responses_events_without_event_lines_are_recognised() -> None:
    bare = [event.split(b"\n", 1)[1] for event in RESPONSES]
    assert run("responses", bare)[1] == TokenCount(37, 11, True)


def test_anthropic_input_includes_cache_writes_and_reads() -> None:
    usage = StreamUsage("messages", strip_usage_chunk=False)
    usage.feed(ANTHROPIC[0])
    assert usage.count.input_tokens == 472 + 1200 + 2048


def test_anthropic_output_tokens_are_a_running_total_not_a_sum() -> None:
    stream = [*ANTHROPIC[:-2]]
    for total in (5, 9, 15):
        stream.append(
            named(
                "message_delta",
                {"type": "message_delta", "delta": {}, "usage": {"output_tokens": total}},
            )
        )
    stream.append(ANTHROPIC[-1])
    assert run("messages", stream)[1] == TokenCount(ANTHROPIC_CACHE_INPUT, 15, True)


def test_anthropic_message_delta_input_replaces_the_start_figures() -> None:
    stream = anthropic_stream(
        {
            "input_tokens": 500,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 3248,
            "output_tokens": 40,
            "server_tool_use": {"web_search_requests": 1},
        }
    )
    assert run("messages", stream)[1] == TokenCount(500 + 3248, 40, True)


def test_anthropic_message_delta_keeps_cache_figures_it_does_not_repeat() -> None:
    stream = anthropic_stream({"input_tokens": 480, "output_tokens": 40})
    assert run("messages", stream)[1] == TokenCount(480 + 1200 + 2048, 40, True)


def test_anthropic_cut_off_before_message_delta_keeps_input_and_estimates_output() -> None:
    _, count = run("messages", anthropic_stream(None))
    assert count == TokenCount(ANTHROPIC_CACHE_INPUT, len(ANTHROPIC_WORDS), False)


def test_anthropic_ping_and_block_events_are_not_deltas() -> None:
    events = [e for e in ANTHROPIC if b"content_block_delta" not in e][:-2]
    assert run("messages", events)[1] == TokenCount(ANTHROPIC_CACHE_INPUT, 2, False)


def test_count_tokens_streams_consume_nothing() -> None:
    assert run("count_tokens", [b'data: {"input_tokens": 10}\n\n'])[1] == TokenCount(0, 0, True)


def test_other_streams_accept_either_usage_naming() -> None:
    assert run("other", CHAT_WITH_USAGE)[1] == TokenCount(19, 8, True)
    assert run("other", ANTHROPIC)[1] == TokenCount(ANTHROPIC_CACHE_INPUT, 15, True)
    assert run("other", RESPONSES)[1] == TokenCount(37, 11, True)


def test_count_is_a_snapshot() -> None:
    usage = StreamUsage("chat", strip_usage_chunk=False)
    snapshot = usage.count
    snapshot.output_tokens = 99
    assert usage.count == TokenCount()


def test_crlf_streams_are_read_too() -> None:
    crlf = [event.replace(b"\n", b"\r\n") for event in CHAT_WITH_USAGE]
    forwarded, count = run("chat", crlf, strip=True)
    assert count == TokenCount(19, 8, True)
    assert forwarded == b"".join(e for e in crlf if b'"choices":[]' not in e)


@pytest.mark.parametrize(("endpoint", "events", "expected"), STREAMS)
@given(cuts=CUTS)
def test_any_chunking_gives_the_same_usage_and_bytes(
    endpoint: Endpoint, events: list[bytes], expected: TokenCount, cuts: list[int]
) -> None:
    whole = b"".join(events)
    chunks = split_at(whole, cuts)
    forwarded, count = run(endpoint, chunks)
    assert count == expected
    assert forwarded == whole


@pytest.mark.parametrize(
    ("endpoint", "events", "usage_event"),
    [
        ("chat", CHAT_WITH_USAGE, CHAT_USAGE_EVENT),
        ("chat", CHAT_TOOL_CALL, CHAT_TOOL_CALL[-2]),
        ("completions", COMPLETIONS, COMPLETIONS[-2]),
    ],
)
@given(cuts=CUTS)
def test_stripping_under_any_chunking_removes_exactly_the_usage_chunk(
    endpoint: Endpoint, events: list[bytes], usage_event: bytes, cuts: list[int]
) -> None:
    whole = b"".join(events)
    forwarded, count = run(endpoint, split_at(whole, cuts), strip=True)
    assert forwarded == whole.replace(usage_event, b"")
    assert count == run(endpoint, events)[1]
    assert count.reported


@given(cuts=CUTS)
def test_stripping_a_stream_without_usage_changes_nothing(cuts: list[int]) -> None:
    whole = b"".join(CHAT_WITHOUT_USAGE)
    assert run("chat", split_at(whole, cuts), strip=True)[0] == whole


@pytest.mark.parametrize(("endpoint", "events", "expected"), STREAMS)
@given(cuts=CUTS)
def test_without_stripping_feed_returns_the_very_chunk_objects(
    endpoint: Endpoint, events: list[bytes], expected: TokenCount, cuts: list[int]
) -> None:
    chunks = split_at(b"".join(events), cuts)
    usage = StreamUsage(endpoint, strip_usage_chunk=False)
    for chunk in chunks:
        assert usage.feed(chunk) is chunk
    assert usage.flush() == b""
    assert usage.count == expected


# --- non-streaming bodies -------------------------------------------------------------------

CHAT_BODY = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": CHAT_USAGE,
    "service_tier": "default",
}
MESSAGES_BODY = {
    **ANTHROPIC_MESSAGE,
    "content": [{"type": "text", "text": "Hi!"}],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 2095,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 5,
        "output_tokens": 503,
    },
}


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        ("chat", CHAT_BODY, TokenCount(19, 8, True)),
        (
            "completions",
            {
                "object": "text_completion",
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7},
            },
            TokenCount(5, 7, True),
        ),
        (
            "embeddings",
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            },
            TokenCount(8, 0, True),
        ),
        (
            "responses",
            {
                **RESPONSE_OBJECT,
                "status": "completed",
                "output": [MESSAGE_ITEM],
                "usage": RESPONSES_USAGE,
            },
            TokenCount(37, 11, True),
        ),
        ("messages", MESSAGES_BODY, TokenCount(2200, 503, True)),
        ("count_tokens", {"input_tokens": 2095}, TokenCount(0, 0, True)),
        ("other", {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, TokenCount(3, 4, True)),
        ("other", {"usage": {"input_tokens": 3, "output_tokens": 4}}, TokenCount(3, 4, True)),
        ("other", {"result": "no usage here"}, TokenCount(0, 0, False)),
        (
            "messages",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            TokenCount(0, 0, False),
        ),
        ("chat", {"usage": {"prompt_tokens": True, "completion_tokens": -1}}, TokenCount()),
        ("chat", {"usage": None}, TokenCount()),
        ("chat", {"usage": {"prompt_tokens": 9}}, TokenCount(9, 0, True)),
    ],
)
def test_usage_from_body(endpoint: Endpoint, body: object, expected: TokenCount) -> None:
    assert usage_from_body(endpoint, json.dumps(body).encode()) == expected


def test_huge_embeddings_bodies_read_usage_without_parsing_the_vectors() -> None:
    vectors = [{"object": "embedding", "index": i, "embedding": [0.001] * 1536} for i in range(60)]
    body = json.dumps(
        {
            "object": "list",
            "data": vectors,
            "model": "m",
            "usage": {"prompt_tokens": 4000, "total_tokens": 4000},
        }
    ).encode()
    assert len(body) > 256 * 1024
    assert usage_from_body("embeddings", body) == TokenCount(4000, 0, True)


def test_huge_bodies_skip_a_later_usage_key_that_is_not_an_object() -> None:
    body = json.dumps(
        {
            "output": [
                {"type": "message", "content": [{"type": "output_text", "text": "x" * 300_000}]}
            ],
            "usage": {"input_tokens": 10, "output_tokens": 70_000},
            "metadata": {"usage": "internal"},
        }
    ).encode()
    assert usage_from_body("responses", body) == TokenCount(10, 70_000, True)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"usage": [1]}',
        b'{"usage": {"prompt_tokens": "12"}}',
        b"\xff\xfe\x00",
        b"[" * 100_000,
        b'{"usage": {"prompt_tokens": 1' + b"0" * 5000 + b"}}",
        b'{"usage": ' + b"[" * 300_000,
    ],
)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_malformed_bodies_never_raise(endpoint: Endpoint, body: bytes) -> None:
    count = usage_from_body(endpoint, body)
    assert count == (TokenCount(0, 0, True) if endpoint == "count_tokens" else TokenCount())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
USAGE_KEYS = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
    ]
)


@given(st.sampled_from(ENDPOINTS), st.dictionaries(USAGE_KEYS, JSON, max_size=4) | JSON)
def test_odd_usage_values_never_raise_and_give_counts(endpoint: Endpoint, usage: object) -> None:
    count = usage_from_body(endpoint, json.dumps({"usage": usage}).encode())
    assert count.input_tokens >= 0
    assert count.output_tokens >= 0


@given(st.sampled_from(ENDPOINTS), st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(endpoint: Endpoint, body: bytes) -> None:
    count = usage_from_body(endpoint, body)
    if endpoint == "count_tokens":
        assert count == TokenCount(0, 0, True)
    elif b"usage" not in body:
        assert count == TokenCount()


@pytest.mark.parametrize("endpoint", ["chat", "completions", "responses", "messages", "other"])
@given(st.binary(max_size=300), CUTS)
def test_arbitrary_streams_never_raise(endpoint: Endpoint, stream: bytes, cuts: list[int]) -> None:
    usage = StreamUsage(endpoint, strip_usage_chunk=endpoint in ("chat", "completions"))
    forwarded = b"".join(usage.feed(chunk) for chunk in split_at(stream, cuts)) + usage.flush()
    assert forwarded == stream
    assert usage.count.output_tokens >= 0


# --- request side ---------------------------------------------------------------------------


def test_input_estimate_is_about_four_bytes_per_token_less_syntax() -> None:
    body = json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 800}]}
    ).encode()
    estimate = estimate_input_tokens(body)
    assert len(body) // 5 < estimate < len(body) // 4


def test_input_estimate_is_at_least_one() -> None:
    assert estimate_input_tokens(b"") == 1
    assert estimate_input_tokens(b"{}") == 1


@given(st.binary(max_size=500), st.binary(max_size=50))
def test_input_estimate_grows_with_the_body(body: bytes, more: bytes) -> None:
    assert estimate_input_tokens(body) <= estimate_input_tokens(body + more)


@pytest.mark.parametrize(
    ("endpoint", "payload", "expected"),
    [
        ("chat", {"max_tokens": 1024}, 1024),
        ("chat", {"max_completion_tokens": 300}, 300),
        ("responses", {"max_output_tokens": 50}, 50),
        ("chat", {"max_tokens": 10, "max_completion_tokens": 20}, 20),
        ("chat", {"max_output_tokens": 1}, None),  # not a chat field: the provider ignores it
        ("responses", {"max_tokens": 1}, None),
        ("messages", {"max_tokens": 64}, 64),
        ("chat", {"max_tokens": 0}, None),
        ("chat", {"max_tokens": -5}, None),
        ("chat", {"max_tokens": True}, None),
        ("chat", {"max_tokens": "100"}, None),
        ("chat", {"max_tokens": 100.0}, None),
        ("chat", {"model": "gpt-4o"}, None),
    ],
)
def test_requested_output_tokens(
    endpoint: str, payload: dict[str, object], expected: int | None
) -> None:
    assert requested_output_tokens(endpoint, payload) == expected


def test_requested_choices() -> None:
    from opulon.usage_extract import requested_choices

    assert requested_choices("chat", {"n": 4}) == 4
    assert requested_choices("completions", {"n": 2, "best_of": 5}) == 5
    assert requested_choices("chat", {}) == 1
    assert requested_choices("embeddings", {"n": 9}) == 1
