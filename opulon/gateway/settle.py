"""Stage 7, settle and record: charge what the request used, keep its metadata.

One usage row of metadata is kept (key, time, model, status, latency, tokens), never
anything of the request or the answer: just before the answer's last bytes go out
(:func:`keep_usage`, through :meth:`Exchange.send_last
<opulon.gateway.exchange.Exchange.send_last>`), so that it is on disk for every answer that
reached its client in full, else when the request ends. Then the reservation made at
admission is replaced by the row's tokens (those the answer reported, or an estimate).
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
    """Record the request's usage row and log line (unless kept already), then settle its
    reservation with the row's tokens.

    The row comes first: a settlement that Redis takes for a reservation it lost (it
    restarted) counts the request anew, and a rebuild from the stored rows that ran in
    between counts it as well, so the rare race errs on the side of a stricter limit.
    """
    ticket = x.ticket
    assert ticket is not None
    x.finish = None
    row = x.row or keep_usage(runtime, request_log, x)
    await runtime.settle(ticket, Usage(1, row.input_tokens, row.output_tokens))


def keep_usage(runtime: Runtime, request_log: RequestLog | None, x: Exchange) -> UsageRow:
    """Record the request's usage row (on disk when this returns) and its log line."""
    key = x.key
    assert key is not None
    tokens = charged_tokens(x)
    latency_ms = round((time.perf_counter() - x.started) * 1000, 3)
    row = x.row = UsageRow(
        key.id,
        key.prefix,
        x.ts,
        x.model,
        x.status,
        latency_ms,
        tokens.input_tokens,
        tokens.output_tokens,
    )
    runtime.record(row)
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
    return row
