"""Token usage, read from upstream responses in memory: only the counts are ever kept.

Non-streaming bodies go through :func:`usage_from_body`. Streams go through
:class:`StreamUsage`, which sits on the relay path: it sees every chunk, so it parses JSON only
for the few events that can carry usage and otherwise gets by with substring checks.

``TokenCount.reported`` tells reported figures from estimates. An estimate counts one output
token per content-delta event (close for OpenAI, low for Anthropic, whose deltas carry a few
tokens each) and leaves input at 0 unless the upstream already said it; the gateway estimates
input itself (:func:`estimate_input_tokens`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from opulon.sse import SSESplitter, event_fields

__all__ = [
    "Endpoint",
    "StreamUsage",
    "TokenCount",
    "estimate_input_tokens",
    "requested_choices",
    "requested_output_tokens",
    "usage_from_body",
]

Endpoint = Literal[
    "chat", "completions", "embeddings", "responses", "messages", "count_tokens", "other"
]


@dataclass(slots=True)
class TokenCount:
    input_tokens: int = 0
    output_tokens: int = 0
    reported: bool = False  # True when the upstream reported usage; False = estimated or unknown


# --- small helpers --------------------------------------------------------------------------


def _count(value: object) -> int | None:
    """A token count as JSON gives it: a non-negative int (bools are not counts)."""
    if type(value) is int and value >= 0:
        return value
    return None


_json = msgspec.json.Decoder()


def _loads_dict(data: bytes) -> dict[str, object] | None:
    try:
        obj = _json.decode(data)
    except (ValueError, RecursionError):  # msgspec's errors and UnicodeDecodeError
        return None
    return obj if isinstance(obj, dict) else None


class _UsageOnly(msgspec.Struct):
    """A response body's top-level ``usage``; every other member is skipped, not built."""

    usage: dict[str, object] | None = None


_usage_only = msgspec.json.Decoder(_UsageOnly)


def _dict_at(obj: dict[str, object], key: str) -> dict[str, object] | None:
    value = obj.get(key)
    return value if isinstance(value, dict) else None


def _anthropic_input(usage: dict[str, object]) -> int | None:
    """Anthropic's input: uncached plus cache writes plus cache reads."""
    base = _count(usage.get("input_tokens"))
    if base is None:
        return None
    written = _count(usage.get("cache_creation_input_tokens")) or 0
    read = _count(usage.get("cache_read_input_tokens")) or 0
    return base + written + read


def _generic_usage(usage: dict[str, object]) -> tuple[int | None, int | None]:
    """(input, output) from either naming: OpenAI's prompt/completion or input/output."""
    inp = _count(usage.get("prompt_tokens"))
    if inp is None:
        inp = _anthropic_input(usage)
    out = _count(usage.get("completion_tokens"))
    if out is None:
        out = _count(usage.get("output_tokens"))
    return inp, out


# --- non-streaming bodies -------------------------------------------------------------------

# Bodies up to this size are decoded whole, though only their "usage" member is built. Beyond
# it (embeddings of thousands of inputs run to tens of megabytes) only the last "usage" object
# is decoded; usage is a top-level key near the end of every such body, and a quoted key cannot
# occur inside a JSON string unescaped.
_FULL_PARSE_LIMIT = 256 * 1024
_USAGE_KEY = b'"usage"'
_decoder = json.JSONDecoder()


def _body_usage(body: bytes) -> dict[str, object] | None:
    if len(body) <= _FULL_PARSE_LIMIT:
        try:
            return _usage_only.decode(body).usage
        except (ValueError, RecursionError):
            return None
    # Scan from the end for the "usage" object and decode only it: a JSON string cannot hold
    # the bytes "usage" followed by a bare quote, so a match is a key.
    end = len(body)
    for _ in range(4):
        i = body.rfind(_USAGE_KEY, 0, end)
        if i < 0:
            break
        text = body[i + len(_USAGE_KEY) : i + 4096].decode("utf-8", "replace").lstrip()
        if text.startswith(":"):
            try:
                value, _ = _decoder.raw_decode(text[1:].lstrip())
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict):
                return value
        end = i
    return None


def usage_from_body(endpoint: Endpoint, body: bytes) -> TokenCount:
    """Usage of a non-streaming JSON response; ``TokenCount()`` when it has none or is not JSON."""
    if endpoint == "count_tokens":
        return TokenCount(0, 0, True)  # counting tokens consumes none
    usage = _body_usage(body)
    if usage is None:
        return TokenCount()
    inp: int | None
    out: int | None
    if endpoint in ("chat", "completions"):
        inp = _count(usage.get("prompt_tokens"))
        out = _count(usage.get("completion_tokens"))
    elif endpoint == "embeddings":
        inp, out = _count(usage.get("prompt_tokens")), None  # embeddings produce no output
    elif endpoint == "responses":
        inp = _count(usage.get("input_tokens"))
        out = _count(usage.get("output_tokens"))
    elif endpoint == "messages":
        inp = _anthropic_input(usage)
        out = _count(usage.get("output_tokens"))
    else:
        inp, out = _generic_usage(usage)
    if inp is None and out is None:
        return TokenCount()
    return TokenCount(inp or 0, out or 0, True)


# --- streams --------------------------------------------------------------------------------

# One of these in an OpenAI chunk means it carries generated text or a tool-call fragment.
# Empty strings do not count (the first chunk of a reply has "content":"").
_CHAT_OUTPUT = re.compile(
    rb'"(?:content|refusal|reasoning_content|reasoning|name|arguments)"\s*:\s*"[^"]'
)
_TEXT_OUTPUT = re.compile(rb'"text"\s*:\s*"[^"]')
_ANY_OUTPUT = re.compile(
    rb'"(?:content|text|delta|partial_json|refusal|reasoning_content|reasoning|arguments)"'
    rb'\s*:\s*"[^"]'
)
_RESPONSES_FINAL = frozenset((b"response.completed", b"response.incomplete", b"response.failed"))
_TYPE_KEY = b'"type"'


def _event_type(raw: bytes) -> bytes:
    """The type of an event cheaply: its ``event:`` line, else the first "type" in its data.

    Responses and Anthropic events name their type in both places, and the data's first key
    is "type", so neither needs a JSON parse.
    """
    if raw.startswith(b"event:"):
        head = raw[6:200]  # event names are short; never copy a large event
        return head.split(b"\n", 1)[0].split(b"\r", 1)[0].strip()
    i = raw.find(_TYPE_KEY)
    if i < 0:
        return b""
    colon = raw.find(b":", i + 6)
    start = raw.find(b'"', colon + 1) + 1 if colon >= 0 else 0
    if start <= 0:
        return b""
    end = raw.find(b'"', start)
    return raw[start:end] if end >= 0 else b""


def _event_json(raw: bytes) -> dict[str, object] | None:
    return _loads_dict(event_fields(raw)[1])


class StreamUsage:
    """Feeds on an upstream SSE stream, chunk by chunk, and returns what to forward.

    Without stripping, :meth:`feed` returns the chunk object it was given and reads usage as a
    side effect. With ``strip_usage_chunk`` (OpenAI chat or completions, when the gateway
    asked for ``stream_options.include_usage`` and the client did not), it returns the
    complete events so far minus the usage-only chunk (``"choices": []`` with usage set) and
    holds back an unfinished event until it completes; :meth:`flush` hands back what is held.
    """

    __slots__ = (
        "_deltas",
        "_endpoint",
        "_in",
        "_in_cache_read",
        "_in_cache_write",
        "_out",
        "_output",
        "_reported",
        "_scan",
        "_splitter",
        "_strip",
    )

    def __init__(self, endpoint: Endpoint, *, strip_usage_chunk: bool) -> None:
        if strip_usage_chunk and endpoint not in ("chat", "completions"):
            raise ValueError(
                f"only chat and completions streams have a usage chunk to strip, not {endpoint!r}"
            )
        self._endpoint = endpoint
        self._strip = strip_usage_chunk
        self._splitter = SSESplitter()
        self._in: int | None = None
        self._in_cache_write = 0
        self._in_cache_read = 0
        self._out: int | None = None
        self._reported = False  # final usage seen
        self._deltas = 0  # content-delta events, for the estimate
        self._output = _TEXT_OUTPUT if endpoint == "completions" else _CHAT_OUTPUT
        scanners: dict[str, Callable[[bytes], bool]] = {
            "chat": self._scan_openai,
            "completions": self._scan_openai,
            "responses": self._scan_responses,
            "messages": self._scan_anthropic,
        }
        self._scan = scanners.get(endpoint, self._scan_generic)

    # -- relay -------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Scan ``chunk`` and return the bytes to write to the client now."""
        scan = self._scan
        if not self._strip:
            for event in self._splitter.feed(chunk):
                scan(event)
            return chunk
        splitter = self._splitter
        had_tail = splitter.pending
        events = splitter.feed(chunk)
        kept = [event for event in events if not scan(event)]
        if len(kept) == len(events) and not had_tail and not splitter.pending:
            return chunk
        return b"".join(kept)

    def flush(self) -> bytes:
        """At the end of the stream: what is still held back, forwarded as is.

        An unfinished last event is still read for usage (some servers omit the final blank
        line) but never stripped, since its bytes are passed on unchanged.
        """
        tail = self._splitter.reset()
        if tail:
            self._scan(tail)
        return tail if self._strip else b""

    @property
    def count(self) -> TokenCount:
        """Tokens known so far; an estimate (``reported=False``) until usage arrives."""
        if self._endpoint == "count_tokens":
            return TokenCount(0, 0, True)
        inp = 0 if self._in is None else self._in + self._in_cache_write + self._in_cache_read
        if self._reported:
            return TokenCount(inp, self._out or 0, True)
        # Estimate: one output token per content-delta event seen. Anthropic's message_start
        # already gave the real input and a provisional output, which the estimate may exceed.
        return TokenCount(inp, max(self._out or 0, self._deltas), False)

    # -- per-API scanners: return True when the event is the usage-only chunk to strip -------

    def _scan_openai(self, event: bytes) -> bool:
        # Token keys only occur in a real usage object (include_usage sends "usage":null
        # on every other chunk), so one substring check spares the JSON parse.
        if b'_tokens"' in event:
            obj = _event_json(event)
            usage = None if obj is None else _dict_at(obj, "usage")
            if obj is not None and usage is not None:
                inp = _count(usage.get("prompt_tokens"))
                out = _count(usage.get("completion_tokens"))
                if inp is not None or out is not None:
                    self._in = inp or 0
                    self._out = out or 0
                    self._reported = True
                    return obj.get("choices") == []
        if self._output.search(event) is not None:
            self._deltas += 1
        return False

    def _scan_responses(self, event: bytes) -> bool:
        kind = _event_type(event)
        if kind.endswith(b".delta"):
            self._deltas += 1
        elif kind in _RESPONSES_FINAL:
            obj = _event_json(event)
            response = None if obj is None else _dict_at(obj, "response")
            usage = None if response is None else _dict_at(response, "usage")
            if usage is not None:
                inp = _count(usage.get("input_tokens"))
                out = _count(usage.get("output_tokens"))
                if inp is not None or out is not None:
                    self._in = inp or 0
                    self._out = out or 0
                    self._reported = True
        return False

    def _scan_anthropic(self, event: bytes) -> bool:
        kind = _event_type(event)
        if kind == b"content_block_delta":
            self._deltas += 1
        elif kind == b"message_start":
            obj = _event_json(event)
            message = None if obj is None else _dict_at(obj, "message")
            usage = None if message is None else _dict_at(message, "usage")
            if usage is not None:
                self._take_anthropic(usage)  # input is final, output provisional
        elif kind == b"message_delta":
            obj = _event_json(event)
            usage = None if obj is None else _dict_at(obj, "usage")
            if usage is not None and self._take_anthropic(usage):
                self._reported = True
        return False

    def _take_anthropic(self, usage: dict[str, object]) -> bool:
        """Replace each figure present (they are running totals); True if output was there."""
        inp = _count(usage.get("input_tokens"))
        if inp is not None:
            self._in = inp
        written = _count(usage.get("cache_creation_input_tokens"))
        if written is not None:
            self._in_cache_write = written
        read = _count(usage.get("cache_read_input_tokens"))
        if read is not None:
            self._in_cache_read = read
        out = _count(usage.get("output_tokens"))
        if out is not None:
            self._out = out
        return out is not None

    def _scan_generic(self, event: bytes) -> bool:
        if b'_tokens"' in event:
            obj = _event_json(event)
            if obj is not None:
                usage = _dict_at(obj, "usage")
                for key in ("response", "message"):
                    if usage is not None:
                        break
                    inner = _dict_at(obj, key)
                    usage = None if inner is None else _dict_at(inner, "usage")
                if usage is not None:
                    inp, out = _generic_usage(usage)
                    if inp is not None:
                        self._in = inp
                    if out is not None:
                        self._out = out
                    if inp is not None or out is not None:
                        self._reported = True
                        return False
        if _ANY_OUTPUT.search(event) is not None:
            self._deltas += 1
        return False


# --- request side ---------------------------------------------------------------------------


def estimate_input_tokens(body: bytes) -> int:
    """A cheap upper-leaning guess of a request's input tokens, from its raw JSON size.

    English text and code run about 4 bytes per token; roughly a tenth of a chat request is
    JSON syntax (keys, quotes, braces), so this takes 9/10 of the length divided by 4, at least
    1. Inline base64 media (images, PDFs) is billed far below its size, so such bodies come out
    high; the figure is meant for reservations that are settled against reported usage.
    """
    return max(1, len(body) * 9 // 40)


# The output cap fields each API reads: a field another API's would be ignored upstream, so it
# must not lower the reservation.
OUTPUT_CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
}
# Fields asking for several answers at once: each may use the whole output cap.
CHOICE_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("n",),
    "completions": ("n", "best_of"),
}


def requested_output_tokens(endpoint: str, payload: dict[str, object]) -> int | None:
    """The output cap the request asks for (the largest, if it names several), or ``None``."""
    best: int | None = None
    for key in OUTPUT_CAP_FIELDS.get(endpoint, ()):
        value = payload.get(key)
        if type(value) is int and value > 0 and (best is None or value > best):
            best = value
    return best


def requested_choices(endpoint: str, payload: dict[str, object]) -> int:
    """How many answers the request asks for (``n``, ``best_of``): at least 1."""
    most = 1
    for key in CHOICE_FIELDS.get(endpoint, ()):
        value = payload.get(key)
        if type(value) is int and value > most:
            most = value
    return most
