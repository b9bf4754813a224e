"""The usage journal: each usage row on disk before its answer's last bytes go out.

Rows wait in memory for the writer's next batch (:class:`~opulon.usage.UsageWriter`); a node
killed meanwhile (``kill -9``, the OOM killer) would lose them. So every row is first
appended to this process's journal, a file in the data dir's ``journal`` folder, which the
operating system keeps whatever becomes of the process. Each batch the writer commits
records, in the same transaction, how far into the journal the store holds the rows (the
``usage_journals`` table); a journal whose process is gone is found by the next writer that
looks (on the same data dir) and the rows past that mark are written, exactly once.

A journal holds exactly what a usage row holds (privacy invariant 2), one JSON array per
line. It is not synced to the disk on every row: a crash of the machine itself (not of the
process) may lose the last rows, as the store's own lazy commits may.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: A usage row's columns, in order (opulon.usage.UsageRow): key id, key prefix, timestamp,
#: model, status, latency (ms), input tokens, output tokens.
Row = tuple[int, str, float, str, int, float, int, int]

__all__ = ["JOURNAL_DIR", "ClaimedJournal", "Row", "UsageJournal", "claim_orphans", "waiting_rows"]

#: The folder of the data dir the journals live in.
JOURNAL_DIR = "journal"
#: Seconds a segment is appended to at least before a new one starts.
ROTATE_EVERY = 1.0
#: A segment's size (allocated when it starts); a full one starts the next.
SEGMENT_BYTES = 1 << 20

_LOCK = ".lock"
_SEGMENT = ".rows"


def _segment_path(directory: Path, name: str, first: int) -> Path:
    return directory / f"{name}.{first:012d}{_SEGMENT}"


def _open_private(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


class UsageJournal:
    """This process's journal: :meth:`append` on the event loop, :meth:`written` and
    :meth:`close` from the writer.

    The journal's lock file is held (``flock``) for as long as the journal is open; the
    operating system lets it go on any exit, which is how another writer knows the journal
    is an orphan. It names the ``store`` the rows belong to (a tag of the caller's), so that
    only a writer to that store writes them.
    """

    def __init__(self, directory: Path, *, store: str = "") -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.store = store
        self.name = secrets.token_hex(8)
        self.seq = 0  # the last row appended
        # Locked under a hidden name first, so that no other writer ever sees it unlocked.
        hidden = directory / f".{self.name}{_LOCK}"
        self._lock = _open_private(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._lock, store.encode())
        hidden.rename(directory / f"{self.name}{_LOCK}")
        # (first row, path) of every segment not yet removed; the last is being appended to.
        self._segments: deque[tuple[int, Path]] = deque()
        self._map: mmap.mmap | None = self._open_segment(1)
        self._pos = 0  # where the next row goes in the segment appended to
        self._guard = threading.Lock()  # the segment appended to, against an emptying
        self._rotate = False  # the next row starts a new segment (ROTATE_EVERY at most)
        self._opened_at = time.monotonic()

    def _open_segment(self, first: int) -> mmap.mmap:
        """A new segment, its blocks allocated (a full disk fails here, with OSError, not
        later inside the mapping), mapped shared: a row copied into it is in the page cache,
        which outlives the process, with no system call (which would hand the interpreter's
        lock to the writer thread on every row)."""
        path = _segment_path(self.directory, self.name, first)
        fd = _open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            os.posix_fallocate(fd, 0, SEGMENT_BYTES)
            mapped = mmap.mmap(fd, SEGMENT_BYTES)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._segments.append((first, path))
        return mapped

    def append(self, row: tuple[Any, ...]) -> int:
        """Put the row on disk (a copy into the mapped segment); its number in the journal."""
        seq = self.seq + 1
        line = encode(seq, row)
        size = len(line)
        with self._guard:
            mapped, pos = self._map, self._pos
            if mapped is None:
                raise OSError(errno.EBADF, "the usage journal is closed")
            if pos + size > SEGMENT_BYTES or (
                self._rotate and time.monotonic() - self._opened_at >= ROTATE_EVERY
            ):
                self._rotate = False
                old, self._map = mapped, self._open_segment(seq)
                mapped = self._map
                self._opened_at = time.monotonic()
                old.close()  # its rows stay in its file
                pos = 0
            mapped[pos : pos + size] = line
            self._pos = pos + size
            self.seq = seq
        return seq

    def written(self, upto: int) -> None:
        """The store holds every row up to number ``upto``: remove them from the disk.

        A row stays on disk about a second at most after it is written, so the metadata of
        a key deleted meanwhile does not outlive the key by more than that: the segments
        holding only written rows are removed; the one being appended to is emptied when
        every row is written, else a row after ROTATE_EVERY starts a new one (one new file
        a second under load, not one per batch).
        """
        # Never raises: rows left on disk by a failure here are below the store's mark, so
        # they are never written twice.
        segments = self._segments
        with contextlib.suppress(OSError):
            while len(segments) > 1 and segments[1][0] - 1 <= upto:
                _, path = segments.popleft()
                path.unlink(missing_ok=True)
        with self._guard:
            if upto >= self.seq:
                if self._pos and self._map is not None:
                    self._map[: self._pos] = bytes(self._pos)
                    self._pos = 0
            else:
                self._rotate = True

    def close(self, *, all_written: bool) -> None:
        """Close the journal; with ``all_written`` (the store holds every row) remove it, else
        leave it for the next writer on this data dir."""
        with self._guard:
            mapped, self._map = self._map, None  # a row appended after this fails
        if mapped is not None:
            with contextlib.suppress(OSError, ValueError):
                mapped.close()
        if all_written:
            for _, path in self._segments:
                path.unlink(missing_ok=True)
            (self.directory / f"{self.name}{_LOCK}").unlink(missing_ok=True)
        os.close(self._lock)


def encode(seq: int, row: tuple[Any, ...]) -> bytes:
    """The row's line: a JSON array (numbers as Python writes them, which JSON reads)."""
    key_id, prefix, ts, model, status, latency, inp, out = row
    dumps = json.dumps
    return (
        f"[{seq},{int(key_id)},{dumps(prefix)},{float(ts)!r},{dumps(model)},{int(status)},"
        f"{float(latency)!r},{int(inp)},{int(out)}]\n"
    ).encode()


def _decode(line: bytes) -> tuple[int, Row] | None:
    """A line's row, or None for a line cut short (the process died in its write)."""
    try:
        seq, key_id, prefix, ts, model, status, latency, inp, out = json.loads(line)
    except (ValueError, TypeError):
        return None
    numbers = (seq, key_id, status, inp, out)
    if not all(type(n) is int for n in numbers) or not isinstance(prefix, str):
        return None
    if not isinstance(model, str) or not all(type(v) in (int, float) for v in (ts, latency)):
        return None
    return seq, (key_id, prefix, float(ts), model, status, float(latency), inp, out)


class ClaimedJournal:
    """A journal whose process is gone, now held by this one to write and remove."""

    def __init__(self, directory: Path, name: str, lock: int) -> None:
        self.directory = directory
        self.name = name
        self._lock = lock

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.name}.*{_SEGMENT}"))

    def rows(self, after: int) -> Iterator[tuple[int, Row]]:
        """Its rows numbered above ``after``, in order."""
        for path in self.segments():
            try:
                lines = path.open("rb")
            except FileNotFoundError:
                continue
            with lines:
                for line in lines:  # one at a time: a long outage makes many segments
                    if line[:1] == b"\0":  # the segment's unused (or emptied) rest
                        break
                    decoded = _decode(line)
                    if decoded is not None and decoded[0] > after:
                        yield decoded

    def remove(self) -> None:
        """Remove its files (the store holds its rows) and let it go."""
        for path in self.segments():
            path.unlink(missing_ok=True)
        (self.directory / f"{self.name}{_LOCK}").unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Let it go (once; later calls do nothing)."""
        lock, self._lock = self._lock, -1
        if lock >= 0:
            os.close(lock)


def claim_orphans(
    directory: Path,
    *,
    store: str | None = "",
    own: str | None = None,
    others: set[str] | None = None,
) -> Iterator[ClaimedJournal]:
    """The journals of ``store`` in ``directory`` that no live process holds, each locked for
    the caller while it is handled (a caller must :meth:`~ClaimedJournal.remove` or
    :meth:`~ClaimedJournal.release` it). Orphans of other stores go in ``others``; with
    ``store`` None, every store's are claimed."""
    try:
        names = sorted(
            {path.name.split(".", 1)[0] for path in directory.iterdir() if path.name[:1] != "."}
        )
    except FileNotFoundError:
        return
    for name in names:
        if name == own:
            continue
        lock_path = directory / f"{name}{_LOCK}"
        try:
            # A journal's lock file is made before its segments and removed after them.
            lock = _open_private(lock_path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            theirs = os.pread(lock, 256, 0).decode(errors="replace")
        except OSError:  # its process is alive (or another writer is handling it)
            os.close(lock)
            continue
        if store is not None and theirs != store:  # another store's (another database's)
            os.close(lock)
            if others is not None:
                others.add(name)
            continue
        yield ClaimedJournal(directory, name, lock)


def waiting_rows(directory: Path) -> tuple[int, int]:
    """(journals, rows) in ``directory`` whose process is gone: rows no store may hold yet."""
    journals = rows = 0
    for orphan in claim_orphans(directory, store=None):
        try:
            count = sum(1 for _ in orphan.rows(0))
        finally:
            orphan.release()
        if count:
            journals += 1
            rows += count
    return journals, rows
