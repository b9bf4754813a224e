"""Which headers cross the gateway, in each direction: allow-lists, nothing else.

Towards the provider the request carries the operator's credential, so a key holder's headers
must not choose the operator's organisation or project (``OpenAI-Organization``,
``OpenAI-Project``), nor pass on anything about the client (addresses, cookies, the SDKs'
``x-stainless-*`` telemetry on the client's OS, runtime and retry count, which no API needs).
Forwarded are only the headers the APIs read:

- ``content-type``: the body's format (with the multipart boundary);
- ``accept``: JSON or an event stream;
- ``anthropic-version`` and ``anthropic-beta``: the Messages API's version and opt-in features;
- ``openai-beta``: the OpenAI API's opt-in features (the Assistants API needs it);
- ``idempotency-key``: lets a provider drop a retried duplicate.

Back to the key holder go only what a client needs to read the answer and to retry: the
content type and disposition, the provider's request id (``x-request-id``, ``request-id``), and
its retry advice (``retry-after``, ``retry-after-ms``, ``x-should-retry``). Never the
provider's organisation, project or account rate limits (``openai-organization``,
``openai-project``, ``anthropic-organization-id``, ``x-ratelimit-*``,
``anthropic-ratelimit-*``: the gateway sends the key's own limits), cookies, or server identity.
"""

from __future__ import annotations

REQUEST_HEADERS: frozenset[bytes] = frozenset(
    {
        b"content-type",
        b"accept",
        b"anthropic-version",
        b"anthropic-beta",
        b"openai-beta",
        b"idempotency-key",
    }
)

RESPONSE_HEADERS: frozenset[bytes] = frozenset(
    {
        b"content-type",
        b"content-disposition",
        b"x-request-id",
        b"request-id",
        b"retry-after",
        b"retry-after-ms",
        b"x-should-retry",
    }
)


def request_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's headers that may go upstream (names lower-cased, as ASGI gives them)."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name in REQUEST_HEADERS
    ]


def response_headers(raw_headers: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """The provider's response headers that may reach the key holder (names lower-cased)."""
    return [
        (lowered, value)
        for name, value in raw_headers
        if (lowered := name.lower()) in RESPONSE_HEADERS
    ]
