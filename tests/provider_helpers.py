"""Clients and request bodies for the tests of the demo provider and the mock provider."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import anthropic
import httpx
import openai

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


class Served(Protocol):
    @property
    def url(self) -> str: ...


def oai(provider: Served, api_key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=provider.url + "/v1", api_key=api_key, max_retries=0, timeout=5)


def ant(provider: Served, api_key: str = "sk-ant-test") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=provider.url, api_key=api_key, max_retries=0, timeout=5)


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
    headers: dict[str, str] | None = None,
    timeout: httpx.Timeout = TIMEOUT,
) -> tuple[list[str], BaseException | None]:
    """POST and read a stream line by line; returns the lines and the error that ended it."""
    lines: list[str] = []
    with httpx.Client(timeout=timeout) as client:
        try:
            with client.stream("POST", url, json=body, headers=headers or {}) as response:
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
