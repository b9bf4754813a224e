"""``GET /v1/models`` and ``/v1/models/{id}``, answered by the gateway itself.

Each API lists its own kind of provider (Anthropic clients the anthropic providers, every
other client the OpenAI-compatible ones), and only the models the key may use. A provider
whose model patterns are all concrete names is listed from them; the others are asked once a
minute (:func:`~opulon.provider_probe.probe`), and their answers filtered by the patterns.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import unquote

import httpx

from opulon.gateway.errors import ANTHROPIC
from opulon.gateway.exchange import Exchange, Refused
from opulon.gateway.parse import model_refusal
from opulon.provider_probe import client as probe_client
from opulon.provider_probe import probe
from opulon.providers import Provider
from opulon.runtime import Runtime

log = logging.getLogger("opulon.gateway")

_CACHE_SECONDS = 60.0
_PROBE_TIMEOUT = 10.0
_ITEM_PREFIX = "/v1/models/"


class ModelListing:
    """The models of every provider, each provider's own list cached for a minute."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._cache: dict[str, tuple[float, list[str]]] = {}
        # Not the proxy's pool: the listing is rare, and keeps no cookies of any provider.
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def answer(self, x: Exchange) -> bytes | Refused:
        """The JSON document of a listing or of one model, in the client's API's shape."""
        key = x.key
        assert key is not None
        flavor = x.flavor
        models: dict[str, str] = {}
        wanted = unquote(x.path[len(_ITEM_PREFIX) :]) if x.path.startswith(_ITEM_PREFIX) else None
        if wanted is not None:
            provider = None
            if model_refusal(wanted) is None and key.allows_model(wanted):
                provider = self._runtime.provider_for(wanted, flavor)
            if provider is None:
                return Refused(404, f"the model {wanted!r} is not available to this API key")
            models[wanted] = provider.name
        else:
            for provider in self._runtime.providers:
                if provider.kind != flavor:
                    continue
                for model_id in await self._provider_models(provider):
                    if provider.serves(model_id) and key.allows_model(model_id):
                        models.setdefault(model_id, provider.name)
        document = _anthropic(models, wanted) if flavor == ANTHROPIC else _openai(models, wanted)
        return json.dumps(document).encode()

    async def _provider_models(self, provider: Provider) -> list[str]:
        """A provider's model ids: its concrete patterns, plus its own list where it has one."""
        concrete = [p for p in provider.models if not any(ch in p for ch in "*?[")]
        if provider.models and len(concrete) == len(provider.models):
            return concrete
        cached = self._cache.get(provider.name)
        now = time.monotonic()
        if cached and now - cached[0] < _CACHE_SECONDS:
            return cached[1]
        if self._client is None:
            self._client = probe_client()
        result = await probe(provider, self._client, timeout=_PROBE_TIMEOUT)
        if not result.ok:
            log.warning("could not list the models of provider %s", provider.name)
        ids = list(dict.fromkeys([*concrete, *result.models]))
        self._cache[provider.name] = (now, ids)
        return ids


def _anthropic(models: dict[str, str], wanted: str | None) -> dict[str, Any]:
    items = [
        {"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
        for m in models
    ]
    if wanted:
        return items[0]
    return {
        "data": items,
        "has_more": False,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }


def _openai(models: dict[str, str], wanted: str | None) -> dict[str, Any]:
    objects = [
        {"id": m, "object": "model", "created": 0, "owned_by": owner} for m, owner in models.items()
    ]
    return objects[0] if wanted else {"object": "list", "data": objects}
