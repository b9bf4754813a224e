"""One cheap call to a provider: list its models.

``opulon providers test`` runs it to check a provider's URL and key, and the gateway's
``/v1/models`` to learn which models a provider has. Over httpx, with the provider's own
key; the answer's model ids are the only thing read from it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from opulon.providers import Provider

#: The Messages API version the gateway speaks when a client names none.
ANTHROPIC_VERSION = "2023-06-01"
_MAX_LISTING_BYTES = 8 * 1024 * 1024


def client() -> httpx.AsyncClient:
    """An HTTP client for probes: no proxy or certificates from the environment, no cookies.

    The probe carries the operator's provider key: it goes where the forwarded requests go
    (aiohttp, which ignores the environment too), and nowhere a redirect points.
    """
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, cookies=jar)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a provider answered to a model listing."""

    status: int | None  # None: no answer (see ``error``)
    latency_ms: float
    models: tuple[str, ...] = ()  # the ids listed, on a 200 answer
    error: str | None = None  # why there is no answer, for a person

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def probe(provider: Provider, client: httpx.AsyncClient, *, timeout: float) -> ProbeResult:
    """List the provider's models; never raises for a network failure or a bad answer."""
    headers = dict(provider.auth_headers())
    if provider.kind == "anthropic":
        headers["anthropic-version"] = ANTHROPIC_VERSION
    started = time.perf_counter()
    try:
        # The whole call within the timeout, not each phase: a trickling answer cannot hold it.
        async with asyncio.timeout(timeout):
            response = await client.get(
                provider.url_for("/v1/models"), headers=headers, timeout=timeout
            )
    except (httpx.TimeoutException, TimeoutError):
        return ProbeResult(None, _since(started), error=f"no answer within {timeout:g}s")
    except httpx.HTTPError as exc:
        return ProbeResult(None, _since(started), error=f"cannot connect ({type(exc).__name__})")
    latency_ms = _since(started)
    models: tuple[str, ...] = ()
    if response.status_code == 200:
        models = _listed(response)
    return ProbeResult(response.status_code, latency_ms, models)


def _listed(response: httpx.Response) -> tuple[str, ...]:
    if len(response.content) > _MAX_LISTING_BYTES:
        return ()
    try:
        document = response.json()
    except (ValueError, RecursionError):
        return ()
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return ()
    ids = (item.get("id") for item in data if isinstance(item, dict))
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, str)))


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
