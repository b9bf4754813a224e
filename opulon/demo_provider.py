"""The built-in mock provider of ``opulon demo``: enough of the OpenAI and Anthropic HTTP APIs.

A real HTTP server (``aiohttp.web``) on a loopback address, which the official ``openai`` and
``anthropic`` SDKs parse, streaming or not. ``opulon demo`` runs it in a thread; to try
``opulon serve`` by hand without a provider key, run it in a terminal:
``python -m opulon.demo_provider --port 8001``.

Endpoints (the SDK base URL is ``<url>/v1`` for OpenAI and ``<url>`` for Anthropic):

* OpenAI: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
  ``POST /v1/responses``, ``GET /v1/models`` and ``GET /v1/models/{id}``.
* Anthropic: ``POST /v1/messages``, ``POST /v1/messages/count_tokens``, and ``GET /v1/models``
  when the request carries an ``anthropic-version`` header.

The answer is :attr:`DemoConfig.reply` when set, else ``"Echo: "`` followed by the text of the
last user message, cut to 200 characters. A request with tools gets a call of its first tool
(arguments made up from the tool's schema). The answer is split into ``chunks`` equal,
non-empty slices (padded with spaces when shorter than ``chunks``); the non-streaming answer
is the same padded text. Token counts are deterministic:

* input tokens = ``max(1, len(text) // 4)`` where ``text`` is every text piece of the request
  (system prompt or instructions first, then each message's text, tool results included) joined
  with ``"\\n"``; for embeddings given as token arrays, the number of tokens in them;
* output tokens = the number of stream content chunks: ``chunks`` for text answers, and
  ``min(chunks, len(arguments_json))`` for tool calls.

The handlers build an :data:`Answer` (a JSON payload, or a stream's events) and
:func:`deliver` sends it, so that a test double can serve the same answers with faults of
its own (``tests/mock_provider.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import secrets
import signal
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "ROUTES",
    "Answer",
    "Api",
    "ApiError",
    "Call",
    "DemoConfig",
    "DemoProvider",
    "JsonAnswer",
    "LoopbackServer",
    "Route",
    "StreamAnswer",
    "api_of",
    "authorized",
    "check_loopback",
    "command_parser",
    "create_demo_app",
    "deliver",
    "error_response",
    "json_response",
    "main",
    "openai_usage",
    "prepare_stream",
    "read_json",
    "serve_in_foreground",
    "split",
    "unauthorized",
]

DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
)
MAX_CHUNKS = 10_000
CLIENT_MAX_SIZE = 256 * 1024 * 1024
MODEL_CREATED = 1_700_000_000
FINGERPRINT = "fp_opulon_mock"
_ECHO_LIMIT = 200
_SHUTDOWN_TIMEOUT = 0.5
_START_TIMEOUT = 10.0
_EMBEDDING_DIMENSIONS = 8

Api = Literal["openai", "anthropic"]


@dataclass(frozen=True)
class DemoConfig:
    """How the provider answers.

    Attributes:
        models: model ids listed by ``GET /v1/models``; other ids are accepted in requests too.
        api_key: when set, OpenAI endpoints require ``Authorization: Bearer <key>`` and Anthropic
            endpoints require ``x-api-key: <key>`` (or the bearer header, which recent Anthropic
            SDKs send instead).
        reply: fixed answer text; when unset the answer echoes the last user message.
        chunks: number of stream content chunks, which is also the output token count.
        chunk_delay_ms: wait between stream chunks, so that a stream is seen arriving.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    api_key: str | None = None
    reply: str | None = None
    chunks: int = 20
    chunk_delay_ms: float = 0

    def __post_init__(self) -> None:
        if not 1 <= self.chunks <= MAX_CHUNKS:
            raise ValueError(f"chunks must be between 1 and {MAX_CHUNKS}")
        if not self.chunk_delay_ms >= 0:
            raise ValueError("chunk_delay_ms must not be negative")


class ApiError(Exception):
    """The request cannot be served; answered with ``status`` in the called API's error shape."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(slots=True)
class Call:
    """One request as the endpoint handlers see it: its JSON body and the configuration."""

    request: web.Request
    config: DemoConfig
    api: Api
    body: Any


@dataclass(slots=True)
class JsonAnswer:
    payload: Any
    headers: dict[str, str]


@dataclass(slots=True)
class StreamAnswer:
    """A server-sent event stream: ``head``, then each content piece, then ``tail``."""

    head: Sequence[bytes]
    pieces: Sequence[bytes]
    tail: Sequence[bytes]
    headers: dict[str, str]


Answer = JsonAnswer | StreamAnswer
Handler = Callable[[Call], Answer]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_dumps(payload).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _request_id_headers(api: Api) -> dict[str, str]:
    rid = "req_" + secrets.token_hex(12)
    return {"request-id": rid} if api == "anthropic" else {"x-request-id": rid}


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


@functools.lru_cache(maxsize=512)
def split(answer: str, chunks: int) -> tuple[str, ...]:
    """Split ``answer`` into exactly ``chunks`` equal, non-empty slices (padding with spaces)."""
    if len(answer) < chunks:
        answer = answer.ljust(chunks)
    size = len(answer)
    return tuple(answer[i * size // chunks : (i + 1) * size // chunks] for i in range(chunks))


def _split_upto(text: str, chunks: int) -> tuple[str, ...]:
    """Split ``text`` into ``min(chunks, len(text))`` non-empty slices, without padding."""
    return split(text, max(1, min(chunks, len(text))))


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type") == "tool_result":
                    parts.append(_text_of(part.get("content")))
        return "\n".join(p for p in parts if p)
    return ""


def _item_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "content" in item:
            return _text_of(item["content"])
        output = item.get("output")
        if isinstance(output, str):
            return output
    return ""


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _item_text(message)
    return _item_text(messages[-1]) if messages else ""


def _answer(config: DemoConfig, user_text: str) -> str:
    if config.reply is not None:
        return config.reply
    return ("Echo: " + user_text)[:_ECHO_LIMIT]


def _joined(pieces: Sequence[str]) -> str:
    return "\n".join(p for p in pieces if p)


def _require(body: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is None:
        raise ApiError(f"Missing required parameter: '{name}'.")
    if not isinstance(value, kind):
        raise ApiError(f"Invalid type for '{name}'.")
    return value


def _model(body: Any) -> str:
    model = _require(body, "model", str)
    assert isinstance(model, str)
    return model


def _placeholder(schema: Any) -> Any:
    """A value that fits a JSON schema well enough for a made-up tool call."""
    if not isinstance(schema, dict):
        return "mock"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {name: _placeholder(sub) for name, sub in props.items()}
    if kind == "array":
        return [_placeholder(schema.get("items"))]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "mock"


@functools.lru_cache(maxsize=4096)
def _embedding(text: str) -> tuple[float, ...]:
    """A deterministic unit vector of 8 float32-exact values."""
    digest = hashlib.blake2b(text.encode(), digest_size=2 * _EMBEDDING_DIMENSIONS).digest()
    raw = [int.from_bytes(digest[i : i + 2], "little") / 32767.5 - 1.0 for i in range(0, 16, 2)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    fmt = f"<{_EMBEDDING_DIMENSIONS}f"
    return struct.unpack(fmt, struct.pack(fmt, *(v / norm for v in raw)))


# SSE templates: a payload is serialised once with a sentinel, and each piece of the answer is
# then spliced in with one small json.dumps call.
_SENTINEL = "\x00opulon-piece\x00"
_SENTINEL_JSON = json.dumps(_SENTINEL)

_Template = tuple[bytes, bytes]


def _template(payload: Any, event: str | None = None) -> _Template:
    head, tail = _dumps(payload).split(_SENTINEL_JSON)
    prefix = f"event: {event}\ndata: " if event else "data: "
    return (prefix + head).encode(), (tail + "\n\n").encode()


def _fill(template: _Template, piece: str) -> bytes:
    return template[0] + json.dumps(piece).encode() + template[1]


def _sse(payload: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\ndata: " if event else "data: "
    return (prefix + _dumps(payload) + "\n\n").encode()


_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# Errors in each API's shape
# --------------------------------------------------------------------------------------------

# status -> (type, code) of OpenAI's error object, and the type of Anthropic's.
_OPENAI_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
}
_ANTHROPIC_KINDS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
}


def error_response(
    api: Api,
    status: int,
    message: str,
    *,
    kind: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error answer in the called API's shape; ``kind`` and ``code`` name the error type."""
    all_headers = {**(headers or {}), **_request_id_headers(api)}
    if api == "anthropic":
        default = "api_error" if status >= 500 else "invalid_request_error"
        payload: dict[str, Any] = {
            "type": "error",
            "error": {"type": kind or _ANTHROPIC_KINDS.get(status, default), "message": message},
            "request_id": all_headers["request-id"],
        }
    else:
        default_kind, default_code = _OPENAI_KINDS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None)
        )
        payload = {
            "error": {
                "message": message,
                "type": kind or default_kind,
                "param": None,
                "code": code or default_code,
            }
        }
    return json_response(payload, status=status, headers=all_headers)


# --------------------------------------------------------------------------------------------
# OpenAI endpoints
# --------------------------------------------------------------------------------------------


def openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    """A chat completion's ``usage`` object, with every detail OpenAI sends."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(body: Any) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _chat_tool(body: Any, messages: Sequence[Any]) -> tuple[str, str] | None:
    """The (name, arguments JSON) of the tool call to answer with, if any."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or body.get("tool_choice") == "none":
        return None
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "tool":
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")
    ]
    if not functions:
        return None
    chosen = functions[0]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        chosen = next((f for f in functions if f.get("name") == wanted), chosen)
    arguments = _placeholder(chosen.get("parameters") or {"type": "object"})
    return str(chosen["name"]), json.dumps(arguments)


def _chat_completions(call: Call) -> Answer:
    body = call.body
    model = _model(body)
    messages = _require(body, "messages", list)
    cfg = call.config
    prompt_tokens = _tokens(_joined([_item_text(m) for m in messages if isinstance(m, dict)]))
    tool = _chat_tool(body, messages)
    name, arguments = tool or ("", "")
    call_id = "call_" + secrets.token_hex(12)
    if tool is not None:
        pieces = _split_upto(arguments, cfg.chunks)
        finish = "tool_calls"
    else:
        pieces = split(_answer(cfg, _last_user_text(messages)), cfg.chunks)
        finish = "stop"
    completion_tokens = len(pieces)
    cid = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    headers = _request_id_headers("openai")
    if body.get("stream") is not True:
        message: dict[str, Any]
        if tool is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                ],
                "refusal": None,
                "annotations": [],
            }
        else:
            message = {
                "role": "assistant",
                "content": "".join(pieces),
                "refusal": None,
                "annotations": [],
            }
        payload = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": openai_usage(prompt_tokens, completion_tokens),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }
        return JsonAnswer(payload, headers)

    include_usage = _include_usage(body)

    def chunk(delta: Any, finish_reason: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return obj

    if tool is not None:
        first = chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ],
                "refusal": None,
            }
        )
        template = _template(
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": _SENTINEL}}]})
        )
    else:
        first = chunk({"role": "assistant", "content": "", "refusal": None})
        template = _template(chunk({"content": _SENTINEL}))
    tail = [_sse(chunk({}, finish))]
    if include_usage:
        usage_chunk = chunk({})
        usage_chunk["choices"] = []
        usage_chunk["usage"] = openai_usage(prompt_tokens, completion_tokens)
        tail.append(_sse(usage_chunk))
    tail.append(_DONE)
    return StreamAnswer([_sse(first)], [_fill(template, p) for p in pieces], tail, headers)


def _completions(call: Call) -> Answer:
    body = call.body
    model = _model(body)
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = [p for p in prompt if isinstance(p, str)]
    else:
        raise ApiError("Invalid type for 'prompt'.")
    cfg = call.config
    prompt_tokens = _tokens(_joined(prompts))
    pieces = split(_answer(cfg, prompts[-1] if prompts else ""), cfg.chunks)
    cid = "cmpl-" + secrets.token_hex(12)
    created = int(time.time())
    headers = _request_id_headers("openai")
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(pieces),
        "total_tokens": prompt_tokens + len(pieces),
    }
    if body.get("stream") is not True:
        payload = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        return JsonAnswer(payload, headers)

    include_usage = _include_usage(body)

    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return obj

    template = _template(chunk(_SENTINEL))
    tail = [_sse(chunk("", "stop"))]
    if include_usage:
        usage_chunk = chunk("")
        usage_chunk["choices"] = []
        usage_chunk["usage"] = usage
        tail.append(_sse(usage_chunk))
    tail.append(_DONE)
    return StreamAnswer([], [_fill(template, p) for p in pieces], tail, headers)


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _embeddings(call: Call) -> Answer:
    body = call.body
    model = _model(body)
    raw = body.get("input")
    inputs: list[Any]
    if isinstance(raw, str) or _is_token_array(raw):
        inputs = [raw]
    elif (
        isinstance(raw, list) and raw and all(isinstance(v, str) or _is_token_array(v) for v in raw)
    ):
        inputs = raw
    else:
        raise ApiError("'input' must be a string, a list of strings or token arrays.")
    texts = [v for v in inputs if isinstance(v, str)]
    token_arrays = [v for v in inputs if not isinstance(v, str)]
    prompt_tokens = sum(len(v) for v in token_arrays)
    if texts or not token_arrays:
        prompt_tokens += _tokens(_joined(texts))
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, value in enumerate(inputs):
        vector = _embedding(value if isinstance(value, str) else ",".join(map(str, value)))
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if as_base64
            else list(vector)
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    payload = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return JsonAnswer(payload, _request_id_headers("openai"))


def _response_object(
    rid: str,
    created: int,
    model: str,
    body: Any,
    status: str,
    output: list[Any],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _responses(call: Call) -> Answer:
    body = call.body
    model = _model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        texts, user_text = [raw], raw
    elif isinstance(raw, list):
        texts = [_item_text(item) for item in raw]
        user_text = _last_user_text(raw)
    else:
        raise ApiError("Missing required parameter: 'input'.")
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.insert(0, instructions)
    cfg = call.config
    input_tokens = _tokens(_joined(texts))
    pieces = split(_answer(cfg, user_text), cfg.chunks)
    text = "".join(pieces)
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(pieces),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + len(pieces),
    }
    rid = "resp_" + secrets.token_hex(24)
    item_id = "msg_" + secrets.token_hex(24)
    created = int(time.time())
    headers = _request_id_headers("openai")
    part_done = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item_done = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "content": [part_done],
        "role": "assistant",
    }
    if body.get("stream") is not True:
        payload = _response_object(rid, created, model, body, "completed", [item_done], usage)
        return JsonAnswer(payload, headers)

    seq = 0

    def event(name: str, **fields: Any) -> bytes:
        nonlocal seq
        data = _sse({"type": name, "sequence_number": seq, **fields}, name)
        seq += 1
        return data

    pending = _response_object(rid, created, model, body, "in_progress", [], None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    head = [
        event("response.created", response=pending),
        event("response.in_progress", response=pending),
        event(
            "response.output_item.added",
            output_index=0,
            item={**item_done, "status": "in_progress", "content": []},
        ),
        event(
            "response.content_part.added",
            **where,
            part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
        ),
    ]
    deltas = [
        event("response.output_text.delta", **where, delta=piece, logprobs=[]) for piece in pieces
    ]
    done = _response_object(rid, created, model, body, "completed", [item_done], usage)
    tail = [
        event("response.output_text.done", **where, text=text, logprobs=[]),
        event("response.content_part.done", **where, part=part_done),
        event("response.output_item.done", output_index=0, item=item_done),
        event("response.completed", response=done),
    ]
    return StreamAnswer(head, deltas, tail, headers)


def _openai_model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "opulon-mock"}


def _anthropic_model(model_id: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "2024-10-22T00:00:00Z",
    }


def _models(call: Call) -> Answer:
    models = call.config.models
    if call.api == "anthropic":
        payload: dict[str, Any] = {
            "data": [_anthropic_model(m) for m in models],
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
    else:
        payload = {"object": "list", "data": [_openai_model(m) for m in models]}
    return JsonAnswer(payload, _request_id_headers(call.api))


def _model_detail(call: Call) -> Answer:
    model_id = call.request.match_info["model"]
    if model_id not in call.config.models:
        raise ApiError(f"The model '{model_id}' does not exist.", 404)
    payload = _anthropic_model(model_id) if call.api == "anthropic" else _openai_model(model_id)
    return JsonAnswer(payload, _request_id_headers(call.api))


# --------------------------------------------------------------------------------------------
# Anthropic endpoints
# --------------------------------------------------------------------------------------------


def _anthropic_input_tokens(body: Any) -> tuple[list[Any], int]:
    messages = _require(body, "messages", list)
    texts = [_text_of(body.get("system"))]
    texts.extend(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    return messages, _tokens(_joined(texts))


def _anthropic_tool(body: Any, messages: Sequence[Any]) -> tuple[str, str] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return None
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    last = messages[-1] if messages else None
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    ):
        return None
    custom = [t for t in tools if isinstance(t, dict) and t.get("name") and "input_schema" in t]
    if not custom:
        return None
    chosen = custom[0]
    if isinstance(choice, dict) and choice.get("type") == "tool":
        chosen = next((t for t in custom if t.get("name") == choice.get("name")), chosen)
    return str(chosen["name"]), json.dumps(_placeholder(chosen.get("input_schema")))


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _messages(call: Call) -> Answer:
    body = call.body
    model = _model(body)
    messages, input_tokens = _anthropic_input_tokens(body)
    cfg = call.config
    tool = _anthropic_tool(body, messages)
    block: dict[str, Any]
    if tool is not None:
        name, arguments = tool
        pieces = _split_upto(arguments, cfg.chunks)
        tool_id = "toolu_" + secrets.token_hex(12)
        block = {"type": "tool_use", "id": tool_id, "name": name, "input": json.loads(arguments)}
        stop_reason = "tool_use"
    else:
        pieces = split(_answer(cfg, _last_user_text(messages)), cfg.chunks)
        block = {"type": "text", "text": "".join(pieces)}
        stop_reason = "end_turn"
    mid = "msg_" + secrets.token_hex(12)
    headers = _request_id_headers("anthropic")
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(input_tokens, len(pieces)),
    }
    if body.get("stream") is not True:
        return JsonAnswer(message, headers)

    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": _anthropic_usage(input_tokens, 1),
    }
    if tool is not None:
        empty_block: dict[str, Any] = {**block, "input": {}}
        delta: dict[str, Any] = {"type": "input_json_delta", "partial_json": _SENTINEL}
    else:
        empty_block = {"type": "text", "text": ""}
        delta = {"type": "text_delta", "text": _SENTINEL}
    head = [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": empty_block},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    template = _template(
        {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
    )
    tail = [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return StreamAnswer(head, [_fill(template, p) for p in pieces], tail, headers)


def _count_tokens(call: Call) -> Answer:
    _model(call.body)
    _, input_tokens = _anthropic_input_tokens(call.body)
    return JsonAnswer({"input_tokens": input_tokens}, _request_id_headers("anthropic"))


@dataclass(frozen=True, slots=True)
class Route:
    """A route: ``api`` None answers in Anthropic's shape when ``anthropic-version`` is sent."""

    method: str
    path: str
    api: Api | None
    handler: Handler
    json_body: bool = True


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", "openai", _chat_completions),
    Route("POST", "/v1/completions", "openai", _completions),
    Route("POST", "/v1/embeddings", "openai", _embeddings),
    Route("POST", "/v1/responses", "openai", _responses),
    Route("POST", "/v1/messages", "anthropic", _messages),
    Route("POST", "/v1/messages/count_tokens", "anthropic", _count_tokens),
    Route("GET", "/v1/models", None, _models, json_body=False),
    Route("GET", "/v1/models/{model}", None, _model_detail, json_body=False),
)


# --------------------------------------------------------------------------------------------
# The request pipeline
# --------------------------------------------------------------------------------------------


def api_of(route: Route, request: web.Request) -> Api:
    """The API whose shape the answer takes."""
    if route.api is not None:
        return route.api
    return "anthropic" if "anthropic-version" in request.headers else "openai"


def authorized(api: Api, headers: Mapping[str, str], key: str) -> bool:
    """OpenAI style: ``Authorization: Bearer``; Anthropic style: ``x-api-key`` or a bearer token.

    Recent Anthropic SDKs send the API key as a bearer token, so both are accepted there.
    """
    expected = key.encode()
    if api == "anthropic":
        given = headers.get("x-api-key")
        if given is not None and hmac.compare_digest(given.strip().encode(), expected):
            return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


def unauthorized(
    api: Api, headers: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> web.Response:
    """The 401 of each API; OpenAI's echoes the refused key's first characters, as it does."""
    _, _, token = headers.get("authorization", "").partition(" ")
    given = (headers.get("x-api-key") or token).strip()
    message = (
        "invalid x-api-key"
        if api == "anthropic"
        else f"Incorrect API key provided: {given[:8]}****. You can find your API key in "
        "your dashboard."
    )
    return error_response(api, 401, message, headers=extra)


async def read_json(request: web.Request) -> tuple[bytes, Any]:
    """The raw body and the JSON object it holds; :class:`ApiError` when it holds none."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    return raw, body


async def prepare_stream(request: web.Request, headers: Mapping[str, str]) -> web.StreamResponse:
    """Send a stream's head."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **headers,
        }
    )
    await response.prepare(request)
    return response


async def deliver(
    request: web.Request, answer: Answer, chunk_delay_ms: float = 0
) -> web.StreamResponse:
    """Send an answer: a JSON body, or a stream with ``chunk_delay_ms`` between its pieces."""
    if isinstance(answer, JsonAnswer):
        return json_response(answer.payload, headers=answer.headers)
    response = await prepare_stream(request, answer.headers)
    if chunk_delay_ms <= 0:
        await response.write(b"".join((*answer.head, *answer.pieces, *answer.tail)))
    else:
        delay = chunk_delay_ms / 1000
        await response.write(b"".join(answer.head))
        for index, piece in enumerate(answer.pieces):
            if index:
                await asyncio.sleep(delay)
            await response.write(piece)
        await asyncio.sleep(delay)
        await response.write(b"".join(answer.tail))
    await response.write_eof()
    return response


_CONFIG: web.AppKey[DemoConfig] = web.AppKey("opulon_demo_config", DemoConfig)


def _serve(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        config = request.app[_CONFIG]
        api = api_of(route, request)
        if config.api_key is not None and not authorized(api, request.headers, config.api_key):
            await request.read()
            return unauthorized(api, request.headers)
        try:
            body = (await read_json(request))[1] if route.json_body else None
            answer = route.handler(Call(request, config, api, body))
        except ApiError as exc:
            return error_response(api, exc.status, exc.message)
        with contextlib.suppress(ConnectionError):  # the client went away mid-stream
            return await deliver(request, answer, config.chunk_delay_ms)
        return web.Response()

    return serve


def create_demo_app(config: DemoConfig = DemoConfig()) -> web.Application:
    """The provider's aiohttp application for ``config``.

    Serve it with ``handler_cancellation=True`` (as :class:`LoopbackServer` does) so that a
    client going away cancels its handler at once.
    """
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[_CONFIG] = config
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _serve(route))
    return app


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


def check_loopback(host: str) -> None:
    """Refuse any address but a loopback one: the provider accepts whatever it is sent."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the mock provider only listens on loopback addresses, not {host!r}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start_runner(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


class LoopbackServer:
    """Serves an aiohttp application on a loopback port from a thread with its own event loop.

    A context manager: ``with LoopbackServer(app) as server: ...``; port 0 picks a free port,
    and :attr:`url` is the server root.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        check_loopback(host)
        self.app = app
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    def start(self) -> Self:
        """Bind and return once the server is listening."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                runner, self._bound_port = loop.run_until_complete(
                    _start_runner(self.app, self._host, self._port)
                )
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())
                _cancel_remaining(loop)
                loop.close()

        thread = threading.Thread(target=run, name="opulon-mock-provider", daemon=True)
        thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError("the server did not start in time")
        if failure:
            thread.join(_START_TIMEOUT)
            raise failure[0]
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop serving, end open connections and join the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT)
        self._loop = self._thread = None
        self._bound_port = None

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:54321`` (without ``/v1``)."""
        if self._bound_port is None:
            raise RuntimeError("the server is not running")
        return _url(self._host, self._bound_port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class DemoProvider(LoopbackServer):
    """The provider for ``config`` in a background thread: ``with DemoProvider() as p: p.url``."""

    def __init__(
        self, config: DemoConfig = DemoConfig(), host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(create_demo_app(config), host, port)


def serve_in_foreground(app: web.Application, host: str, port: int, name: str) -> None:
    """Serve until Ctrl-C or SIGTERM; prints ``{name} listening on URL`` once bound."""
    check_loopback(host)

    async def serve() -> None:
        runner, bound = await _start_runner(app, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            print(f"{name} listening on {_url(host, bound)}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line options of :class:`DemoConfig` (and of a server address)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=8001, help="port (0 picks a free one)")
    parser.add_argument("--api-key", default=None, help="require this API key")
    parser.add_argument("--chunks", type=int, default=20, help="stream chunks per answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0, help="delay between chunks")
    parser.add_argument("--reply", default=None, help="fixed answer instead of the echo")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m opulon.demo_provider --port 8001``."""
    parser = command_parser(
        "python -m opulon.demo_provider",
        "Serve a mock OpenAI/Anthropic provider on a loopback address (any API key is "
        "accepted unless --api-key is given).",
    )
    args = parser.parse_args(argv)
    try:
        config = DemoConfig(
            api_key=args.api_key,
            reply=args.reply,
            chunks=args.chunks,
            chunk_delay_ms=args.chunk_delay_ms,
        )
        check_loopback(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    serve_in_foreground(create_demo_app(config), args.host, args.port, "Opulon mock provider")


if __name__ == "__main__":
    main()
