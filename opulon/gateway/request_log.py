"""The gateway's own log line per request, written in batches.

One line per request: time, key prefix, path, model, status, latency and tokens. Never an
address, a full key or any content. Lines are formatted on the request path (cheaply: the
timestamp text is reused within a second) and written to the stream a few times a second,
so a busy gateway does not pay a system call per request.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from opulon.formatting import log_stamp

_UNPRINTABLE = {i: "?" for i in range(32)} | {127: "?"}


class RequestLog:
    """Collects request lines in memory and writes them on :meth:`flush`."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def add(
        self,
        prefix: str,
        path: str,
        model: str,
        status: int,
        latency_ms: float,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = log_stamp(second)
        millis = int((now - second) * 1000)
        # Path and model come from the client: no line breaks or control bytes in the log.
        self._lines.append(
            f"{self._stamp},{millis:03d} INFO {prefix} {path.translate(_UNPRINTABLE)} "
            f"{model.translate(_UNPRINTABLE)} {status} {latency_ms:.1f}ms "
            f"in={input_tokens} out={output_tokens}\n"
        )

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        stream = self._stream or sys.stderr
        stream.write("".join(lines))
        stream.flush()
