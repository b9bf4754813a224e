"""Stage 7, settle and record: charge what the request used, keep its metadata.

The reservation made at admission is replaced by the tokens the answer reported (or an
estimate); one usage row of metadata is kept (key, time, model, status, latency, tokens),
never anything of the request or the answer.
"""

from __future__ import annotations

import time

from opulon.gateway.exchange import Exchange
from opulon.gateway.request_log import RequestLog
from opulon.limits import Usage
from opulon.runtime import Runtime
from opulon.usage import UsageRow
from opulon.usage_extract import TokenCount

# No answer uses more; a provider's (or a broken one's) larger count is cut to it, so that no
# sum of rows can overflow the store's 64-bit integers.
MAX_TOKENS_PER_REQUEST = 2**40


def charged_tokens(x: Exchange) -> TokenCount:
    """The tokens to charge: as reported, else as seen, at least what was surely billed."""
    tokens = x.tracker.count if x.tracker is not None else x.tokens or TokenCount()
    if not tokens.reported:
        ticket = x.ticket
        if x.status == 499 and x.sent and ticket is not None:
            # The client left after the provider had the request: it may bill all of it
            # (hidden reasoning included), so the reservation is charged whole.
            tokens.input_tokens = max(tokens.input_tokens, x.expected_in)
            tokens.output_tokens = max(tokens.output_tokens, ticket.reserved.output_tokens)
        elif x.answered:
            # A stream the upstream cut short, or an answer without usage (speech, images):
            # charge at least the input that was reserved.
            tokens.input_tokens = max(tokens.input_tokens, x.expected_in)
    tokens.input_tokens = min(tokens.input_tokens, MAX_TOKENS_PER_REQUEST)
    tokens.output_tokens = min(tokens.output_tokens, MAX_TOKENS_PER_REQUEST)
    return tokens


async def settle(runtime: Runtime, request_log: RequestLog | None, x: Exchange) -> None:
    """Settle the request's reservation and record its usage row and log line."""
    key, ticket = x.key, x.ticket
    assert key is not None and ticket is not None
    tokens = charged_tokens(x)
    latency_ms = round((time.perf_counter() - x.started) * 1000, 3)
    try:
        await runtime.settle(ticket, Usage(1, tokens.input_tokens, tokens.output_tokens))
    finally:
        # The row is the request's record whatever became of its settlement.
        _record(runtime, request_log, x, latency_ms, tokens)


def _record(
    runtime: Runtime,
    request_log: RequestLog | None,
    x: Exchange,
    latency_ms: float,
    tokens: TokenCount,
) -> None:
    key = x.key
    assert key is not None
    runtime.record(
        UsageRow(
            key.id,
            key.prefix,
            x.ts,
            x.model,
            x.status,
            latency_ms,
            tokens.input_tokens,
            tokens.output_tokens,
        )
    )
    if request_log is not None:
        request_log.add(
            key.prefix,
            x.log_path,
            x.model,
            x.status,
            latency_ms,
            tokens.input_tokens,
            tokens.output_tokens,
        )
