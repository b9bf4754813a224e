"""Two gateway nodes on one PostgreSQL and one Redis, measured beside the single SQLite node.

``bench/run.py`` runs this scenario after its single-node scenarios (or alone, with
``--two-nodes-only``). Two ``opulon serve --redis ... `` processes share a database of their
own on the local PostgreSQL (``CREATE DATABASE opulon_bench_<random>``, dropped at the end)
and the local Redis (whose keys the gateway namespaces per installation; they expire a day
after their last use). Node one is pinned to the single node's CPU, node two to the other.

Every load is one wrk at one node, pinned to the other node's CPU, while the other node idles
(sequential); then both nodes at once, one wrk each. Besides the nodes' own CPU time, the CPU
time Redis and PostgreSQL spend is read from ``/proc/<pid>/stat``: ``redis-server`` (its pid
from ``INFO server``) and the PostgreSQL backends of the bench database (from
``pg_stat_activity``) plus the WAL writer, background writer and checkpointer, which serve
every database of the cluster. Redis and PostgreSQL are shared with whatever else runs on the
machine, so what they use while the nodes idle (measured just before each load) is taken off.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import loads
import procs
import psycopg
import redis
import upstream
from loads import WrkResult
from procs import LOOPBACK, Cpus, Processes

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
IDLE_SECONDS = 2.0  # what Redis and PostgreSQL use without the nodes' load, before each load
PHASE_GAP = 0.3
# A load is measured again (at most ATTEMPTS times in all) when another client kept Redis
# busy around it: more than this CPU share of Redis's idle use before it, or more script
# calls during it than the nodes' own (two per request, admission and settlement, and a few
# lease renewals).
ATTEMPTS = 3
FOREIGN_REDIS_RATE = 0.05  # CPU seconds per second
FOREIGN_CALLS_PER_REQUEST = 2.2
# PostgreSQL's processes that work for every database, the bench's among them.
PG_SHARED = ("walwriter", "background writer", "checkpointer")


@dataclass
class Setup:
    """What the scenario needs from the benchmark around it."""

    opulon: str
    wrk: str
    tmp: Path
    cpus: Cpus
    processes: Processes
    env: dict[str, str]  # the benchmark's environment (the upstream's key in it)
    upstream_key_env: str
    json_port: int  # nginx (or the mock) answering chat completions
    upstream_pid: int  # the process answering them (nginx's worker), for its CPU time
    check_body: bool  # the upstream is nginx: answers are compared byte for byte
    duration: float
    warmup: float
    postgres_url: str
    redis_url: str
    say: Callable[[str], None]


@dataclass
class Node:
    name: str
    home: Path
    cpu: int
    port: int = 0
    pid: int = 0
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    url: str  # the bench database
    database: str
    redis_pid: int | None
    redis_version: str
    postgres_version: str
    nodes: list[Node]
    key: str = ""
    script: Path | None = None


@dataclass
class Share:
    """CPU seconds over one load, by whom."""

    gateway: float = 0.0
    redis: float | None = None
    pg_backends: float | None = None
    pg_shared: float | None = None
    # What Redis and PostgreSQL used per second while the nodes idled, taken off the above.
    redis_idle_rate: float = 0.0
    pg_idle_rate: float = 0.0
    pg_pids: int = 0
    # Redis's own count of the script calls (EVALSHA) and the µs it spent running them.
    script_calls: int | None = None
    script_usec: int | None = None
    threads: dict[str, float] = field(default_factory=dict)  # the nodes' CPU by thread
    wrk: float = 0.0  # the load generators' CPU seconds
    upstream: float = 0.0  # nginx's worker's
    # Where Redis and the bench database's PostgreSQL backends ran: samples by CPU.
    placement: dict[str, Counter[int]] = field(default_factory=dict)
    busy: float = 0.0  # CPU seconds all processes of the machine used (every CPU)
    available: float = 0.0  # CPU seconds the machine had (every CPU)

    @property
    def others(self) -> float:
        """CPU seconds of the machine's other processes (other users, the kernel's threads,
        this benchmark's own Python)."""
        ours = self.gateway + self.wrk + self.upstream
        ours += (self.redis or 0.0) + (self.postgres or 0.0)
        return max(0.0, self.busy - ours)

    @property
    def postgres(self) -> float | None:
        if self.pg_backends is None:
            return None
        return self.pg_backends + (self.pg_shared or 0.0)


@dataclass
class Load:
    """One measured load: wrk at one node, or at both at once."""

    label: str
    connections: int
    results: list[WrkResult]  # one per node loaded
    share: Share
    wrk_cpus: list[int]
    node_cpus: list[int]
    rows: int = 0
    rows_ok: bool | None = None
    rows_detail: str = ""
    attempts: int = 1
    disturbed: list[str] = field(default_factory=list)  # why earlier attempts were not kept

    def disturbance(self) -> str:
        """Why another client's use of Redis spoils this load's figures ("" if it did not)."""
        share = self.share
        if share.redis_idle_rate > FOREIGN_REDIS_RATE:
            return f"Redis busy with another client before it ({share.redis_idle_rate:.0%} CPU)"
        if share.script_calls is not None and self.requests:
            per_request = share.script_calls / self.requests
            if per_request > FOREIGN_CALLS_PER_REQUEST:
                return f"another client's scripts in Redis ({per_request:.1f} calls/req)"
        return ""

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.results)

    @property
    def rps(self) -> float:
        return sum(r.rps for r in self.results)

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.results)

    def ms(self, point: str) -> float:
        return max(r.ms(point) for r in self.results)

    def per_request(self, seconds: float | None) -> float | None:
        if seconds is None or not self.requests:
            return None
        return seconds * 1e6 / self.requests

    @property
    def started(self) -> float:
        return min(r.started for r in self.results)

    @property
    def ended(self) -> float:
        return max(r.ended for r in self.results)


@dataclass
class TwoNodes:
    loads: list[Load] = field(default_factory=list)
    discarded: list[Load] = field(default_factory=list)  # attempts measured again
    single: dict[int, WrkResult] = field(default_factory=dict)  # the single node beside them
    notes: list[str] = field(default_factory=list)
    versions: str = ""

    def find(self, label: str, connections: int) -> Load | None:
        for load in self.loads:
            if (load.label, load.connections) == (label, connections):
                return load
        return None


# -- the database, Redis and their processes -------------------------------------------------


def _with_database(url: str, database: str) -> str:
    base, _, rest = url.rpartition("/")
    query = rest.partition("?")[2]
    return f"{base}/{database}" + (f"?{query}" if query else "")


def unavailable(setup: Setup) -> str:
    """Why the scenario cannot run here ("" when PostgreSQL and Redis both answer)."""
    try:
        with psycopg.connect(setup.postgres_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {setup.postgres_url} cannot be reached ({type(exc).__name__})"
    client = redis.Redis.from_url(setup.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis at {setup.redis_url} cannot be reached ({type(exc).__name__})"
    finally:
        client.close()
    return ""


def create_database(admin_url: str) -> tuple[str, str]:
    database = f"opulon_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    return database, _with_database(admin_url, database)


def drop_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def redis_server(url: str) -> tuple[int | None, str]:
    """(pid, version) of the Redis at ``url``, from ``INFO server``."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        info = client.info("server")
    finally:
        client.close()
    pid = int(info["process_id"])
    # The pid is the server's own only when it runs in this machine's process namespace.
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = ""
    return (pid if comm.startswith("redis") else None), str(info.get("redis_version", "?"))


def script_stats(url: str) -> tuple[int, int] | None:
    """(calls, µs) of EVALSHA so far on the Redis at ``url`` (every client's), or None."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    except redis.RedisError:
        return None
    finally:
        client.close()
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def postgres_pids(admin_url: str, database: str) -> dict[int, str]:
    """pid -> role of the PostgreSQL processes working for ``database``."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT pid, datname, backend_type FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND (datname = %s OR backend_type = ANY(%s))",
            (database, list(PG_SHARED)),
        ).fetchall()
    return {int(pid): ("backend" if datname == database else "shared") for pid, datname, _ in rows}


def postgres_version(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


class ServiceMeter:
    """CPU seconds of the nodes, of Redis and of PostgreSQL's processes over an interval.

    A PostgreSQL process that appears during the interval counts all its CPU time (it began
    within it); one that ends within it counts nothing (rare: the nodes keep their
    connections).
    """

    def __init__(
        self, cluster: Cluster, admin_url: str, redis_url: str, node_pids: list[int]
    ) -> None:
        self.cluster, self.admin_url, self.node_pids = cluster, admin_url, node_pids
        self.redis_url = redis_url
        self._scripts = script_stats(redis_url)
        self._threads = [procs.thread_cpu_seconds(pid) for pid in node_pids]
        self._nodes = self._node_seconds()
        self._redis = self._redis_seconds()
        self._pg = self._pg_seconds()
        self.pg_before = self._pg

    def _node_seconds(self) -> float:
        return sum(procs.process_cpu_seconds(pid) or 0.0 for pid in self.node_pids)

    def _redis_seconds(self) -> float | None:
        pid = self.cluster.redis_pid
        return procs.process_cpu_seconds(pid) if pid is not None else None

    def _pg_seconds(self) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        with contextlib.suppress(psycopg.Error):
            for pid, role in postgres_pids(self.admin_url, self.cluster.database).items():
                seconds = procs.process_cpu_seconds(pid)
                if seconds is not None:
                    out[pid] = (role, seconds)
        return out

    def stop(self) -> Share:
        share = Share(gateway=self._node_seconds() - self._nodes)
        for pid, before in zip(self.node_pids, self._threads, strict=True):
            for name, seconds in procs.thread_delta(before, procs.thread_cpu_seconds(pid)).items():
                share.threads[name] = share.threads.get(name, 0.0) + seconds
        redis_now = self._redis_seconds()
        if redis_now is not None and self._redis is not None:
            share.redis = redis_now - self._redis
        pg_now = self._pg_seconds()
        if pg_now:
            by_role = {"backend": 0.0, "shared": 0.0}
            for pid, (role, seconds) in pg_now.items():
                before = self._pg.get(pid)
                by_role[role] += seconds - (before[1] if before else 0.0)
            share.pg_backends, share.pg_shared = by_role["backend"], by_role["shared"]
            share.pg_pids = len(pg_now)
        scripts = script_stats(self.redis_url)
        if scripts is not None and self._scripts is not None:
            share.script_calls = scripts[0] - self._scripts[0]
            share.script_usec = scripts[1] - self._scripts[1]
        return share


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all the machine's CPUs together, since boot."""
    busy = total = 0.0
    for cpu in range(os.cpu_count() or 1):
        counted = procs.cpu_seconds(cpu)
        if counted is not None:
            busy, total = busy + counted[0], total + counted[1]
    return busy, total


class Placement:
    """Samples, every 50 ms while a load runs, of the CPU Redis and PostgreSQL's backends
    last ran on (a thread; bounded by a time limit as well as by :meth:`stop`)."""

    def __init__(self, pids: dict[str, list[int]], limit: float) -> None:
        self.pids, self.limit = pids, limit
        self.counts: dict[str, Counter[int]] = {name: Counter() for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            for name, pids in self.pids.items():
                for pid in pids:
                    cpu = procs.last_cpu(pid)
                    if cpu is not None:
                        self.counts[name][cpu] += 1
            self._stop.wait(0.05)

    def stop(self) -> dict[str, Counter[int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.counts


def idle_rates(
    cluster: Cluster, admin_url: str, redis_url: str, seconds: float
) -> tuple[float, float]:
    """CPU seconds per second of Redis and PostgreSQL while the nodes idle."""
    meter = ServiceMeter(cluster, admin_url, redis_url, [])
    began = time.monotonic()
    time.sleep(seconds)
    share = meter.stop()
    elapsed = time.monotonic() - began
    return (share.redis or 0.0) / elapsed, (share.postgres or 0.0) / elapsed


# -- the nodes -------------------------------------------------------------------------------


def _cli(setup: Setup, env: dict[str, str], *argv: str) -> str:
    result = subprocess.run(
        [setup.opulon, *argv], capture_output=True, text=True, env=env, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"opulon {' '.join(argv[:2])} failed: {result.stderr.strip()}")
    return result.stdout


def _node_env(setup: Setup, cluster: Cluster, node: Node) -> dict[str, str]:
    env = {**setup.env, "OPULON_HOME": str(node.home), "OPULON_DATABASE_URL": cluster.url}
    env.pop("OPULON_MASTER_KEY", None)
    env.pop("OPULON_REDIS_URL", None)
    return env


def configure(setup: Setup, cluster: Cluster) -> None:
    """The provider and the key through node one's CLI; node two gets the master key."""
    one, two = cluster.nodes
    one.home.mkdir(parents=True, mode=0o700)
    env = _node_env(setup, cluster, one)
    _cli(setup, env, "providers", "add", "bench-json", "--kind", "openai", "--base-url",
         f"http://{LOOPBACK}:{setup.json_port}/v1", "--api-key-env", setup.upstream_key_env,
         "--models", upstream.JSON_MODEL)  # fmt: skip
    created = json.loads(
        _cli(setup, env, "keys", "create", "--name", "bench-two-nodes",
             "--limit", "requests:100M/1m", "--limit", "tokens:100B/1h", "--json")
    )  # fmt: skip
    cluster.key = created["key"]
    two.home.mkdir(parents=True, mode=0o700)
    shutil.copyfile(one.home / "master.key", two.home / "master.key")
    (two.home / "master.key").chmod(0o600)
    cluster.script = loads.write_wrk_script(
        setup.tmp / "wrk-two-nodes-json.lua",
        upstream.request_body(upstream.JSON_MODEL, stream=False),
        f"Bearer {cluster.key}",
    )


def start_node(setup: Setup, cluster: Cluster, node: Node) -> None:
    node.port = procs.free_port()
    argv = [setup.opulon, "serve", "--port", str(node.port), "--quiet",
            "--redis", setup.redis_url]  # fmt: skip
    log = setup.tmp / f"{node.name}.log"
    node.process = setup.processes.start(
        node.name, setup.cpus.wrap(argv, node.cpu), log=log, env=_node_env(setup, cluster, node)
    )
    node.pid = node.process.pid
    procs.wait_for_http(f"http://{LOOPBACK}:{node.port}/healthz", node.process, log, 30)


def stop_node(setup: Setup, node: Node, notes: list[str]) -> None:
    if node.process is None:
        return
    code = setup.processes.stop(node.process, signal.SIGTERM, timeout=45)
    node.process = None
    if code not in (0, -signal.SIGTERM):
        notes.append(f"{node.name} exited with status {code} after SIGTERM")


def preflight(setup: Setup, cluster: Cluster) -> None:
    """One request through each node, the answer compared with the upstream's."""
    headers = {"Authorization": f"Bearer {cluster.key}", "Content-Type": "application/json"}
    body = upstream.request_body(upstream.JSON_MODEL, stream=False)
    for node in cluster.nodes:
        url = f"http://{LOOPBACK}:{node.port}{upstream.CHAT_PATH}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = response.read()
        if setup.check_body and answer != upstream.completion_body():
            raise RuntimeError(f"{node.name} changed the non-streaming answer")


@contextlib.contextmanager
def cluster(setup: Setup, notes: list[str]) -> Iterator[Cluster]:
    """Two running nodes on a database of their own; everything undone on the way out."""
    database, url = create_database(setup.postgres_url)
    setup.say(f"two nodes: database {database} on {setup.postgres_url.rpartition('@')[2]}")
    try:
        redis_pid, redis_version = redis_server(setup.redis_url)
        nodes = [
            Node("node-one", setup.tmp / "node-one" / "home", setup.cpus.gateway),
            Node("node-two", setup.tmp / "node-two" / "home", setup.cpus.tools),
        ]
        found = Cluster(url, database, redis_pid, redis_version,
                        postgres_version(setup.postgres_url), nodes)  # fmt: skip
        configure(setup, found)
        try:
            for node in nodes:
                start_node(setup, found, node)
            preflight(setup, found)
            yield found
        finally:
            for node in nodes:
                stop_node(setup, node, notes)
    finally:
        try:
            drop_database(setup.postgres_url, database)
        except psycopg.Error as exc:
            notes.append(f"could not drop the bench database {database}: {exc}")


# -- loads -----------------------------------------------------------------------------------


def _wrk(
    setup: Setup, cluster: Cluster, node: Node, wrk_cpu: int, conns: int, seconds: float
) -> WrkResult:
    assert cluster.script is not None
    return loads.run_wrk(
        setup.cpus.wrap([setup.wrk], wrk_cpu),
        f"http://{LOOPBACK}:{node.port}{upstream.CHAT_PATH}",
        cluster.script,
        connections=conns,
        duration=seconds,
    )


def _other_cpu(setup: Setup, node: Node) -> int:
    """wrk goes on the CPU of the node that idles."""
    return setup.cpus.tools if node.cpu == setup.cpus.gateway else setup.cpus.gateway


def measure(
    setup: Setup, cluster: Cluster, label: str, nodes: list[Node], connections: int
) -> Load:
    """wrk at each of ``nodes`` at once (warm-up first), with every process's CPU time."""
    wrk_cpus = [_other_cpu(setup, node) for node in nodes]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes))
    with pool:

        def all_at_once(seconds: float) -> list[WrkResult]:
            futures = [
                pool.submit(_wrk, setup, cluster, node, cpu, connections, seconds)
                for node, cpu in zip(nodes, wrk_cpus, strict=True)
            ]
            return [f.result(timeout=seconds + 90) for f in futures]

        if setup.warmup > 0:
            all_at_once(setup.warmup)
            time.sleep(PHASE_GAP)
        redis_rate, pg_rate = idle_rates(cluster, setup.postgres_url, setup.redis_url, IDLE_SECONDS)
        node_pids = [node.pid for node in cluster.nodes]
        meter = ServiceMeter(cluster, setup.postgres_url, setup.redis_url, node_pids)
        children, machine = _children_seconds(), _machine_seconds()
        upstream_before = procs.process_cpu_seconds(setup.upstream_pid) or 0.0
        backends = [pid for pid, (role, _) in meter.pg_before.items() if role == "backend"]
        placement = Placement(
            {"Redis": [cluster.redis_pid] if cluster.redis_pid else [], "PostgreSQL": backends},
            setup.duration + 30,
        )
        began = time.monotonic()
        try:
            results = all_at_once(setup.duration)
        finally:
            counts = placement.stop()
        share = meter.stop()
        share.placement = counts
        elapsed = time.monotonic() - began
        share.wrk = _children_seconds() - children
        share.upstream = (procs.process_cpu_seconds(setup.upstream_pid) or 0.0) - upstream_before
        machine_after = _machine_seconds()
        share.busy = machine_after[0] - machine[0]
        share.available = machine_after[1] - machine[1]
    share.redis_idle_rate, share.pg_idle_rate = redis_rate, pg_rate
    if share.redis is not None:
        share.redis = max(0.0, share.redis - redis_rate * elapsed)
    if share.pg_backends is not None:
        # The idle use is taken off the shared processes first (other databases' WAL).
        idle = pg_rate * elapsed
        shared = share.pg_shared or 0.0
        share.pg_shared = max(0.0, shared - idle)
        share.pg_backends = max(0.0, share.pg_backends - max(0.0, idle - shared))
    time.sleep(PHASE_GAP)
    return Load(label, connections, results, share, wrk_cpus, [n.cpu for n in nodes])


def check_rows(cluster: Cluster, measured: list[Load], check_tokens: bool) -> None:
    """Every answer of every load has its usage row in PostgreSQL (after the nodes stopped)."""
    expected = (upstream.PROMPT_TOKENS, upstream.COMPLETION_TOKENS)
    with psycopg.connect(cluster.url, connect_timeout=10) as conn:
        for load in measured:
            rows = conn.execute(
                "SELECT status, input_tokens, output_tokens FROM usage WHERE ts >= %s AND ts <= %s",
                (load.started - 0.01, load.ended + 0.01),
            ).fetchall()
            load.rows = len(rows)
            ok = [r for r in rows if r[0] == 200]
            odd = [r for r in rows if r[0] not in (200, 499)]
            wrong = sum(1 for _, i, o in ok if check_tokens and (i, o) != expected)
            problems = []
            if len(ok) < load.requests:
                problems.append(f"{load.requests - len(ok)} answered without a row")
            cut_off = load.connections * len(load.results)
            if len(rows) > load.requests + cut_off:
                problems.append(f"{len(rows) - load.requests - cut_off} extra rows")
            if odd:
                problems.append(f"{len(odd)} rows with status {sorted({r[0] for r in odd})}")
            if wrong:
                problems.append(f"{wrong} rows with wrong token counts")
            load.rows_ok = not problems
            load.rows_detail = "; ".join(problems)


def _measured(
    setup: Setup, found: Cluster, out: TwoNodes, label: str, nodes: list[Node], conns: int
) -> Load:
    """One load, measured again (bounded) while another client of Redis disturbs it."""
    reasons: list[str] = []
    for attempt in range(1, ATTEMPTS + 1):
        setup.say(f"two nodes: {label}, {conns} connection(s) per node")
        load = measure(setup, found, label, nodes, conns)
        load.attempts, load.disturbed = attempt, list(reasons)
        reason = load.disturbance()
        if not reason:
            return load
        if attempt == ATTEMPTS:
            setup.say(f"two nodes: {label}: {reason}; kept after {ATTEMPTS} attempts")
            return load
        reasons.append(reason)
        out.discarded.append(load)
        setup.say(f"two nodes: {label}: {reason}; measuring again")
    raise AssertionError("unreachable")


def run(setup: Setup, single: Callable[[int], WrkResult] | None = None) -> TwoNodes:
    """The two-node loads: 1 and 16 connections at each node alone, then 16 at both.

    ``single`` measures the single SQLite node (running beside the two) at a number of
    connections: it goes right before the two nodes' loads of the same count, so that drift
    on the machine hits both alike.
    """
    out = TwoNodes()
    with cluster(setup, out.notes) as found:
        one, two = found.nodes
        out.versions = (
            f"Redis {found.redis_version}, PostgreSQL {found.postgres_version} (psycopg "
            f"{psycopg.__version__})"
        )
        if found.redis_pid is None:
            out.notes.append("redis-server's process is not visible here: no Redis CPU share")
        plan: list[tuple[str, list[Node], int]] = []
        for conns in (1, 16):
            plan += [("single", [], conns), ("node one", [one], conns), ("node two", [two], conns)]
        plan.append(("both nodes", [one, two], 16))
        for label, nodes, conns in plan:
            if not nodes:
                if single is not None:
                    setup.say(f"single node beside the two: {conns} connection(s)")
                    out.single[conns] = single(conns)
                continue
            out.loads.append(_measured(setup, found, out, label, nodes, conns))
        for node in found.nodes:
            stop_node(setup, node, out.notes)  # SIGTERM: every usage row is written
        check_rows(found, out.loads + out.discarded, setup.check_body)
    return out


# -- the report ------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(
    two: TwoNodes, single: dict[int, WrkResult], single_rows: dict[int, str], cpus: Cpus
) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table: the single SQLite node's loads, then the two nodes'."""
    header = ["setup", "CPU", "conns", "req/s", "p50 ms", "p99 ms", "+p50 ms vs single",
              "gateway us/req", "Redis us/req", "PostgreSQL us/req", "total us/req", "errors",
              "usage rows"]  # fmt: skip
    rows: list[list[str]] = []
    for conns in (1, 16):
        result = single.get(conns)
        if result is not None:
            cpu = result.cpu_us_per_request
            rows.append([
                "single node, SQLite", str(cpus.gateway), str(conns), f"{result.rps:,.0f}",
                f"{result.ms('p50'):.2f}", f"{result.ms('p99'):.2f}", "-", _us(cpu), "-", "-",
                _us(cpu), str(result.failures), single_rows.get(conns, "-"),
            ])  # fmt: skip
        for load in two.loads:
            if load.connections != conns:
                continue
            base = single.get(conns)
            plus = (
                f"{load.ms('p50') - base.ms('p50'):+.2f}"
                if base and len(load.results) == 1
                else "-"
            )
            gateway = load.per_request(load.share.gateway)
            redis_us = load.per_request(load.share.redis)
            pg_us = load.per_request(load.share.postgres)
            total = None if gateway is None else gateway + (redis_us or 0) + (pg_us or 0)
            rps = f"{load.rps:,.0f}"
            if len(load.results) > 1:
                rps += " (" + " + ".join(f"{r.rps:,.0f}" for r in load.results) + ")"
            usage = f"{load.rows}/{load.requests} {'ok' if load.rows_ok else 'FAIL'}"
            rows.append([
                f"two nodes: {load.label}", "+".join(str(c) for c in load.node_cpus),
                str(conns) if len(load.results) == 1 else f"{conns}+{conns}", rps,
                f"{load.ms('p50'):.2f}", f"{load.ms('p99'):.2f}", plus, _us(gateway),
                _us(redis_us), _us(pg_us), _us(total), str(load.failures), usage,
            ])  # fmt: skip
    return header, rows


def _pct(seconds: float | None, load: Load) -> str:
    if seconds is None or load.share.available <= 0:
        return "-"
    return f"{100 * seconds / load.share.available:.0f}%"


def thread_split(threads: dict[str, float], requests: int) -> str:
    """CPU µs per request of the main thread and of the other threads."""
    if not threads or not requests:
        return "-"
    main, others = threads.get("main", 0.0), threads.get("others", 0.0)
    return f"{main * 1e6 / requests:.0f} + {others * 1e6 / requests:.0f}"


def notes(two: TwoNodes, cpus: Cpus, single: dict[int, WrkResult]) -> list[str]:
    out = [
        f"two nodes: two `opulon serve --quiet --redis ...` on one PostgreSQL database of "
        f"their own and the local Redis ({two.versions}); node one pinned to CPU "
        f"{cpus.gateway} (where the single node ran), node two to CPU {cpus.tools} (with nginx "
        "and the benchmark's own processes); Redis and PostgreSQL are the machine's services, "
        "not pinned: they run on whichever CPU is free, both shared with the nodes",
        "two nodes, one node loaded: one wrk at that node, pinned to the other node's CPU, "
        "while the other node idles (for node one that is the single node's arrangement); "
        "both nodes: one wrk per node at once, 16 connections each, each wrk on the other "
        "node's CPU, so four busy processes and Redis and PostgreSQL share two CPUs; req/s is "
        "the sum (node one + node two), p50/p99 the worse of the two",
        "+p50 ms vs single: the node's p50 minus the single SQLite node's p50 at the same "
        "connections in this run",
        "gateway us/req: CPU time of both nodes' processes per answer (the idle node's too); "
        "Redis us/req: redis-server's; PostgreSQL us/req: the backends of the bench database "
        "plus the WAL writer, background writer and checkpointer; from /proc, minus what "
        f"Redis and PostgreSQL used in {IDLE_SECONDS:g} s with the nodes idle just before "
        "(other users of the shared services); total: their sum. The single node's figure is "
        "the gateway's alone (its SQLite writes are in its process)",
    ]
    rates = [
        f"{load.label} c{load.connections}: Redis {load.share.redis_idle_rate * 1e3:.0f} ms/s, "
        f"PostgreSQL {load.share.pg_idle_rate * 1e3:.0f} ms/s"
        for load in two.loads
    ]
    if rates:
        out.append("idle use taken off (CPU ms per second): " + "; ".join(rates))
    splits = [
        f"{load.label} c{load.connections}: backends {_us(load.per_request(load.share.pg_backends))}, "
        f"shared {_us(load.per_request(load.share.pg_shared))} us/req"
        for load in two.loads
        if load.share.pg_backends is not None
    ]
    if splits:
        out.append("PostgreSQL split: " + "; ".join(splits))
    threads = [
        f"single node c{conns}: {thread_split(result.thread_cpu_s, result.requests)}"
        for conns, result in sorted(single.items())
    ] + [
        f"{load.label} c{load.connections}: {thread_split(load.share.threads, load.requests)}"
        for load in two.loads
    ]
    out.append(
        "gateway CPU by thread, us/req, main thread (the event loop) + other threads (the "
        "usage writer, the pools), from /proc/<pid>/task: " + "; ".join(threads)
    )
    machine = [
        f"{load.label} c{load.connections}: {100 * load.share.busy / load.share.available:.0f}% "
        f"busy; nodes {_pct(load.share.gateway, load)}, Redis {_pct(load.share.redis, load)}, "
        f"PostgreSQL {_pct(load.share.postgres, load)}, wrk {_pct(load.share.wrk, load)}, "
        f"nginx {_pct(load.share.upstream, load)}, everything else "
        f"{_pct(load.share.others, load)}"
        for load in two.loads
        if load.share.available > 0
    ]
    if machine:
        out.append(
            "the machine's CPUs during each load (% of all CPUs together, from /proc/stat; "
            "everything else: other users of the machine, the kernel, the benchmark's Python; "
            "Redis and PostgreSQL without their idle use, which counts as everything else): "
            + "; ".join(machine)
        )
    placed = []
    for load in two.loads:
        parts = []
        for name, counts in load.share.placement.items():
            total = sum(counts.values())
            if total:
                where = ", ".join(
                    f"CPU {cpu} {100 * n / total:.0f}%" for cpu, n in sorted(counts.items())
                )
                parts.append(f"{name} {where}")
        if parts:
            placed.append(f"{load.label} c{load.connections} (nodes on CPU "
                          f"{'+'.join(str(c) for c in load.node_cpus)}): {'; '.join(parts)}")  # fmt: skip
    if placed:
        out.append(
            "where Redis and the bench database's PostgreSQL backends ran during each load "
            "(the CPU each last ran on, sampled every 50 ms): " + " / ".join(placed)
        )
    scripts = [
        f"{load.label} c{load.connections}: {load.share.script_calls / load.requests:.2f} "
        f"calls/req, {load.share.script_usec / load.share.script_calls:.0f} us/call"
        for load in two.loads
        if load.share.script_calls and load.share.script_usec is not None and load.requests
    ]
    if scripts:
        out.append(
            "Redis's own count of script calls (EVALSHA, INFO commandstats, every client's "
            "during the load) and its time inside them: " + "; ".join(scripts)
        )
    again = [
        f"{load.label} c{load.connections}: attempt {load.attempts} kept"
        f"{' (still: ' + load.disturbance() + ')' if load.disturbance() else ''}; before: "
        + "; ".join(load.disturbed)
        for load in two.loads
        if load.disturbed
    ]
    if again:
        out.append(
            "measured again because another client used Redis heavily around the load (at "
            f"most {ATTEMPTS} attempts): " + " / ".join(again)
        )
    return out + two.notes
