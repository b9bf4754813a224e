"""The in-flight watchdog: one task watches every forwarded request, instead of timers each.

A request in flight for :data:`WATCH_AFTER` gets a task that watches for its client leaving
(the request is then cancelled, and settles as 499); one whose upstream has sent nothing for
its timeout is cancelled and answered 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from opulon.gateway.exchange import Receive

WATCH_AFTER = 0.05  # seconds a request is in flight before a disconnect watcher starts
SWEEP_EVERY = 0.025  # seconds between two looks at the requests in flight


class Flight:
    """A request between admission and its last byte, as the watchdog sees it."""

    __slots__ = (
        "body_done",
        "gone",
        "progress",
        "receive",
        "seen",
        "seen_at",
        "started",
        "task",
        "timed_out",
        "timeout",
        "watcher",
    )

    def __init__(
        self,
        task: asyncio.Task[Any],
        receive: Receive,
        body_done: asyncio.Event | None,
        started: float,
        timeout: float,
    ) -> None:
        self.task = task
        self.receive = receive
        self.body_done = body_done  # set once a streamed request body has been read
        self.started = started
        self.timeout = timeout
        self.progress = 0  # bumped by every arrival from the upstream
        self.seen = 0
        self.seen_at = started
        self.watcher: asyncio.Task[None] | None = None
        self.gone = False  # the client went away
        self.timed_out = False  # the upstream fell silent for longer than the timeout


class Watchdog:
    """Every request in flight, looked at every :data:`SWEEP_EVERY` seconds."""

    def __init__(self) -> None:
        self._flights: set[Flight] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Begin watching (inside the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def enter(
        self, receive: Receive, body_done: asyncio.Event | None, started: float, timeout: float
    ) -> Flight:
        """Watch the current task's request from now on."""
        task = asyncio.current_task(self._loop)
        assert task is not None
        flight = Flight(task, receive, body_done, started, timeout)
        self._flights.add(flight)
        return flight

    async def leave(self, flight: Flight) -> None:
        """The request is done: stop watching it."""
        self._flights.discard(flight)
        watcher = flight.watcher
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.perf_counter()
            for flight in list(self._flights):
                if flight.watcher is None and now - flight.started >= WATCH_AFTER:
                    flight.watcher = loop.create_task(_watch_disconnect(flight))
                uploading = flight.body_done is not None and not flight.body_done.is_set()
                if flight.progress != flight.seen or uploading:
                    flight.seen, flight.seen_at = flight.progress, now
                elif now - flight.seen_at > flight.timeout and not flight.timed_out:
                    flight.timed_out = True
                    flight.task.cancel()


async def _watch_disconnect(flight: Flight) -> None:
    if flight.body_done is not None:
        await flight.body_done.wait()
    while True:
        message = await flight.receive()
        if message["type"] == "http.disconnect":
            flight.gone = True
            flight.task.cancel()
            return
