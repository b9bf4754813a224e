"""psycopg 3 or asyncpg for the PostgreSQL store: the two things the store does often, timed.

Example: .venv/bin/python bench/db_driver.py --url postgresql://postgres@127.0.0.1:5432/test

In a schema of its own (created with Opulon's migrations, so with the rollup trigger and the
foreign keys the gateway's writes meet, and dropped at the end) it times:

* a batch of usage rows written as the usage writer writes them: ``--batch`` rows per
  transaction, the batch's keys locked ``FOR SHARE`` first. psycopg by ``COPY`` (what
  :class:`opulon.usage.UsageWriter` does), by ``executemany`` (pipelined) and by multi-row
  ``INSERT`` statements of 128 rows; asyncpg by ``copy_records_to_table`` and by
  ``executemany``. Figures in µs per row, rollups included.
* a key look-up by display prefix (what the gateway's reload and the CLI do per key), in µs
  per query: psycopg with its automatic prepared statements, asyncpg with its own.

Each figure is the median of ``--repeat`` rounds. The gateway itself runs no SQL per request
(keys are in memory; rows leave in the background), so these are the costs of the background
writer and of a reload, not of a request.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psycopg

from opulon.keys import KeyStore
from opulon.settings import Settings
from opulon.storage import USAGE_COLUMNS, open_store
from opulon.usage import UsageRow

BATCH = 512
ROWS_PER_STATEMENT = 128


def _rows(key_ids: list[tuple[int, str]], count: int, rng: random.Random) -> list[UsageRow]:
    now = time.time()
    rows = []
    for _ in range(count):
        key_id, prefix = rng.choice(key_ids)
        rows.append(
            UsageRow(key_id, prefix, now - rng.uniform(0, 3600), rng.choice(["gpt-4o", "o3"]),
                     200, rng.lognormvariate(5, 1), rng.randrange(4000), rng.randrange(900))
        )  # fmt: skip
    return rows


def _lock_sql(ids: list[int], marker: str) -> str:
    marks = ", ".join(marker.format(i + 1) for i in range(len(ids)))
    return f"SELECT id FROM keys WHERE id IN ({marks}) FOR SHARE"


def _psycopg_writers(
    conn: psycopg.Connection[tuple[object, ...]],
) -> dict[str, Callable[[list[UsageRow]], None]]:
    columns = ", ".join(USAGE_COLUMNS)

    def copy(rows: list[UsageRow]) -> None:
        ids = sorted({row.key_id for row in rows})
        with conn.transaction():
            conn.execute(_lock_sql(ids, "%s"), ids)
            with conn.cursor() as cursor, cursor.copy(f"COPY usage ({columns}) FROM STDIN") as cp:
                for row in rows:
                    cp.write_row(row)

    def executemany(rows: list[UsageRow]) -> None:
        ids = sorted({row.key_id for row in rows})
        with conn.transaction():
            conn.execute(_lock_sql(ids, "%s"), ids)
            with conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO usage ({columns}) VALUES ({', '.join(['%s'] * 8)})", rows
                )

    def multirow(rows: list[UsageRow]) -> None:
        ids = sorted({row.key_id for row in rows})
        with conn.transaction():
            conn.execute(_lock_sql(ids, "%s"), ids)
            for start in range(0, len(rows), ROWS_PER_STATEMENT):
                piece = rows[start : start + ROWS_PER_STATEMENT]
                values = ", ".join("(" + ", ".join(["%s"] * 8) + ")" for _ in piece)
                conn.execute(
                    f"INSERT INTO usage ({columns}) VALUES {values}",
                    [value for row in piece for value in row],
                )

    return {
        "psycopg COPY": copy,
        "psycopg executemany": executemany,
        "psycopg INSERT x128": multirow,
    }


async def _asyncpg_round(
    url: str, batches: list[list[UsageRow]], how: str, key_prefixes: list[str], repeat: int
) -> float:
    conn = await asyncpg.connect(url)
    try:
        if how == "lookup":
            statement = await conn.prepare(
                "SELECT prefix, key_id, lookup_hash, valid_until FROM credentials WHERE prefix = $1"
            )
            started = time.perf_counter()
            for _ in range(repeat):
                for prefix in key_prefixes:
                    await statement.fetchrow(prefix)
            return (time.perf_counter() - started) / (repeat * len(key_prefixes))
        started = time.perf_counter()
        count = 0
        for rows in batches:
            ids = sorted({row.key_id for row in rows})
            async with conn.transaction():
                await conn.fetch(_lock_sql(ids, "${}"), *ids)
                if how == "copy":
                    await conn.copy_records_to_table(
                        "usage", records=rows, columns=list(USAGE_COLUMNS)
                    )
                else:
                    marks = ", ".join(f"${i + 1}" for i in range(8))
                    await conn.executemany(
                        f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({marks})", rows
                    )
            count += len(rows)
        return (time.perf_counter() - started) / count
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=20_480, help="usage rows per round")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per transaction")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per figure")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="off",
        help="off as the usage writer commits (the commit does not wait for the WAL flush)",
    )
    parser.add_argument(
        "--skip-executemany", action="store_true", help="leave out the slow executemany rounds"
    )
    args = parser.parse_args()

    schema = f"opulon_bench_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(args.url, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in args.url else "?"
    options = f"-csearch_path={schema} -csynchronous_commit={args.synchronous_commit}"
    url = f"{args.url}{joiner}options={quote(options, safe='')}"
    try:
        home = Path(tempfile.mkdtemp(prefix="opulon-bench-"))
        store = open_store(Settings(home=home, database_url=url))
        keys = KeyStore(store)
        records = [keys.create(f"k{i}")[0] for i in range(50)]
        store.close()
        key_ids = [(r.id, r.prefix) for r in records]
        prefixes = [r.prefix for r in records]
        rng = random.Random(1)
        rows = _rows(key_ids, args.rows, rng)
        batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
        results: dict[str, list[float]] = {}

        with psycopg.connect(url, autocommit=True) as writer:
            for name, write in _psycopg_writers(writer).items():
                if args.skip_executemany and "executemany" in name:
                    continue
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    for batch in batches:
                        write(batch)
                    seconds = (time.perf_counter() - started) / len(rows)
                    results.setdefault(name, []).append(seconds)
        for how, name in (("copy", "asyncpg copy_records"), ("executemany", "asyncpg executemany")):
            if args.skip_executemany and how == "executemany":
                continue
            for _ in range(args.repeat):
                seconds = asyncio.run(_asyncpg_round(url, batches, how, prefixes, 1))
                results.setdefault(name, []).append(seconds)

        lookup = psycopg.connect(url, autocommit=True)
        for _ in range(args.repeat):
            started = time.perf_counter()
            for _ in range(20):
                for prefix in prefixes:
                    lookup.execute(
                        "SELECT prefix, key_id, lookup_hash, valid_until FROM credentials "
                        "WHERE prefix = %s",
                        [prefix],
                    ).fetchone()
            seconds = (time.perf_counter() - started) / (20 * len(prefixes))
            results.setdefault("psycopg key look-up", []).append(seconds)
        lookup.close()
        for _ in range(args.repeat):
            seconds = asyncio.run(_asyncpg_round(url, [], "lookup", prefixes, 20))
            results.setdefault("asyncpg key look-up", []).append(seconds)

        total = admin.execute(f"SELECT count(*) FROM {schema}.usage").fetchone()
        print(f"{args.rows} rows per round in batches of {args.batch}, {args.repeat} rounds, "
              f"synchronous_commit {args.synchronous_commit}; "
              f"{total[0] if total else 0} rows written in all")  # fmt: skip
        for name, figures in results.items():
            unit = "per query" if "look-up" in name else "per row"
            print(f"{name:<24} {statistics.median(figures) * 1e6:8.1f} µs {unit}")
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


if __name__ == "__main__":
    main()
