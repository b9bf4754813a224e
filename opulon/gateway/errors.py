"""Error bodies in the shape of the API that was called.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``.
Anthropic: ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import json

OPENAI = "openai"
ANTHROPIC = "anthropic"

_OPENAI_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "model_not_allowed"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    499: ("client_closed_request", None),
    502: ("upstream_error", "bad_gateway"),
    504: ("upstream_error", "gateway_timeout"),
}

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    504: "timeout_error",
}


def error_body(flavor: str, status: int, message: str, *, code: str | None = None) -> bytes:
    """The JSON error body for ``status`` in the called API's shape."""
    if flavor == ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    kind, default_code = _OPENAI_TYPES.get(status, ("api_error", None))
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code or default_code}}
    ).encode()


def stream_error_event(flavor: str, status: int, message: str) -> bytes:
    """An SSE event telling a client, mid-stream, that the upstream failed."""
    body = error_body(flavor, status, message)
    if flavor == ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"
