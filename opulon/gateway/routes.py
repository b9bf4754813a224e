"""The route table of ``/v1``: what a key may reach at a provider, deny by default.

Every key holder's request reaches the provider with the operator's credential, so the
gateway forwards only what it knows to be safe to share: the stateless inference APIs.
Stateful provider APIs (files, batches, stored responses, the organisation's admin API, ...)
hold objects that every key routed to the same provider account could read, change or
delete; they are refused unless the operator turns a family on for a provider.

A request path is checked before anything is read or forwarded: dot segments, empty segments,
backslashes, control characters and encoded separators (``%2e``, ``%2f``, ``%5c``, ``%00``)
are refused, so an upstream that normalises paths never sees a route outside this table. The
upstream receives the canonical path built here, never the client's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote_to_bytes

from opulon.providers import FAMILIES
from opulon.usage_extract import Endpoint

Api = Literal["openai", "anthropic", "either"]
BodyKind = Literal["json", "multipart", "none"]
Relay = Literal["json", "raw"]

# The first path segment after /v1 of each stateful family.
_FAMILY_OF_SEGMENT: dict[str, str] = {
    "files": "files",
    "uploads": "uploads",
    "batches": "batches",
    "fine_tuning": "fine_tuning",
    "fine-tunes": "fine_tuning",
    "assistants": "assistants",
    "threads": "threads",
    "vector_stores": "vector_stores",
    "conversations": "conversations",
    "organization": "admin",
    "organizations": "admin",
    "realtime": "realtime",
    "containers": "containers",
}
_FAMILY_METHODS = frozenset({"GET", "POST", "DELETE"})


@dataclass(frozen=True, slots=True)
class Route:
    """One kind of request the gateway forwards (or answers itself, for ``/v1/models``)."""

    name: str
    api: Api  # the provider kind it goes to; "either": by the client's anthropic-version
    body: BodyKind  # what the gateway reads of the request body
    endpoint: Endpoint  # how usage is read from the answer
    relay: Relay = "json"  # "raw": the answer streams through unread (audio, file content)
    needs_model: bool = True
    family: str | None = None  # a stateful family the provider must allow
    generates: bool = False  # reserves output tokens


@dataclass(frozen=True, slots=True)
class Match:
    """A request's route and the canonical path the upstream receives."""

    route: Route
    path: str  # e.g. "/v1/chat/completions"; starts with /v1


@dataclass(frozen=True, slots=True)
class PathRefusal:
    """Why a path is refused: the HTTP status and a message for the key holder."""

    status: int
    message: str


def _stateless(
    name: str,
    api: Api,
    body: BodyKind,
    endpoint: Endpoint,
    *,
    relay: Relay = "json",
    generates: bool = False,
) -> Route:
    return Route(name, api, body, endpoint, relay=relay, generates=generates)


# (method, path) -> route, for the stateless APIs. Exact paths: a dict look-up per request.
ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/v1/chat/completions"): _stateless(
        "chat completions", "openai", "json", "chat", generates=True
    ),
    ("POST", "/v1/completions"): _stateless(
        "completions", "openai", "json", "completions", generates=True
    ),
    ("POST", "/v1/embeddings"): _stateless("embeddings", "openai", "json", "embeddings"),
    ("POST", "/v1/responses"): _stateless(
        "responses", "openai", "json", "responses", generates=True
    ),
    ("POST", "/v1/moderations"): _stateless("moderations", "openai", "json", "other"),
    ("POST", "/v1/images/generations"): _stateless("image generation", "openai", "json", "other"),
    ("POST", "/v1/images/edits"): _stateless("image edits", "openai", "multipart", "other"),
    ("POST", "/v1/images/variations"): _stateless(
        "image variations", "openai", "multipart", "other"
    ),
    ("POST", "/v1/audio/speech"): _stateless("speech", "openai", "json", "other", relay="raw"),
    ("POST", "/v1/audio/transcriptions"): _stateless(
        "transcriptions", "openai", "multipart", "other"
    ),
    ("POST", "/v1/audio/translations"): _stateless("translations", "openai", "multipart", "other"),
    ("POST", "/v1/messages"): _stateless(
        "messages", "anthropic", "json", "messages", generates=True
    ),
    ("POST", "/v1/messages/count_tokens"): _stateless(
        "count tokens", "anthropic", "json", "count_tokens"
    ),
    ("GET", "/v1/models"): Route("models", "either", "none", "other", needs_model=False),
}
MODELS_ROUTE = ROUTES[("GET", "/v1/models")]
MODEL_ROUTE = Route("model", "either", "none", "other", needs_model=False)
_ROUTE_PATHS = frozenset(path for _, path in ROUTES)
_MATCHES = {(method, path.encode()): Match(route, path) for (method, path), route in ROUTES.items()}


def _family_route(family: str, body: BodyKind) -> Route:
    return Route(family, "either", body, "other", relay="raw", needs_model=False, family=family)


_FAMILY_ROUTES = {
    (family, body): _family_route(family, body) for family in FAMILIES for body in ("json", "none")
}

_SAFE_SEGMENT = "-._~!$&'()*+,;=:@"  # RFC 3986 pchar, less '%' (re-encoded below)


def _segments(raw_path: bytes) -> list[str] | PathRefusal:
    """The decoded segments after ``/v1``, or why the path is refused."""
    bad = PathRefusal(
        400,
        "invalid request path: dot segments, empty segments, backslashes, control characters "
        "and encoded separators are not accepted",
    )
    if not raw_path.startswith(b"/v1/"):
        return bad
    segments: list[str] = []
    for raw in raw_path[4:].split(b"/"):
        if not raw or b"\\" in raw:
            return bad
        decoded = unquote_to_bytes(raw) if b"%" in raw else raw
        if (
            decoded in (b".", b"..")
            or b"/" in decoded
            or b"\\" in decoded
            or any(byte < 0x20 or byte == 0x7F for byte in decoded)
        ):
            return bad
        try:
            segments.append(decoded.decode("utf-8"))
        except UnicodeDecodeError:
            return bad
    return segments


def _canonical(segments: list[str]) -> str:
    return "/v1/" + "/".join(quote(segment, safe=_SAFE_SEGMENT) for segment in segments)


def match(method: str, raw_path: bytes, body: BodyKind = "none") -> Match | PathRefusal:
    """The route of a request, or why it is refused (400 bad path, 404 unknown, 405 method).

    ``body`` is what a stateful route's body holds ("json" when the client sent JSON that the
    gateway should read for its model); the stateless routes know their own.
    """
    found = _MATCHES.get((method, raw_path))
    if found is not None:
        return found
    parts = _segments(raw_path)
    if isinstance(parts, PathRefusal):
        return parts
    path = _canonical(parts)
    route = ROUTES.get((method, path))
    if route is not None:
        return Match(route, path)
    if parts[0] == "models" and len(parts) == 2:
        if method != "GET":
            return PathRefusal(405, f"{method} is not allowed on {path}")
        return Match(MODEL_ROUTE, path)
    family = _FAMILY_OF_SEGMENT.get(parts[0])
    if parts[:2] == ["messages", "batches"]:
        family = "batches"
    elif parts[:2] == ["chat", "completions"] or parts[0] == "responses":
        # Anything on these paths but creating one: stored completions and responses.
        family = "stored"
    if family is None:
        if path in _ROUTE_PATHS:
            return PathRefusal(405, f"{method} is not allowed on {path}")
        return PathRefusal(404, f"{path} is not offered by this gateway")
    if method not in _FAMILY_METHODS:
        return PathRefusal(405, f"{method} is not allowed on {path}")
    return Match(_FAMILY_ROUTES[(family, body if body == "json" else "none")], path)
