"""Fill an Opulon home with synthetic usage metadata, for timing reports at scale.

Example: python bench/gen_usage.py --rows 10000000 --keys 50 --days 60 --home /tmp/opulon-10m

Keys are created through :class:`opulon.keys.KeyStore`, with a mix of rolling limits and
budgets; rows are inserted in time order, as the gateway writes them, with ``executemany`` in
large transactions (so the hourly rollup trigger runs for every row, as in production).
Traffic follows a daily rhythm; each key uses one to three models; about 5% of requests fail.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

from opulon.keys import KeyStore
from opulon.limits import parse_budget, parse_limit
from opulon.settings import Settings
from opulon.storage import USAGE_COLUMNS, open_store

MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "claude-sonnet-4",
    "claude-haiku-4",
    "text-embedding-3-small",
    "o3-mini",
)
# (status, weight): mostly successes, some limit refusals, upstream errors and disconnects.
STATUSES = ((200, 950), (429, 20), (499, 10), (500, 8), (502, 5), (400, 5), (401, 2))
CHUNK = 200_000
POOL = 1 << 16


def _limits_for(index: int) -> list[str]:
    limits = ["requests:600/1m"]
    if index % 2 == 0:
        limits.append("tokens:5M/5h")
    if index % 4 == 1:
        limits.append("tokens:200M/1d")
    if index % 5 == 2:
        limits.append("requests:250k/30d")
    return limits


def create_keys(home: Path, count: int, rng: random.Random) -> list[tuple[int, str, list[str]]]:
    """``count`` keys, each with its id, display prefix and the models it uses."""
    store = open_store(Settings(home=home))
    try:
        keys = KeyStore(store)
        created = []
        for index in range(count):
            limits = [parse_limit(text) for text in _limits_for(index)]
            if index % 5 == 0:
                limits.append(parse_budget("tokens:20B"))
            record, _ = keys.create(f"bench-{index:03d}", limits=limits, concurrency=8)
            models = rng.sample(MODELS, rng.choice((1, 1, 2, 2, 3)))
            created.append((record.id, record.prefix, models))
        return created
    finally:
        store.close()


def _timestamps(rng: random.Random, start: float, end: float, count: int) -> list[float]:
    """``count`` sorted times in ``[start, end)``, busier in the (UTC) afternoon."""
    times: list[float] = []
    span = end - start
    while len(times) < count:
        ts = start + rng.random() * span
        hour = (ts % 86400) / 3600
        if rng.random() < 0.35 + 0.65 * (0.5 + 0.5 * math.sin((hour - 8) / 24 * 2 * math.pi)):
            times.append(ts)
    times.sort()
    return times


def generate(home: Path, rows: int, key_count: int, days: float, seed: int) -> None:
    rng = random.Random(seed)
    keys = create_keys(home, key_count, rng)
    # A few keys carry most of the traffic, as in life.
    key_weights = [1 / (rank + 1) ** 0.8 for rank in range(key_count)]
    combos = [(key_id, prefix, model) for key_id, prefix, models in keys for model in models]
    combo_weights = [
        key_weights[index] / len(models)
        for index, (_, _, models) in enumerate(keys)
        for _ in models
    ]
    statuses = [status for status, _ in STATUSES]
    status_weights = [weight for _, weight in STATUSES]
    # Pools of (latency, input, output) drawn once; rows pick from them.
    latencies = [round(rng.lognormvariate(math.log(900), 0.9), 1) for _ in range(POOL)]
    inputs = [int(rng.lognormvariate(math.log(800), 1.1)) for _ in range(POOL)]
    outputs = [int(rng.lognormvariate(math.log(250), 1.0)) for _ in range(POOL)]

    end = time.time()
    start = end - days * 86400
    store = open_store(Settings(home=home))
    conn = store.db.conn
    conn.execute("PRAGMA synchronous=OFF")
    insert = (
        f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})"
    )
    began = time.perf_counter()
    done = 0
    try:
        while done < rows:
            count = min(CHUNK, rows - done)
            slice_start = start + (end - start) * done / rows
            slice_end = start + (end - start) * (done + count) / rows
            times = _timestamps(rng, slice_start, slice_end, count)
            picked = rng.choices(combos, combo_weights, k=count)
            codes = rng.choices(statuses, status_weights, k=count)
            draws = [rng.randrange(POOL) for _ in range(count)]
            batch = []
            for ts, (key_id, prefix, model), status, draw in zip(
                times, picked, codes, draws, strict=True
            ):
                if status == 200:
                    batch.append(
                        (key_id, prefix, ts, model, status, latencies[draw],
                         inputs[draw], outputs[draw])
                    )  # fmt: skip
                else:
                    # Refusals and failures are quick and mostly cost no tokens.
                    batch.append(
                        (key_id, prefix, ts, model, status, latencies[draw] / 20,
                         inputs[draw] if status >= 500 else 0, 0)
                    )  # fmt: skip
            conn.execute("BEGIN")
            conn.executemany(insert, batch)
            conn.execute("COMMIT")
            done += count
            rate = done / (time.perf_counter() - began)
            print(f"\r{done:,} rows ({rate:,.0f} rows/s)", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="usage rows to insert")
    parser.add_argument("--keys", type=int, default=50, help="keys to create")
    parser.add_argument("--days", type=float, default=60, help="span of the rows, ending now")
    parser.add_argument("--home", type=Path, required=True, help="Opulon home to fill (new)")
    parser.add_argument("--seed", type=int, default=7, help="random seed")
    args = parser.parse_args(argv)
    if (args.home / "opulon.db").exists():
        parser.error(f"{args.home} already holds a database; give a new --home")
    if args.rows < 1 or args.keys < 1 or args.days <= 0:
        parser.error("--rows, --keys and --days must be positive")
    began = time.perf_counter()
    generate(args.home, args.rows, args.keys, args.days, args.seed)
    print(
        f"{args.rows:,} rows for {args.keys} keys over {args.days:g} days in {args.home} "
        f"({time.perf_counter() - began:.1f} s)"
    )


if __name__ == "__main__":
    main()
