"""One ``opulon serve`` per data dir: an OS-level lock that every exit releases.

Two servers on one data dir would each hold every key's limits in memory and each admit a
full quota. The lock is ``flock`` on a file in the data dir, held as long as the process
lives: the kernel drops it on any exit, ``kill -9`` included, so a stale lock never blocks a
restart. The file holds the PID of the server that holds it, to name it in the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from opulon.errors import ConfigError

LOCK_NAME = "serve.lock"


def hold_data_dir(home: Path, *, shared: bool = False) -> IO[str]:
    """Take the data dir's lock for this process; keep the returned file open while serving.

    A node whose limits are shared through Redis (``shared``) takes the lock shared: any
    number of those may serve the dir together, but none beside a node that counts alone.
    Raises :class:`ConfigError` naming the process that holds it already.
    """
    path = home / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "unknown"
        handle.close()
        if shared:
            raise ConfigError(
                f"an opulon serve without --redis (pid {holder}) is serving the data dir "
                f"{home} with limits of its own: stop it, or give this one its own --home"
            ) from None
        raise ConfigError(
            f"another opulon serve (pid {holder}) is serving the data dir {home}: "
            "stop it first, give this one its own --home, or share the limits of both "
            "through Redis (--redis URL)"
        ) from None
    if not shared:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return handle
