"""Stage 4, admit: reserve the request's expected cost against every limit of its key.

The expected input is estimated from the body; the expected output is what the request
asks for (times its number of answers) or, where it names no cap, the gateway's default,
lowered to the room the limits have left and written into the request as its cap.
"""

from __future__ import annotations

import msgspec

from opulon.gateway.errors import ANTHROPIC
from opulon.gateway.exchange import Exchange, Refused
from opulon.gateway.rate_limit_headers import RateLimitHeaders
from opulon.limiter import Refusal as LimitRefusal
from opulon.limiter_redis import SharedLimiterUnavailable
from opulon.limits import Usage
from opulon.runtime import Runtime
from opulon.usage_extract import (
    estimate_input_tokens,
    requested_choices,
    requested_output_tokens,
)

_LIMITER_DOWN = (
    "the gateway cannot check this key's limits right now (its shared limiter does not "
    "answer); try again shortly"
)

# Where the gateway caps a generating request's output, for each API.
_OUTPUT_CAP_FIELDS: dict[str, str] = {
    "chat": "max_completion_tokens",
    "completions": "max_tokens",
    "responses": "max_output_tokens",
}


def expect_input(x: Exchange) -> None:
    """Estimate the request's input tokens from the body as the client sent it."""
    route, body = x.route, x.body
    assert route is not None
    if body and route.body == "json" and route.endpoint != "count_tokens":
        x.expected_in = estimate_input_tokens(body)


def expect_output(x: Exchange, default_output_tokens: int) -> None:
    """Set the output the request may use, and the cap it gets where it names none."""
    route, payload = x.route, x.payload
    assert route is not None
    if route.generates and payload is not None:
        # Each of several answers (n, best_of) may use the whole output cap.
        x.choices = requested_choices(route.endpoint, payload)
        asked = requested_output_tokens(route.endpoint, payload)
        if asked is None:
            x.expected_out = default_output_tokens * x.choices
            x.cap_field = _OUTPUT_CAP_FIELDS.get(route.endpoint)
        else:
            x.expected_out = asked * x.choices


async def admit(runtime: Runtime, headers: RateLimitHeaders, x: Exchange) -> Refused | None:
    """Sets ``x.ticket`` (the reservation), or refuses the request with 429 or 400."""
    key = x.key
    assert key is not None
    try:
        ticket = await runtime.admit(
            key.id,
            Usage(1, x.expected_in, x.expected_out),
            flexible_output=x.cap_field is not None,
        )
    except SharedLimiterUnavailable:
        # No exact admission without the shared counts: refuse, and let the client retry.
        return Refused(503, _LIMITER_DOWN, "limiter_unavailable", [(b"retry-after", b"1")])
    if isinstance(ticket, LimitRefusal):
        return _limit_refusal(headers, x, ticket)
    x.ticket = ticket
    if x.cap_field is not None and ticket.reserved.output_tokens < x.expected_out:
        # Less room than a default reservation: the answer may use what remains, no more.
        assert x.payload is not None
        x.payload[x.cap_field] = max(1, ticket.reserved.output_tokens // x.choices)
        x.body = msgspec.json.encode(x.payload)
    return None


def _limit_refusal(headers: RateLimitHeaders, x: Exchange, refusal: LimitRefusal) -> Refused:
    if refusal.too_large:
        # Waiting never helps, so not 429: the SDKs would retry it.
        return Refused(400, refusal.message, "request_exceeds_limit")
    assert x.key is not None and x.route is not None
    extra = headers.for_key(x.key.id, anthropic=x.route.api == ANTHROPIC, fresh=True)
    if refusal.retry_after is not None:
        seconds = max(1, int(refusal.retry_after + 0.999))
        extra.append((b"retry-after", str(seconds).encode()))
    return Refused(429, refusal.message, headers=extra)
