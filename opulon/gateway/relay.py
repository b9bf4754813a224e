"""Stage 6, relay: the provider's answer to the client as it arrives.

Event streams pass chunk by chunk through a :class:`~opulon.usage_extract.StreamUsage`,
which reads the usage on the way (and takes out the usage chunk the gateway asked for);
JSON answers are read for usage and sent whole; audio and file contents stream through
unread. With :func:`relay` and the proxy's one error path, these are the only writers to the
client, and each sends an answer's last bytes with :meth:`Exchange.send_last
<opulon.gateway.exchange.Exchange.send_last>`, which keeps the usage row first.
"""

from __future__ import annotations

import aiohttp

from opulon.gateway.exchange import Exchange, Headers, Message
from opulon.gateway.watchdog import Flight
from opulon.usage_extract import StreamUsage, usage_from_body


async def relay(
    x: Exchange, response: aiohttp.ClientResponse, headers: Headers, flight: Flight
) -> None:
    """Send the provider's answer (status, ``headers``, body) to the client."""
    route = x.route
    assert route is not None
    x.status = response.status
    x.answered = 200 <= response.status < 300
    start: Message = {"type": "http.response.start", "status": response.status, "headers": headers}
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        await _relay_stream(x, response, start, flight)
    elif route.relay == "json":
        await _relay_json(x, response, start)
    else:
        await _relay_raw(x, response, start, flight)


async def end_stream(x: Exchange, event: bytes) -> None:
    """Finish an answer the upstream broke off: what is held back, then an error event."""
    held = x.tracker.flush() if x.tracker is not None else b""
    await x.send_last({"type": "http.response.body", "body": held + event, "more_body": False})


async def _relay_stream(
    x: Exchange, response: aiohttp.ClientResponse, start: Message, flight: Flight
) -> None:
    assert x.route is not None
    tracker = x.tracker = StreamUsage(x.route.endpoint, strip_usage_chunk=x.strip_usage)
    send = x.send
    await send(start)
    x.response_started = True
    async for chunk in response.content.iter_any():
        flight.progress += 1
        out = tracker.feed(chunk)
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
    tail = tracker.flush()
    await x.send_last({"type": "http.response.body", "body": tail, "more_body": False})


async def _relay_json(x: Exchange, response: aiohttp.ClientResponse, start: Message) -> None:
    assert x.route is not None
    content = await response.read()
    start["headers"].append((b"content-length", str(len(content)).encode()))
    await x.send(start)
    x.response_started = True
    if response.status < 400:
        tokens = x.tokens = usage_from_body(x.route.endpoint, content)
        if not tokens.reported and x.route.generates:
            # No usage in the body: estimate output from its size.
            tokens.output_tokens = len(content) // 4
    await x.send_last({"type": "http.response.body", "body": content})


async def _relay_raw(
    x: Exchange, response: aiohttp.ClientResponse, start: Message, flight: Flight
) -> None:
    length = response.headers.get("content-length")
    if length is not None:
        start["headers"].append((b"content-length", length.encode("latin-1")))
    await x.send(start)
    x.response_started = True
    async for chunk in response.content.iter_any():
        flight.progress += 1
        await x.send({"type": "http.response.body", "body": chunk, "more_body": True})
    await x.send_last({"type": "http.response.body", "body": b"", "more_body": False})
