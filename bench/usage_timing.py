"""Time ``opulon usage`` on a large home, and what the rollup trigger costs the usage writer.

Example: python bench/usage_timing.py --home /tmp/opulon-10m

Generates the home with ``bench/gen_usage.py`` when it holds no database yet (10 million rows
take a few minutes), then runs ``opulon usage --since 30d`` and ``--json`` as subprocesses,
as a person would, several times each, and prints the median wall time. For reference it
also times the report alone, in process, and a bare ``import opulon.cli``.

The write cost: :class:`opulon.usage.UsageWriter` writes the same rows, in batches as the
gateway does, into a scratch home with the rollup trigger and into one without it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from opulon.keys import KeyStore
from opulon.reports import build_report, resolve_query
from opulon.settings import Settings
from opulon.storage import open_store
from opulon.usage import UsageRow, UsageWriter

BENCH_DIR = Path(__file__).resolve().parent


def _opulon() -> list[str]:
    script = Path(sys.executable).with_name("opulon")
    return [str(script)] if script.exists() else [sys.executable, "-m", "opulon"]


def _median_seconds(run: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times), times


def _command(args: list[str], env: dict[str, str]) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run(args, env=env, stdout=subprocess.DEVNULL, check=True)

    return run


def time_command(home: Path, runs: int) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("OPULON_HOME", None)
    base = [*_opulon(), "--home", str(home), "usage", "--since", "30d"]
    _command(base, env)()  # warm the page cache, as a second look at a dashboard would
    for label, args in (
        ("opulon usage --since 30d", base),
        ("opulon usage --since 30d --json", [*base, "--json"]),
        ("python -c 'import opulon.cli' (startup alone)", [sys.executable, "-c", "import opulon.cli"]),
    ):  # fmt: skip
        median, times = _median_seconds(_command(args, env), runs)
        shown = ", ".join(f"{t:.3f}" for t in times)
        print(f"{label:48s} median {median:.3f} s  ({shown})")
    store = open_store(Settings(home=home))
    try:

        def report() -> object:
            now = time.time()
            return build_report(store, resolve_query(since="30d", now=now), now=now)

        median, times = _median_seconds(report, runs)
        print(f"{'build_report --since 30d (in process)':48s} median {median:.3f} s")
    finally:
        store.close()


def time_writes(rows: int, batch: int, repeats: int) -> None:
    """Rows per second of UsageWriter.write with and without the rollup trigger."""
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as scratch:
        rates: dict[str, float] = {}
        for trigger in (True, False):
            home = Path(scratch) / ("with" if trigger else "without")
            store = open_store(Settings(home=home))
            records = [KeyStore(store).create(f"k{i}")[0] for i in range(20)]
            if not trigger:
                store.db.execute("DROP TRIGGER usage_rolls_up")
            start = time.time() - 86400
            sample = [
                UsageRow(record.id, record.prefix, start + i * 0.5,
                         rng.choice(("gpt-4o", "gpt-4o-mini", "claude-haiku-4")),
                         rng.choice((200,) * 18 + (429, 500)), rng.lognormvariate(6.8, 0.9),
                         rng.randrange(4000), rng.randrange(800))
                for i, record in enumerate(rng.choice(records) for _ in range(rows))
            ]  # fmt: skip
            best = 0.0
            for _ in range(repeats):
                store.db.execute("DELETE FROM usage")
                writer = UsageWriter(store.settings.db_path)
                began = time.perf_counter()
                for offset in range(0, rows, batch):
                    writer.write(sample[offset : offset + batch])
                best = max(best, rows / (time.perf_counter() - began))
                writer.close()
            store.close()
            rates["with" if trigger else "without"] = best
            print(f"UsageWriter.write, {'with' if trigger else 'without'} rollup trigger: "
                  f"{best:,.0f} rows/s (best of {repeats}, batches of {batch})")  # fmt: skip
        print(f"the trigger costs {1 - rates['with'] / rates['without']:.0%} of write throughput")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/opulon-usage-10m"))
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows, if generating")
    parser.add_argument("--keys", type=int, default=50, help="keys, if generating")
    parser.add_argument("--days", type=float, default=60, help="days, if generating")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--skip-write-cost", action="store_true", help="skip the writer test")
    args = parser.parse_args(argv)
    if not (args.home / "opulon.db").exists():
        subprocess.run(
            [sys.executable, str(BENCH_DIR / "gen_usage.py"), "--rows", str(args.rows),
             "--keys", str(args.keys), "--days", str(args.days), "--home", str(args.home)],
            check=True,
        )  # fmt: skip
    store = open_store(Settings(home=args.home))
    try:
        count = store.db.execute("SELECT count(*) FROM usage").fetchone()[0]
    finally:
        store.close()
    print(f"{args.home}: {count:,} usage rows; {os.cpu_count()} CPUs")
    time_command(args.home, args.runs)
    if not args.skip_write_cost:
        time_writes(rows=60_000, batch=500, repeats=3)


if __name__ == "__main__":
    main()
