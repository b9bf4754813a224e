from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opulon.sse import SSESplitter, event_fields


def feed_all(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    splitter = SSESplitter()
    events: list[bytes] = []
    for chunk in chunks:
        events.extend(splitter.feed(chunk))
    return events, splitter.tail


def reference_events(stream: bytes) -> tuple[list[bytes], bytes]:
    """A line-by-line reading of the SSE spec: an event ends at its first empty line."""
    events: list[bytes] = []
    start = pos = 0
    for line in re.finditer(rb"([^\r\n]*)(\r\n|\r|\n)", stream):
        pos = line.end()
        if line.group(1) == b"":
            events.append(stream[start:pos])
            start = pos
    # A CR at the very end may be the first half of a CRLF: that event is not finished.
    if events and start == len(stream) and stream.endswith(b"\r"):
        start -= len(events.pop())
    return events, stream[start:]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


CHAT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    b"data: [DONE]\n\n"
)


def test_lf_events_are_split_at_blank_lines() -> None:
    events, tail = feed_all([CHAT])
    assert len(events) == 3
    assert events[2] == b"data: [DONE]\n\n"
    assert b"".join(events) == CHAT
    assert tail == b""


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_terminates_events(newline: bytes) -> None:
    first = b"event: a" + newline + b"data: 1" + newline + newline
    second = b"data: 2" + newline + newline
    events, tail = feed_all([first + second + b"data: 3"])
    assert events == [first, second]
    assert tail == b"data: 3"


def test_crlf_inside_an_event_is_not_a_blank_line() -> None:
    events, tail = feed_all([b"data: a\r\ndata: b\r\n"])
    assert events == []
    assert tail == b"data: a\r\ndata: b\r\n"


def test_mixed_line_endings_end_an_event() -> None:
    events, _ = feed_all([b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\ndata: d"])
    assert events == [b"data: a\r\n\n", b"data: b\n\r\n", b"data: c\r\r\n"]


def test_an_event_split_inside_a_crlf_waits_for_the_lf() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: a\r\n\r") == []
    assert splitter.tail == b"data: a\r\n\r"
    assert splitter.feed(b"\ndata: b") == [b"data: a\r\n\r\n"]
    assert splitter.tail == b"data: b"


def test_a_trailing_cr_ends_the_event_once_the_next_byte_is_not_lf() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: a\r\r") == []
    assert splitter.feed(b"data: b\r\r") == [b"data: a\r\r"]
    assert splitter.tail == b"data: b\r\r"


def test_leading_blank_lines_are_events_of_their_own() -> None:
    events, tail = feed_all([b"\n\r\n\rdata: x\n\n"])
    assert events == [b"\n", b"\r\n", b"\r", b"data: x\n\n"]
    assert tail == b""


def test_a_long_event_in_many_chunks_is_returned_once_whole() -> None:
    body = b"data: " + b"x" * 10_000 + b"\n\n"
    splitter = SSESplitter()
    returned = []
    for i in range(0, len(body), 7):
        returned.extend(splitter.feed(body[i : i + 7]))
        if i + 7 < len(body) - 2:
            assert splitter.pending == min(i + 7, len(body))
    assert returned == [body]
    assert splitter.tail == b""


def test_reset_returns_and_drops_the_tail() -> None:
    splitter = SSESplitter()
    splitter.feed(b"data: 1\n\ndata: 2")
    assert splitter.reset() == b"data: 2"
    assert splitter.tail == b""
    assert splitter.feed(b"data: 3\n\n") == [b"data: 3\n\n"]


SSE_BYTES = st.lists(
    st.sampled_from([b"data: ", b"event: x", b":c", b"a", b"\n", b"\r", b"\r\n", b" ", b"{}"]),
    max_size=40,
).map(b"".join)


@given(SSE_BYTES)
def test_whole_streams_split_as_the_spec_reads_them(stream: bytes) -> None:
    assert feed_all([stream]) == reference_events(stream)


@given(SSE_BYTES, st.lists(st.integers(min_value=0), max_size=12))
def test_any_chunking_yields_the_same_events_and_tail(stream: bytes, cuts: list[int]) -> None:
    chunked = feed_all(split_at(stream, cuts))
    assert chunked == feed_all([stream])
    events, tail = chunked
    assert b"".join(events) + tail == stream


@given(st.lists(st.integers(min_value=0), max_size=20))
def test_a_long_event_split_anywhere_comes_out_whole(cuts: list[int]) -> None:
    stream = b"data: " + b"y" * 300 + b"\r\n\r\n" + b"data: z\r\n\r\ndata: open"
    events, tail = feed_all(split_at(stream, cuts))
    assert events == [b"data: " + b"y" * 300 + b"\r\n\r\n", b"data: z\r\n\r\n"]
    assert tail == b"data: open"


def test_event_fields_reads_name_and_data() -> None:
    assert event_fields(b'event: message_start\ndata: {"a":1}\n\n') == (
        b"message_start",
        b'{"a":1}',
    )


def test_event_fields_joins_data_lines_with_lf() -> None:
    assert event_fields(b"data: one\r\ndata:two\r\ndata\r\n\r\n") == (None, b"one\ntwo\n")


def test_event_fields_strips_only_one_space_after_the_colon() -> None:
    assert event_fields(b"data:  two spaces\n\n") == (None, b" two spaces")


def test_event_fields_ignores_comments_and_other_fields() -> None:
    raw = b": keep-alive\nid: 7\nretry: 10\nevent: ping\ndata: {}\n\n"
    assert event_fields(raw) == (b"ping", b"{}")
    assert event_fields(b": just a comment\n\n") == (None, b"")


def test_event_fields_treats_an_empty_event_name_as_none() -> None:
    assert event_fields(b"event:\ndata: x\n\n") == (None, b"x")


def test_event_fields_keeps_colons_inside_data() -> None:
    assert event_fields(b'data: {"url":"http://x"}\r\r') == (None, b'{"url":"http://x"}')
