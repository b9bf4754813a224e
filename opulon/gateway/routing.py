"""Stage 3, route: which route of the table the request is, which provider serves it, and
whether its body is one the gateway forwards.

The path is matched against :mod:`opulon.gateway.routes` (deny by default); the provider is
the one that serves the named model for the API the client speaks; the JSON body is checked
field by field and re-encoded, so that the provider reads exactly what the gateway checked.
"""

from __future__ import annotations

import msgspec

from opulon.gateway import routes
from opulon.gateway.exchange import NO_MODEL, Exchange, Refused
from opulon.gateway.routes import PathRefusal
from opulon.gateway.stored_state import check_references, check_stored_state
from opulon.runtime import Runtime
from opulon.usage_extract import CHOICE_FIELDS, OUTPUT_CAP_FIELDS

# Every output cap field of any API: malformed ones get 400 wherever they are sent.
_OUTPUT_LIMIT_FIELDS = tuple(dict.fromkeys(f for fs in OUTPUT_CAP_FIELDS.values() for f in fs))
_MAX_CHOICES = 128
# Far above any model's output; keeps every reservation and sum well inside 64-bit integers.
MAX_OUTPUT_TOKENS = 100_000_000
_USAGE_CHUNK_ENDPOINTS = ("chat", "completions")


def match_route(x: Exchange, max_body_bytes: int) -> Refused | None:
    """Sets ``x.route`` and ``x.path`` from the route table, or refuses the path."""
    if x.content_types > 1:
        # The gateway and the provider could read the body by different ones.
        return Refused(400, "the request has more than one Content-Type header")
    wants_json = x.method in ("POST", "PUT", "PATCH") and x.content_type.startswith(
        b"application/json"
    )
    found = routes.match(x.method, x.raw_path, "json" if wants_json else "none")
    if isinstance(found, PathRefusal):
        return Refused(found.status, found.message, "unknown_url" if found.status == 404 else None)
    route = x.route = found.route
    x.path = found.path
    # A stateful family's path holds the client's object ids: the log names the family.
    x.log_path = found.path if route.family is None else f"/v1/({route.family})"
    if route.api != "either":
        x.flavor = route.api
    if x.content_length is not None and x.content_length > max_body_bytes:
        return Refused(413, f"request body too large: at most {max_body_bytes} bytes")
    return None


def is_models_route(x: Exchange) -> bool:
    """``GET /v1/models`` and ``/v1/models/{id}``, which the gateway answers itself."""
    return x.route is routes.MODELS_ROUTE or x.route is routes.MODEL_ROUTE


def choose_provider(runtime: Runtime, x: Exchange) -> Refused | None:
    """Sets ``x.provider``: the provider of the client's API that serves the model."""
    route, key = x.route, x.key
    assert route is not None and key is not None
    named = x.model if x.model != NO_MODEL else None
    if named is not None and not key.allows_model(named):
        return Refused(403, f"this API key may not use the model {named!r}")
    kind = x.flavor if route.api == "either" else route.api
    if route.family is None and named is None:
        return Refused(400, "the request names no 'model'")
    provider = runtime.provider_for(named, kind, route.family)
    if provider is None:
        if route.family is not None:
            return Refused(404, f"{x.path} is not offered by this gateway", "unknown_url")
        return Refused(404, f"the model {named!r} is not served by this gateway")
    x.provider = provider
    return None


def check_payload(x: Exchange) -> Refused | None:
    """Check the JSON body's fields and set ``x.body`` to what goes upstream.

    On the stateless routes that is always msgspec's encoding of the payload the gateway
    checked, never the client's bytes: duplicate keys, escapes and byte order marks read
    one way here and another at the provider are gone.
    """
    payload, route, provider = x.payload, x.route, x.provider
    if payload is None:
        return None
    assert route is not None and provider is not None
    stateless = route.family is None
    refusal = None
    if stateless:
        refusal, _ = check_stored_state(route.endpoint, payload, provider)
    if refusal is None:
        refusal = _field_refusal(route.endpoint, payload)
    if refusal is not None:
        return Refused(400, refusal)
    x.stream = payload.get("stream") is True
    options = payload.get("stream_options")
    if (
        x.stream
        and route.endpoint in _USAGE_CHUNK_ENDPOINTS
        and not (options and options.get("include_usage") is True)
    ):
        # Ask the upstream for its usage chunk, and take it out again on the way back.
        payload["stream_options"] = {**(options or {}), "include_usage": True}
        x.strip_usage = True
    if stateless:
        x.body = msgspec.json.encode(payload)
        refusal = check_references(x.body, payload, provider)
        if refusal is not None:
            return Refused(400, refusal)
    elif x.strip_usage:
        x.body = msgspec.json.encode(payload)
    return None


def _field_refusal(endpoint: str, payload: dict[str, object]) -> str | None:
    for field in _OUTPUT_LIMIT_FIELDS:
        value = payload.get(field)
        if value is not None and (type(value) is not int or not 1 <= value <= MAX_OUTPUT_TOKENS):
            return f"'{field}' must be an integer from 1 to {MAX_OUTPUT_TOKENS}"
    for field in CHOICE_FIELDS.get(endpoint, ()):
        value = payload.get(field)
        if value is not None and (type(value) is not int or not 1 <= value <= _MAX_CHOICES):
            return f"'{field}' must be an integer from 1 to {_MAX_CHOICES}"
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return "'stream' must be true or false"
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return "'stream_options' must be an object"
    return None
