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


def hold_data_dir(home: Path) -> IO[str]:
    """Take the data dir's lock for this process; keep the returned file open while serving.

    Raises :class:`ConfigError` naming the process that holds it already.
    """
    path = home / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"another opulon serve (pid {holder}) is serving the data dir {home}: "
            "stop it first, or give this one its own --home"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
