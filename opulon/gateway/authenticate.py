"""Stage 2, authenticate: the request's ``op-ul-`` key, or a 401 that says what is wrong."""

from __future__ import annotations

from opulon.gateway.exchange import Exchange, Refused
from opulon.keys import Refusal, malformed_reason
from opulon.runtime import Runtime

_MISSING = "missing API key: send it as 'Authorization: Bearer op-ul-...' or 'x-api-key'"


async def authenticate(runtime: Runtime, x: Exchange) -> Refused | None:
    """Sets ``x.key`` to the key's record, or refuses the request."""
    if not x.raw_key:
        return Refused(401, _MISSING)
    text = x.raw_key.decode("latin-1")
    key = await runtime.authenticate(text)
    if key is Refusal.MALFORMED:
        return Refused(401, malformed_reason(text))
    if isinstance(key, Refusal):
        return Refused(401, key.value)
    x.key = key
    return None
