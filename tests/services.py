"""The real PostgreSQL and Redis the multi-node tests talk to.

Their addresses come from ``OPULON_TEST_POSTGRES_URL`` and ``OPULON_TEST_REDIS_URL`` (the
standard ports on 127.0.0.1 by default). Where nothing listens there a test that needs one is
skipped with the reason, except under CI (``CI`` set), where a missing service fails the run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

__all__ = ["postgres_url", "redis_url", "require"]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    try:
        with socket.create_connection((host, parts.port or 0), timeout=1.0):
            return True
    except OSError:
        return False


def require(url: str, what: str, variable: str) -> str:
    """``url`` when something listens there; else skip (or, under CI, fail) saying why."""
    host = urlsplit(url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        pytest.fail(f"{variable} must name a loopback address, not {host!r}")
    if _listening(url):
        return url
    reason = f"no {what} listens at {url} (set {variable} to its URL)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def postgres_url() -> str:
    """The test PostgreSQL's URL (skips or fails where none listens)."""
    url = os.environ.get("OPULON_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    return require(url, "PostgreSQL", "OPULON_TEST_POSTGRES_URL")


def redis_url() -> str:
    """The test Redis's URL (skips or fails where none listens)."""
    url = os.environ.get("OPULON_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    return require(url, "Redis", "OPULON_TEST_REDIS_URL")


REDIS_SERVER = shutil.which("redis-server")


class PrivateRedis:
    """A ``redis-server`` on a free loopback port that keeps nothing on disk."""

    def __init__(self, directory: Path) -> None:
        if REDIS_SERVER is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed; CI must run the failure tests")
            pytest.skip("redis-server is not installed (Debian's redis-server package)")
        with socket.socket() as probe:  # a free loopback port
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(REDIS_SERVER),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                             capture_output=True, text=True).stdout.strip() != "PONG":  # fmt: skip
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
