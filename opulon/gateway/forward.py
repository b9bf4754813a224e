"""Stage 5, forward: the request as the provider receives it, and what its refusals become.

Headers cross by allow-list (:mod:`opulon.gateway.headers`) plus the operator's provider
key; a stateless route's query keeps only the parameters an API reads. A provider's 429 or
5xx reaches the key holder as the status with the gateway's own words (the provider's name
the operator's organisation and account limits); a 401 or 403 (the operator's provider key
refused) becomes a 502.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from opulon.gateway.errors import ANTHROPIC
from opulon.gateway.exchange import Exchange, Headers, Refused
from opulon.gateway.headers import request_headers, response_headers
from opulon.gateway.parse import BodyStream
from opulon.gateway.rate_limit_headers import RateLimitHeaders
from opulon.gateway.upstream import UpstreamClient
from opulon.provider_probe import ANTHROPIC_VERSION
from opulon.providers import Provider

log = logging.getLogger("opulon.gateway")

_CREDENTIALS_REFUSED = "the gateway's credentials for this provider were refused"
_QUERY_KEEP = frozenset({b"beta"})  # the Anthropic SDK's ?beta=true on beta endpoints

UpstreamBody = bytes | AsyncIterator[bytes] | None


class UpstreamRequest:
    """What goes to the provider."""

    __slots__ = ("data", "headers", "stream", "url")

    def __init__(
        self,
        url: URL,
        headers: list[tuple[str, str]],
        data: UpstreamBody,
        stream: BodyStream | None,
    ) -> None:
        self.url, self.headers, self.data = url, headers, data
        self.stream = stream  # the client's body as it streams through, when not read here

    @property
    def body_done(self) -> asyncio.Event | None:
        return None if self.stream is None else self.stream.done


def upstream_request(x: Exchange, upstream: UpstreamClient, max_body_bytes: int) -> UpstreamRequest:
    """The URL, headers and body of the request to the provider."""
    route, provider, scope = x.route, x.provider, x.scope
    assert route is not None and provider is not None
    headers = request_headers(scope["headers"])
    if route.body == "json" and route.family is None:
        # The body is the gateway's own encoding of what it checked.
        headers = [(n, v) for n, v in headers if n != "content-type"]
        headers.append(("content-type", "application/json"))
    headers.extend(provider.auth_headers())
    headers.append(("accept-encoding", "identity"))
    if provider.kind == ANTHROPIC and not any(n == "anthropic-version" for n, _ in headers):
        headers.append(("anthropic-version", ANTHROPIC_VERSION))
    data: UpstreamBody
    stream = None
    if x.body is not None:
        data = x.body
    else:
        stream = BodyStream(x.receive, max_body_bytes)
        data = stream.chunks()
        if x.content_length is not None:
            headers.append(("content-length", str(x.content_length)))
    query: bytes = scope.get("query_string", b"")
    if query and route.family is None:
        query = _stateless_query(query)
    url = upstream.url(provider.url_for(x.path), query.decode("latin-1"))
    return UpstreamRequest(url, headers, data, stream)


def upstream_refusal(
    x: Exchange, response: aiohttp.ClientResponse, rate_limits: RateLimitHeaders
) -> Refused | None:
    """What the key holder gets instead of a provider's failure; None for any other answer."""
    provider, key = x.provider, x.key
    assert provider is not None and key is not None
    status = response.status
    if status == 429 or status >= 500:
        log.warning("%s provider %s answered HTTP %d", key.prefix, provider.name, status)
        extra = [(n, v) for n, v in response_headers(response.raw_headers) if n != b"content-type"]
        assert x.route is not None
        extra.extend(rate_limits.for_key(key.id, anthropic=x.route.api == ANTHROPIC))
        if status == 429:
            message = (
                f"the provider {provider.name!r} is limiting this gateway's requests; retry shortly"
            )
            return Refused(429, message, "provider_rate_limited", extra)
        return Refused(
            status, f"the provider {provider.name!r} failed (HTTP {status})", None, extra
        )
    if status in (401, 403):
        # The upstream refused the operator's provider key, not the key holder's: nothing of
        # its answer (which may echo the provider key's prefix) is passed on.
        log.warning(
            "%s provider %s refused the gateway's credentials (HTTP %d)",
            key.prefix,
            provider.name,
            status,
        )
        return Refused(502, _CREDENTIALS_REFUSED, "provider_credentials_refused")
    return None


def answer_headers(
    x: Exchange, response: aiohttp.ClientResponse, rate_limits: RateLimitHeaders
) -> Headers:
    """The provider's answer headers that cross to the client, with the key's rate limits."""
    assert x.key is not None and x.route is not None
    headers = response_headers(response.raw_headers)
    headers.extend(rate_limits.for_key(x.key.id, anthropic=x.route.api == ANTHROPIC))
    return headers


def unreachable(provider: Provider) -> str:
    return f"the provider {provider.name!r} could not be reached or failed mid-answer"


def too_late(provider: Provider) -> str:
    return f"the provider {provider.name!r} did not answer in time"


def _stateless_query(query: bytes) -> bytes:
    """The query parameters a stateless route forwards: the few an API reads, no others."""
    return b"&".join(part for part in query.split(b"&") if part.partition(b"=")[0] in _QUERY_KEEP)
