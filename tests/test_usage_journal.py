"""The usage journal: rows on disk from the moment they are taken, written exactly once.

A real process (a child Python) takes rows into its writer and dies by ``SIGKILL`` before
writing them all; a writer on the same data dir then writes exactly the rows the store
lacks, on either engine, and removes the journal.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from opulon.keys import KeyRecord, KeyStore
from opulon.settings import Settings
from opulon.storage import Store
from opulon.usage import UsageRow, UsageWriter
from opulon.usage_journal import JOURNAL_DIR, UsageJournal, claim_orphans


def _row(key_id: int, prefix: str, n: int) -> UsageRow:
    return UsageRow(key_id, prefix, 1_800_000_000.0 + n, "gpt-4o", 200, 1.5, n, 2 * n)


def _stored(store: Store) -> list[tuple[int, int]]:
    rows = store.db.execute("SELECT input_tokens, output_tokens FROM usage").fetchall()
    return sorted((int(i), int(o)) for i, o in rows)


def _left_by_a_dead_process(journal: UsageJournal, record: KeyRecord, rows: range) -> UsageJournal:
    """``journal`` with ``rows`` in it, closed as a process killed before writing them
    would leave it."""
    for n in rows:
        journal.append(_row(record.id, record.prefix, n))
    journal.close(all_written=False)
    return journal


def _lines(segment: Path) -> list[bytes]:
    """A segment's rows: its lines up to the unused (zeroed) rest."""
    return segment.read_bytes().split(b"\0", 1)[0].splitlines()


def _marks(store: Store) -> list[tuple[str, int]]:
    rows = store.db.execute("SELECT journal, seq FROM usage_journals").fetchall()
    return [(str(j), int(s)) for j, s in rows]


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from opulon.settings import Settings
    from opulon.storage import open_store
    from opulon.usage import UsageRow, UsageWriter
    from opulon.usage_journal import UsageJournal

    home, url, key_id, prefix, total, written = sys.argv[1:7]
    store = open_store(Settings(home=Path(home), database_url=url or None))
    writer = UsageWriter(store, UsageJournal(Path(home) / "journal"))
    for n in range(1, int(total) + 1):
        writer.add(UsageRow(int(key_id), prefix, 1_800_000_000.0 + n, "gpt-4o", 200, 1.5,
                            n, 2 * n))
        if n == int(written):
            writer.flush()
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _killed_child(settings: Settings, key_id: int, prefix: str, total: int, written: int) -> None:
    """A process that takes ``total`` rows, writes the first ``written``, and is killed."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(settings.home), settings.database_url or "",
         str(key_id), prefix, str(total), str(written)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)


def test_the_rows_of_a_killed_process_are_written_exactly_once(
    store: Store, settings: Settings
) -> None:
    record, _ = KeyStore(store).create("a")
    # 300 rows taken, the first 130 written (and taken off the disk).
    _killed_child(settings, record.id, record.prefix, 300, 130)
    assert len(_stored(store)) == 130
    directory = settings.home / JOURNAL_DIR
    (segment,) = directory.glob("*.rows")
    assert len(_lines(segment)) == 170
    (dead, seq), = _marks(store)  # fmt: skip
    assert seq == 130

    writer = UsageWriter(store, UsageJournal(directory))
    assert writer.write_orphans() == 170
    assert _stored(store) == [(n, 2 * n) for n in range(1, 301)]
    assert not [path for path in directory.iterdir() if path.name.startswith(dead)]
    assert dead not in dict(_marks(store))
    assert writer.write_orphans() == 0  # nothing twice
    writer.close()
    assert list(directory.iterdir()) == []  # a clean close leaves no journal
    assert _marks(store) == []
    assert len(_stored(store)) == 300


def test_a_killed_process_that_had_written_everything_leaves_nothing_to_write(
    store: Store, settings: Settings
) -> None:
    record, _ = KeyStore(store).create("a")
    _killed_child(settings, record.id, record.prefix, 100, 100)
    writer = UsageWriter(store, UsageJournal(settings.home / JOURNAL_DIR))
    assert writer.write_orphans() == 0
    writer.close()
    assert len(_stored(store)) == 100


def test_a_journal_whose_process_lives_is_left_alone(store: Store, settings: Settings) -> None:
    record, _ = KeyStore(store).create("a")
    directory = settings.home / JOURNAL_DIR
    live = UsageWriter(store, UsageJournal(directory))
    for n in range(1, 11):
        live.add(_row(record.id, record.prefix, n))
    other = UsageWriter(store, UsageJournal(directory))
    assert other.write_orphans() == 0
    assert _stored(store) == []
    live.close()
    other.close()
    assert len(_stored(store)) == 10


def test_rows_of_a_key_deleted_meanwhile_are_dropped_from_a_journal_too(
    store: Store, settings: Settings
) -> None:
    keys = KeyStore(store)
    kept, _ = keys.create("kept")
    gone, _ = keys.create("gone")
    directory = settings.home / JOURNAL_DIR
    dead = UsageJournal(directory)
    for n in range(1, 21):
        record = kept if n % 2 else gone
        dead.append(_row(record.id, record.prefix, n))
    dead.close(all_written=False)  # as a process that died would leave it
    keys.delete(gone.prefix)
    writer = UsageWriter(store, UsageJournal(directory))
    assert writer.write_orphans() == 10
    writer.close()
    assert _stored(store) == [(n, 2 * n) for n in range(1, 21, 2)]


def test_a_line_cut_short_by_the_death_of_its_process_is_skipped(
    store: Store, settings: Settings
) -> None:
    record, _ = KeyStore(store).create("a")
    directory = settings.home / JOURNAL_DIR
    dead = UsageJournal(directory)
    for n in range(1, 4):
        dead.append(_row(record.id, record.prefix, n))
    segment = next(directory.glob(f"{dead.name}.*.rows"))
    dead.close(all_written=False)
    with segment.open("r+b") as out:  # the copy the process died in, right after row 3
        out.seek(segment.read_bytes().index(b"\0"))
        out.write(b'[4,1,"op-ul-')
    writer = UsageWriter(store, UsageJournal(directory))
    assert writer.write_orphans() == 3
    writer.close()
    assert _stored(store) == [(1, 2), (2, 4), (3, 6)]


def test_a_store_that_fails_at_shutdown_leaves_the_rows_for_the_next_start(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, _ = KeyStore(store).create("a")
    directory = settings.home / JOURNAL_DIR
    writer = UsageWriter(store, UsageJournal(directory))
    for n in range(1, 6):
        writer.add(_row(record.id, record.prefix, n))

    def refuse(*args: object) -> int:
        raise OSError("the database is gone")

    monkeypatch.setattr(writer, "write", refuse)
    with pytest.raises(OSError):
        writer.close()
    monkeypatch.undo()
    assert _stored(store) == []
    later = UsageWriter(store, UsageJournal(directory))
    assert later.write_orphans() == 5
    later.close()
    assert _stored(store) == [(n, 2 * n) for n in range(1, 6)]


def test_a_journal_holds_exactly_the_rows_metadata_and_only_its_owner_reads_it(
    settings: Settings,
) -> None:
    directory = settings.home / JOURNAL_DIR
    journal = UsageJournal(directory)
    row = UsageRow(7, "op-ul-abcdef0123", 1_800_000_000.25, 'gpt-"4o"\n', 200, 12.5, 3, 4)
    assert journal.append(row) == 1
    segment = next(directory.glob("*.rows"))
    (line,) = _lines(segment)
    assert json.loads(line) == [1, *row]
    assert directory.stat().st_mode & 0o777 == 0o700
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    journal.close(all_written=True)
    assert list(directory.iterdir()) == []


def test_claiming_skips_a_journal_another_process_holds(settings: Settings) -> None:
    directory = settings.home / JOURNAL_DIR
    held = UsageJournal(directory)
    held.append(_row(1, "op-ul-abcdef0123", 1))
    # Held by this process's own open journal: a claim (another open of its lock) fails.
    assert list(claim_orphans(directory)) == []
    held.close(all_written=False)
    (claimed,) = list(claim_orphans(directory))
    assert claimed.name == held.name
    assert [seq for seq, _ in claimed.rows(0)] == [1]
    claimed.remove()
    claimed.release()  # a second release does nothing
    assert list(directory.iterdir()) == []


def test_the_gateways_runtime_keeps_its_journal_in_the_data_dir(settings: Settings) -> None:
    from opulon.runtime import Runtime

    runtime = Runtime(settings)
    try:
        names = [path.name for path in (settings.home / JOURNAL_DIR).iterdir()]
        assert any(name.endswith(".lock") for name in names)
    finally:
        runtime.close()
    assert list((settings.home / JOURNAL_DIR).iterdir()) == []


def test_an_unwritable_journal_folder_is_one_clear_error(settings: Settings) -> None:
    from opulon.errors import ConfigError
    from opulon.runtime import Runtime

    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / JOURNAL_DIR).write_text("not a folder")  # not even root makes one here
    with pytest.raises(ConfigError, match="cannot keep the usage journal"):
        Runtime(settings)


def _lines_on_disk(directory: Path) -> int:
    return sum(len(_lines(path)) for path in directory.glob("*.rows"))


def test_written_rows_leave_the_disk_with_the_batch_that_wrote_them(
    store: Store, settings: Settings
) -> None:
    record, _ = KeyStore(store).create("a")
    directory = settings.home / JOURNAL_DIR
    journal = UsageJournal(directory)
    writer = UsageWriter(store, journal)
    for n in range(1, 101):
        writer.add(_row(record.id, record.prefix, n))
    assert _lines_on_disk(directory) == 100
    writer.flush()  # every row written: the segment is emptied
    assert _lines_on_disk(directory) == 0
    writer.close()
    assert len(_stored(store)) == 100


def test_rows_added_while_a_batch_was_written_go_with_the_next(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import opulon.usage_journal

    directory = settings.home / JOURNAL_DIR
    journal = UsageJournal(directory)
    for n in range(1, 11):
        journal.append(_row(1, "op-ul-abcdef0123", n))
    journal.written(6)  # rows 7..10 came while rows 1..6 were written
    assert _lines_on_disk(directory) == 10
    journal.append(_row(1, "op-ul-abcdef0123", 11))  # within a second: the same segment
    assert len(list(directory.glob("*.rows"))) == 1
    journal.written(6)
    monkeypatch.setattr(opulon.usage_journal, "ROTATE_EVERY", 0.0)  # as a second later
    journal.append(_row(1, "op-ul-abcdef0123", 12))  # starts a new segment
    assert len(list(directory.glob("*.rows"))) == 2
    journal.written(11)  # the old segment is all written: it goes
    assert _lines_on_disk(directory) == 1
    journal.written(12)
    assert _lines_on_disk(directory) == 0
    journal.close(all_written=True)


def test_the_rows_of_another_stores_journal_wait_for_a_writer_to_that_store(
    store: Store, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    record, _ = KeyStore(store).create("a")
    directory = settings.home / JOURNAL_DIR
    dead = _left_by_a_dead_process(UsageJournal(directory, store="first"), record, range(1, 6))
    elsewhere = UsageWriter(store, UsageJournal(directory, store="second"))
    assert elsewhere.write_orphans() == 0
    assert "served another database" in caplog.text
    elsewhere.close()
    assert _stored(store) == []
    assert list(directory.glob(f"{dead.name}.*"))
    right = UsageWriter(store, UsageJournal(directory, store="first"))
    assert right.write_orphans() == 5
    right.close()
    assert len(_stored(store)) == 5


def test_a_batch_whose_commit_went_through_unacknowledged_is_not_written_twice(
    store: Store, settings: Settings
) -> None:
    record, _ = KeyStore(store).create("a")
    writer = UsageWriter(store, UsageJournal(settings.home / JOURNAL_DIR))
    real_write = writer.write
    lost = []

    def commit_then_fail(rows: object, mark: tuple[str, int] | None = None) -> int:
        written = real_write(rows, mark)  # type: ignore[arg-type]
        if not lost:
            lost.append(written)
            raise ConnectionError("the acknowledgement was lost")
        return written

    writer.write = commit_then_fail  # type: ignore[method-assign]
    for n in range(1, 31):
        writer.add(_row(record.id, record.prefix, n))
    with pytest.raises(ConnectionError):
        writer.flush()
    assert writer.pending == 30  # as far as the writer knows, nothing went in
    for n in range(31, 41):
        writer.add(_row(record.id, record.prefix, n))
    assert writer.flush() == 10
    writer.close()
    assert _stored(store) == [(n, 2 * n) for n in range(1, 41)]


def test_a_journal_that_fails_leaves_the_rows_in_memory_and_the_marks_right(
    store: Store,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import opulon.usage_journal

    record, _ = KeyStore(store).create("a")
    journal = UsageJournal(settings.home / JOURNAL_DIR)
    writer = UsageWriter(store, journal)
    for n in range(1, 6):
        writer.add(_row(record.id, record.prefix, n))

    def disk_full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # Its segment is full, and the disk too: no new segment can be allocated.
    monkeypatch.setattr(opulon.usage_journal.os, "posix_fallocate", disk_full)
    monkeypatch.setattr(opulon.usage_journal, "SEGMENT_BYTES", journal._pos)
    for n in range(6, 11):
        writer.add(_row(record.id, record.prefix, n))
    assert "No space left on device" in caplog.text
    monkeypatch.undo()
    # And the batch's commit goes through with its acknowledgement lost: no row twice.
    real_write = writer.write

    def commit_then_fail(rows: Any, mark: tuple[str, int] | None = None) -> int:
        real_write(rows, mark)
        raise ConnectionError("the acknowledgement was lost")

    writer.write = commit_then_fail  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        writer.flush()
    writer.write = real_write  # type: ignore[method-assign]
    writer.add(_row(record.id, record.prefix, 11))
    assert writer.flush() == 1
    assert _marks(store) == [(journal.name, 11)]  # the journal's five, and six counted
    writer.close()
    assert _stored(store) == [(n, 2 * n) for n in range(1, 12)]


def test_a_deleted_keys_rows_never_go_to_a_newer_key_that_got_its_id(
    store: Store, settings: Settings
) -> None:
    keys = KeyStore(store)
    alice, _ = keys.create("alice")
    directory = settings.home / JOURNAL_DIR
    _left_by_a_dead_process(UsageJournal(directory), alice, range(1, 4))
    keys.delete(alice.prefix)
    bob, _ = keys.create("bob")  # SQLite gives the highest id again: alice's
    writer = UsageWriter(store, UsageJournal(directory))
    assert writer.write_orphans() == 0
    writer.add(_row(bob.id, bob.prefix, 9))
    writer.close()
    assert _stored(store) == [(9, 18)]


@pytest.mark.sqlite_only
def test_a_commit_that_fails_and_leaves_its_transaction_open_loses_nothing(
    store: Store, settings: Settings
) -> None:
    import sqlite3

    record, _ = KeyStore(store).create("a")
    writer = UsageWriter(store, UsageJournal(settings.home / JOURNAL_DIR))

    class FullDisk(sqlite3.Connection):  # COMMIT fails once, its transaction left open
        failed = False

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "COMMIT" and not self.failed:
                self.failed = True
                raise sqlite3.OperationalError("database or disk is full")
            return super().execute(sql, *args)

    writer._conn.close()
    real = writer._conn = sqlite3.connect(
        settings.db_path, isolation_level=None, check_same_thread=False, factory=FullDisk
    )
    for n in range(1, 6):
        writer.add(_row(record.id, record.prefix, n))
    with pytest.raises(sqlite3.OperationalError):
        writer.flush()
    assert not real.in_transaction  # rolled back, not left open
    assert writer.flush() == 5
    writer.close()
    assert _stored(store) == [(n, 2 * n) for n in range(1, 6)]


def test_a_starting_gateway_writes_a_dead_processs_rows_before_it_reads_any_history(
    store: Store, settings: Settings
) -> None:
    from opulon.runtime import Runtime, open_journal

    record, _ = KeyStore(store).create("a")
    _left_by_a_dead_process(open_journal(store), record, range(1, 4))  # of this store
    runtime = Runtime(settings)  # not started: nothing but its construction ran
    try:
        assert _stored(store) == [(1, 2), (2, 4), (3, 6)]
    finally:
        runtime.close()
