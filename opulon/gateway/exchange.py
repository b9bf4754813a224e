"""One ``/v1`` request as it passes the stages of the proxy, and the refusal a stage returns.

Every stage reads and fills the one :class:`Exchange` of its request; a stage that refuses
the request returns a :class:`Refused`, which the proxy alone turns into the API's error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from opulon.gateway.errors import OPENAI
from opulon.gateway.routes import Route
from opulon.keys import KeyRecord
from opulon.limiter import Ticket
from opulon.providers import Provider
from opulon.usage import UsageRow
from opulon.usage_extract import StreamUsage, TokenCount

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

NO_MODEL = "-"


@dataclass(frozen=True, slots=True)
class Refused:
    """A request the gateway answers itself with an error, in the called API's shape."""

    status: int
    message: str
    code: str | None = None
    headers: Headers | None = None


class Exchange:
    """The per-request state: what the client sent, what the stages decided, what happened."""

    __slots__ = (
        "answered",
        "body",
        "cap_field",
        "choices",
        "content_length",
        "content_type",
        "content_types",
        "expected_in",
        "expected_out",
        "finish",
        "flavor",
        "gone",
        "key",
        "log_path",
        "method",
        "model",
        "path",
        "payload",
        "provider",
        "raw_key",
        "raw_path",
        "receive",
        "response_started",
        "route",
        "row",
        "scope",
        "send",
        "sent",
        "started",
        "status",
        "stream",
        "strip_usage",
        "ticket",
        "tokens",
        "tracker",
        "ts",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, started: float, ts: float
    ) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.started = started  # perf_counter, for the latency
        self.ts = ts  # wall clock, for the usage row
        # parse
        self.method: str = scope["method"]
        self.raw_path: bytes = b""
        self.flavor = OPENAI  # the API whose error shape the client reads
        self.raw_key: bytes | None = None
        self.content_length: int | None = None
        self.content_type = b""
        self.content_types = 0
        self.body: bytes | None = None
        self.payload: dict[str, Any] | None = None
        self.model = NO_MODEL
        self.gone = False  # the client left before the request was forwarded
        # authenticate
        self.key: KeyRecord | None = None
        # route. Until routed the log names no path: a client's own could carry anything.
        self.route: Route | None = None
        self.path = ""  # the canonical path the upstream receives
        self.log_path = "-"
        self.provider: Provider | None = None
        self.stream = False
        self.strip_usage = False  # the gateway asked for the stream's usage chunk
        # admit
        self.expected_in = 0
        self.expected_out = 0
        self.choices = 1
        self.cap_field: str | None = None
        self.ticket: Ticket | None = None
        # forward and relay
        self.sent = False  # the provider may be working on it
        self.response_started = False
        self.answered = False  # the provider began a successful answer
        self.status = 0
        self.tracker: StreamUsage | None = None
        self.tokens: TokenCount | None = None
        # settle: keeps the usage row (set at admission), and the row kept
        self.finish: Callable[[], object] | None = None
        self.row: UsageRow | None = None

    async def send_last(self, message: Message) -> None:
        """Send the answer's last message, its usage row kept first: an answer that reached
        its client in full has its row on disk, whatever becomes of this process."""
        finish = self.finish
        if finish is not None:
            self.finish = None
            finish()
        await self.send(message)

    @property
    def prefix(self) -> str:
        """The key's prefix for the log; never the key itself."""
        return self.key.prefix if self.key is not None else "-"
