"""CPU cost of the checks a request meets before it is forwarded (route, headers, body policy).

``.venv/bin/python bench/route_cost.py`` times, in process and on one core, what the route
table, the header allow-list and the stored-state policy add per request, for a typical chat
completion from the OpenAI SDK: the figures to set against the gateway's 120-250 µs per request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import msgspec

from opulon.gateway.headers import request_headers
from opulon.gateway.proxy import _prepare_payload
from opulon.gateway.routes import match
from opulon.providers import Provider

HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 1.99.0"),
    (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"1.99.0"),
    (b"x-stainless-os", b"Linux"),
    (b"x-stainless-arch", b"x64"),
    (b"x-stainless-runtime", b"CPython"),
    (b"x-stainless-runtime-version", b"3.11.2"),
    (b"authorization", b"Bearer op-ul-xxxxxxxxxx" + b"y" * 40),
    (b"x-stainless-async", b"false"),
    (b"x-stainless-retry-count", b"0"),
    (b"x-stainless-read-timeout", b"600"),
    (b"content-length", b"180"),
]
BODY = json.dumps(
    {
        "model": "bench-json",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant." * 4},
            {"role": "user", "content": "Write a haiku about gateways. " * 10},
        ],
        "max_tokens": 64,
    }
).encode()
PROVIDER = Provider(1, "bench", "openai", "http://127.0.0.1:1", "k", ("bench-*",))


def _time(name: str, work: Callable[[], object], rounds: int = 200_000) -> None:
    for _ in range(rounds // 10):
        work()
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            work()
        best = min(best, (time.process_time() - started) / rounds)
    print(f"{name:<44} {best * 1e6:6.2f} µs")


def main() -> None:
    decode = msgspec.json.Decoder().decode
    route = match("POST", b"/v1/chat/completions")
    assert not isinstance(route, type(None))
    chat = route.route  # type: ignore[union-attr]
    print(f"body of {len(BODY)} bytes, {len(HEADERS)} request headers")
    _time("route table: POST /v1/chat/completions", lambda: match("POST", b"/v1/chat/completions"))
    _time("route table: a family path (canonicalised)", lambda: match("GET", b"/v1/files/f-1"))
    _time("request headers by allow-list", lambda: request_headers(HEADERS))
    _time("body policy (stored state, stream fields)",
          lambda: _prepare_payload(chat, decode(BODY), BODY, PROVIDER))  # fmt: skip
    _time("  of which: decoding the body (for scale)", lambda: decode(BODY))


if __name__ == "__main__":
    main()
