"""The proxy for ``/v1/...``: its stages, in order.

1. parse (:mod:`~opulon.gateway.parse`): the headers, and once routed the body;
2. authenticate (:mod:`~opulon.gateway.authenticate`): the ``op-ul-`` key;
3. route (:mod:`~opulon.gateway.routing`): the route of the table, the provider, the body
   checked and re-encoded;
4. admit (:mod:`~opulon.gateway.admit`): the expected cost reserved against the key's limits;
5. forward (:mod:`~opulon.gateway.forward`): the request as the provider receives it;
6. relay (:mod:`~opulon.gateway.relay`): the answer as it arrives;
7. settle and record (:mod:`~opulon.gateway.settle`): the usage charged and its metadata kept.

Each stage reads and fills one :class:`~opulon.gateway.exchange.Exchange`; a stage that
refuses returns the refusal, and :meth:`Proxy.refuse` alone turns it into the API's error.
A raw ASGI application: the hot path carries no framework layers it does not use. Request and
response bodies live in memory only while in transit; nothing here writes them anywhere,
logs them or puts them in an error message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import aiohttp

from opulon.gateway.admit import admit, expect_input, expect_output
from opulon.gateway.authenticate import authenticate
from opulon.gateway.errors import error_body, stream_error_event
from opulon.gateway.exchange import Exchange, Message, Receive, Refused, Scope, Send
from opulon.gateway.forward import (
    UpstreamRequest,
    answer_headers,
    too_late,
    unreachable,
    upstream_refusal,
    upstream_request,
)
from opulon.gateway.models import ModelListing
from opulon.gateway.parse import ClientGone, TooLarge, parse_head, read_request
from opulon.gateway.rate_limit_headers import RateLimitHeaders
from opulon.gateway.relay import end_stream, relay
from opulon.gateway.request_log import RequestLog
from opulon.gateway.routing import check_payload, choose_provider, is_models_route, match_route
from opulon.gateway.settle import keep_usage, settle
from opulon.gateway.upstream import UpstreamClient
from opulon.gateway.watchdog import Watchdog
from opulon.runtime import SUMMARY_MAX_AGE, Runtime

__all__ = ["Message", "Proxy", "Receive", "Scope", "Send"]

log = logging.getLogger("opulon.gateway")


class Proxy:
    """ASGI app for every ``/v1/...`` path."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.gateway
        self.upstream = UpstreamClient(runtime.gateway.connect_timeout)
        self.rate_limits = RateLimitHeaders(
            runtime.tightest, runtime.clock, max_age=SUMMARY_MAX_AGE
        )
        self.models = ModelListing(runtime)
        self.watchdog = Watchdog()
        self.request_log = RequestLog() if runtime.gateway.log_requests else None

    async def start(self) -> None:
        """Open the upstream connection pool and watch requests (inside the running loop)."""
        await self.upstream.start()
        self.watchdog.start()

    async def close(self) -> None:
        await self.watchdog.close()
        await self.models.close()
        await self.upstream.close()

    # -- the request ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        x = parse_head(scope, receive, send, time.perf_counter(), time.time())
        settings, runtime = self.settings, self.runtime
        refusal = await authenticate(runtime, x) or match_route(x, settings.max_body_bytes)
        if refusal is None and is_models_route(x):
            listing = await self.models.answer(x)
            if isinstance(listing, bytes):
                await _send_json(send, listing)
                return
            refusal = listing
        if refusal is None:
            refusal = await read_request(x, settings.max_body_bytes)
            if x.gone:
                return
        if refusal is None:
            refusal = choose_provider(runtime, x)
        if refusal is None:
            expect_input(x)
            refusal = check_payload(x)
        if refusal is None:
            expect_output(x, settings.default_output_tokens)
            refusal = await admit(runtime, self.rate_limits, x)
        if refusal is not None:
            await self.refuse(x, refusal)
            return
        x.finish = partial(keep_usage, runtime, self.request_log, x)
        try:
            refusal = await self._exchange(x)
            if refusal is not None:
                await self.refuse(x, refusal)
            if x.gone:
                x.status = 499
        finally:
            await settle(runtime, self.request_log, x)

    async def refuse(self, x: Exchange, refusal: Refused) -> None:
        """Answer with the gateway's own error, in the API's shape: the one place that does."""
        if x.ticket is not None:
            x.status = refusal.status  # settle() records it, even if the client is gone
        headers = [(b"content-type", b"application/json")]
        if refusal.headers:
            headers.extend(refusal.headers)
        await x.send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        body = error_body(x.flavor, refusal.status, refusal.message, code=refusal.code)
        await x.send_last({"type": "http.response.body", "body": body})
        if x.ticket is None and self.request_log is not None:
            latency_ms = (time.perf_counter() - x.started) * 1000
            self.request_log.add(x.prefix, x.log_path, x.model, refusal.status, latency_ms, 0, 0)

    async def _exchange(self, x: Exchange) -> Refused | None:
        """Forward the admitted request and relay the answer; a refusal not yet sent, or None."""
        provider = x.provider
        assert provider is not None
        settings = self.settings
        request = upstream_request(x, self.upstream, settings.max_body_bytes)
        timeout = settings.stream_idle_timeout if x.stream else settings.read_timeout
        flight = self.watchdog.enter(x.receive, request.body_done, x.started, timeout)
        try:
            try:
                x.sent = True  # from here on the provider may be working on it
                response = await self.upstream.send(
                    x.method, request.url, request.headers, request.data
                )
                flight.progress += 1
                try:
                    refusal = upstream_refusal(x, response, self.rate_limits)
                    if refusal is not None:
                        return refusal
                    await relay(x, response, answer_headers(x, response, self.rate_limits), flight)
                finally:
                    response.release()
            except TooLarge:
                x.status = 413
                return None if x.response_started else Refused(413, "request body too large")
            except (TimeoutError, aiohttp.ServerTimeoutError):  # connecting took too long
                return await self._failed(x, 504, too_late(provider))
            except (aiohttp.ClientError, OSError) as exc:
                return await self._broken(x, request, exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            if flight.gone:
                # The client went away: the upstream request was cancelled with this task.
                task.uncancel()
                x.status = 499
            elif flight.timed_out:
                # The upstream fell silent for longer than the timeout allows.
                task.uncancel()
                return await self._failed(x, 504, too_late(provider))
            else:
                raise
        finally:
            await self.watchdog.leave(flight)
            x.gone = flight.gone
        return None

    async def _broken(
        self, x: Exchange, request: UpstreamRequest, exc: BaseException
    ) -> Refused | None:
        """The connection to the provider failed: because of the client's body, or not."""
        failure = request.stream.failure if request.stream is not None else None
        if isinstance(failure, TooLarge):
            x.status = 413
            limit = self.settings.max_body_bytes
            return Refused(413, f"request body too large: at most {limit} bytes")
        if isinstance(failure, ClientGone):
            x.status = 499  # the client left while uploading
            return None
        provider = x.provider
        assert provider is not None
        log.warning("%s upstream %s failed: %s", x.prefix, provider.name, type(exc).__name__)
        return await self._failed(x, 502, unreachable(provider))

    async def _failed(self, x: Exchange, status: int, message: str) -> Refused | None:
        """An upstream failure: a refusal before the answer began, an error event within it."""
        x.status = status
        if not x.response_started:
            return Refused(status, message)
        if x.tracker is None:
            # Audio or a file, its length already sent: no event can follow; the server
            # closes the connection, and the client sees the answer cut short.
            return None
        await end_stream(x, stream_error_event(x.flavor, status, message))
        return None


async def _send_json(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
