"""Several ``opulon serve`` nodes on one PostgreSQL and one Redis: limits exact across nodes.

Two gateway processes on different ports share a store (a schema of this test's own in the
test PostgreSQL) and the shared limiter's Redis. Requests split across both against a key's
limits are admitted exactly as one node would admit them: a request window, a token window
(overshooting only by what answers used beyond their reservations), a lifetime budget and a
concurrency limit. The failure tests run their own Redis (``redis-server`` on a free loopback
port, keeping nothing on disk) so that they can stop and start it: while it is down a node
refuses with 503 in the API's shape, or with ``--on-redis-failure=local`` admits with its own
counts; after a restart the counts are rebuilt from the stored rows and stay exact. A node
killed with ``kill -9`` in the middle of streams frees their concurrency slots within the
lease, while the other node keeps serving and every answer it finished is a row.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from gateway_helpers import OPULON as OPULON_BIN
from gateway_helpers import (
    UPSTREAM_KEY,
    Gateway,
    another_node,
    cli,
    free_port,
    streams_until_killed,
)
from mock_provider import MockConfig, MockProvider
from services import PrivateRedis, redis_url
from store_engines import postgres_schema

CHAT: dict[str, Any] = {
    "model": "gpt-4o",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "shared limits"}],
}


@dataclass
class Cluster:
    """Two nodes on one store and one Redis, in front of one mock provider."""

    url: str  # the store's database URL
    redis: str
    nodes: list[Gateway]
    mock: MockProvider

    def key(self, *options: str) -> str:
        """A new key (created through the CLI), once every node answers it."""
        found = json.loads(cli(self.nodes[0].home, "--database", self.url, "keys", "create",
                               "--name", "shared", *options, "--json"))  # fmt: skip
        created: str = found["key"]
        for node in self.nodes:
            _until(node, created, 200)
        return created

    def rows(self, key: str, wait_for: int = 0, timeout: float = 5.0) -> list[tuple[int, int]]:
        """(input, output) tokens of the key's usage rows, waiting for ``wait_for`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            with psycopg.connect(self.url) as conn:
                rows = conn.execute(
                    "SELECT input_tokens, output_tokens FROM usage WHERE key_prefix = %s",
                    [key[:16]],
                ).fetchall()
            if len(rows) >= wait_for or time.monotonic() > deadline:
                return [(int(i), int(o)) for i, o in rows]
            time.sleep(0.05)


def _until(node: Gateway, key: str, status: int, timeout: float = 5.0) -> float:
    """Seconds until ``node`` answers ``status`` for ``key`` on ``GET /v1/models``."""
    started = time.monotonic()
    headers = {"authorization": f"Bearer {key}"}
    while True:
        answer = httpx.get(node.url + "/v1/models", headers=headers, timeout=5)
        if answer.status_code == status:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, (node.url, answer.status_code, answer.text)
        time.sleep(0.05)


def _start_cluster(base: Path, url: str, redis: str, *serve_args: str) -> Cluster:
    with pytest.MonkeyPatch.context() as patch:
        # The CLI and both nodes on this store (each test's own environment names none).
        patch.setenv("OPULON_DATABASE_URL", url)
        return _start_nodes(base, url, redis, *serve_args)


def _start_nodes(base: Path, url: str, redis: str, *serve_args: str) -> Cluster:
    mock = MockProvider(MockConfig(api_key=UPSTREAM_KEY)).start()
    first = base / "one"
    (first / "tmp").mkdir(parents=True)
    one = Gateway(first / "home", first / "tmp", free_port(), mock, first / "server.log")
    cli(one.home, "providers", "add", "mock-openai", "--kind", "openai", "--base-url",
        mock.url + "/v1", "--api-key-env", "UPSTREAM_KEY", "--models", "gpt-*",
        env={"UPSTREAM_KEY": UPSTREAM_KEY})  # fmt: skip
    two = another_node(one, base / "two")
    cluster = Cluster(url, redis, [one, two], mock)
    try:
        for node in cluster.nodes:
            node.start("--redis", redis, *serve_args)
    except BaseException:
        _stop_cluster(cluster)
        raise
    return cluster


def _stop_cluster(cluster: Cluster) -> None:
    for node in cluster.nodes:
        if node.process is not None:
            node.stop()
    cluster.mock.stop()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.fixture(scope="module")
def cluster(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = _start_cluster(tmp_path_factory.mktemp("nodes"), database, redis_url())
    yield started
    _stop_cluster(started)


async def _split(
    cluster: Cluster, key: str, count: int, body: dict[str, Any]
) -> list[httpx.Response]:
    """``count`` simultaneous requests with ``key``, alternating between the nodes."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(node: Gateway) -> httpx.Response:
            response = await client.post(
                node.url + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            )
            await response.aread()
            return response

        nodes = cluster.nodes
        return await asyncio.gather(*(one(nodes[i % len(nodes)]) for i in range(count)))


def _statuses(responses: list[httpx.Response]) -> list[int]:
    return [response.status_code for response in responses]


# -- exact across nodes ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_hundred_requests_across_two_nodes_admit_exactly_ten(
    cluster: Cluster, stream: bool
) -> None:
    key = cluster.key("--limit", "requests:10/1m")
    responses = asyncio.run(_split(cluster, key, 100, {**CHAT, "stream": stream}))
    statuses = _statuses(responses)
    assert statuses.count(200) == 10 and statuses.count(429) == 90, statuses
    # Both nodes admitted some and refused some: the count is one, not one per node.
    by_node = {node.url: [r.status_code for r in responses if str(r.url).startswith(node.url)]
               for node in cluster.nodes}  # fmt: skip
    assert all(len(answers) == 50 for answers in by_node.values())
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["message"].startswith("limit requests:10/1m reached")
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    if stream:
        assert all(
            r.text.rstrip().endswith("data: [DONE]") for r in responses if r.status_code == 200
        )
    assert len(cluster.rows(key, wait_for=10)) == 10


def test_a_token_window_across_two_nodes_overshoots_only_by_use_beyond_reservations(
    cluster: Cluster,
) -> None:
    # A long prompt and max_tokens 1: each answer uses a little more than it reserved.
    body = {**CHAT, "max_tokens": 1, "stream": True, "mock": {"chunk-delay-ms": 10},
            "messages": [{"role": "user", "content": "y" * 4000}]}  # fmt: skip
    from opulon.usage_extract import estimate_input_tokens

    reserved = estimate_input_tokens(json.dumps(body).encode()) + 1
    limit = reserved * 6  # room for exactly six reservations
    key = cluster.key("--limit", f"tokens:{limit}/1m")
    statuses = _statuses(asyncio.run(_split(cluster, key, 40, body)))
    assert statuses.count(200) == 6, statuses
    rows = cluster.rows(key, wait_for=6)
    used = sum(i + o for i, o in rows)
    beyond = sum(max(0, i + o - reserved) for i, o in rows)
    assert len(rows) == 6 and used <= limit + beyond


def test_a_lifetime_budget_across_two_nodes_is_spent_exactly_once(cluster: Cluster) -> None:
    key = cluster.key("--budget", "requests:7")
    statuses = _statuses(asyncio.run(_split(cluster, key, 40, CHAT)))
    assert statuses.count(200) == 7 and statuses.count(429) == 33, statuses
    # Spent for good: later requests on either node are refused too.
    assert set(_statuses(asyncio.run(_split(cluster, key, 4, CHAT)))) == {429}


def test_a_concurrency_of_three_holds_across_two_nodes(cluster: Cluster) -> None:
    key = cluster.key("--concurrency", "3")
    slow = {**CHAT, "stream": True, "mock": {"chunk-delay-ms": 40}}
    responses = asyncio.run(_split(cluster, key, 30, slow))
    statuses = _statuses(responses)
    assert statuses.count(200) == 3 and statuses.count(429) == 27, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert "concurrency" in refused.json()["error"]["message"]
    # The slots are free again once those answers ended, on both nodes.
    assert _statuses(asyncio.run(_split(cluster, key, 2, CHAT))) == [200, 200]


def test_both_nodes_say_their_limits_are_shared(cluster: Cluster) -> None:
    for node in cluster.nodes:
        health = httpx.get(node.url + "/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["limits"] == "shared"


# -- failures: a Redis of the test's own -------------------------------------------------------


@pytest.fixture
def own_database() -> Iterator[str]:
    """A store of the test's own (its nodes' master key is a new one)."""
    with postgres_schema() as url:
        yield url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis
    redis.stop()


def test_without_redis_a_node_refuses_with_503_and_after_a_restart_counts_stay_exact(
    own_database: str, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    cluster = _start_cluster(tmp_path / "c", own_database, private_redis.url)
    try:
        key = cluster.key("--limit", "requests:10/1m")
        assert _statuses(asyncio.run(_split(cluster, key, 4, CHAT))) == [200] * 4
        assert len(cluster.rows(key, wait_for=4)) == 4
        private_redis.stop()
        started = time.monotonic()
        answer = httpx.post(cluster.nodes[0].url + "/v1/chat/completions", json=CHAT,
                            headers={"authorization": f"Bearer {key}"}, timeout=10)  # fmt: skip
        assert time.monotonic() - started < 5  # refused within a bounded time
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert "shared limiter" in error["message"] and error["code"] == "limiter_unavailable"
        assert answer.headers["retry-after"] == "1"
        assert private_redis.url.split("//")[1] not in answer.text  # no address for clients
        # Readiness is looked at once a second at most: the next look says not ready.
        deadline = time.monotonic() + 5
        while (
            health := httpx.get(cluster.nodes[1].url + "/healthz", timeout=10)
        ).status_code == 200:
            assert time.monotonic() < deadline, "the node stayed ready without its Redis"
            time.sleep(0.2)
        assert health.status_code == 503
        assert health.json()["reason"] == "the shared limiter's Redis does not answer"
        # Redis comes back empty: the counts are rebuilt from the stored rows (4 used).
        private_redis.start()
        for node in cluster.nodes:
            deadline = time.monotonic() + 10
            while httpx.get(node.url + "/healthz", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "the node did not become ready again"
                time.sleep(0.2)
        statuses = _statuses(asyncio.run(_split(cluster, key, 20, CHAT)))
        assert statuses.count(200) == 6 and statuses.count(429) == 14, statuses
        log = cluster.nodes[0].output.read_text()
        assert "cannot be reached" in log
    finally:
        _stop_cluster(cluster)


def test_with_the_local_fallback_a_node_admits_on_its_own_counts_and_says_so(
    own_database: str, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    cluster = _start_cluster(tmp_path / "c", own_database, private_redis.url,
                             "--on-redis-failure", "local")  # fmt: skip
    try:
        key = cluster.key("--limit", "requests:3/1m")
        private_redis.stop()
        node = cluster.nodes[0]
        headers = {"authorization": f"Bearer {key}"}
        statuses = [httpx.post(node.url + "/v1/chat/completions", json=CHAT, headers=headers,
                               timeout=10).status_code for _ in range(5)]  # fmt: skip
        assert statuses == [200, 200, 200, 429, 429]  # this node's own count of the window
        health = httpx.get(node.url + "/healthz", timeout=10)
        assert health.status_code == 200  # it serves, and says how it counts meanwhile
        assert health.json()["limits"] == "this node's while Redis is down"
        log = node.output.read_text()
        assert "limits are per node and inexact meanwhile" in log
    finally:
        _stop_cluster(cluster)


def test_a_node_killed_mid_stream_frees_its_slots_within_the_lease(
    own_database: str, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    lease = 4.0
    cluster = _start_cluster(tmp_path / "c", own_database, private_redis.url,
                             "--redis-lease", str(lease))  # fmt: skip
    one, two = cluster.nodes
    try:
        key = cluster.key("--concurrency", "2")
        headers = {"authorization": f"Bearer {key}"}
        # Two long streams on node one take both slots.
        long = {**CHAT, "stream": True, "mock": {"chunk-delay-ms": 500, "chunks": 60}}
        streams = [
            subprocess.Popen(["curl", "-sN", "-o", "/dev/null", "-H", f"authorization: Bearer {key}",
                              "-H", "content-type: application/json", "-d",
                              json.dumps(long), one.url + "/v1/chat/completions"])
            for _ in range(2)
        ]  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while httpx.post(two.url + "/v1/chat/completions", json=CHAT, headers=headers,
                             timeout=10).status_code != 429:  # fmt: skip
                assert time.monotonic() < deadline, "the streams never took the slots"
                time.sleep(0.05)
            # Node two keeps serving other keys meanwhile, and every answer it finished is a row.
            other = cluster.key()
            assert one.process is not None
            one.process.send_signal(signal.SIGKILL)
            one.process.wait(timeout=10)
            one.process = None
            killed = time.monotonic()
            served = _statuses(asyncio.run(_split_to(two, other, 10)))
            assert served == [200] * 10
            # The dead node's slots come free within the lease (and its renewals stopped).
            while True:
                answer = httpx.post(two.url + "/v1/chat/completions", json=CHAT,
                                    headers=headers, timeout=10)  # fmt: skip
                if answer.status_code == 200:
                    break
                assert answer.status_code == 429, answer.text
                assert time.monotonic() - killed < lease + 2, "the slots were not freed"
                time.sleep(0.1)
            assert time.monotonic() - killed > lease / 3  # held until the lease ran out
            assert len(cluster.rows(other, wait_for=10)) == 10
        finally:
            for stream in streams:
                stream.kill()
                stream.wait(timeout=10)
    finally:
        _stop_cluster(cluster)


def test_every_answer_a_node_finished_before_a_kill_9_has_its_row(
    own_database: str, tmp_path: Path
) -> None:
    cluster = _start_cluster(tmp_path / "c", own_database, redis_url())
    one, two = cluster.nodes
    try:
        key = cluster.key("--limit", "requests:100000/1m")
        finished, begun = asyncio.run(streams_until_killed(one, key))
        assert finished > 50, (finished, begun)
        # Node two serves on; node one's rows are written when it starts again.
        assert _statuses(asyncio.run(_split_to(two, key, 10))) == [200] * 10
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OPULON_DATABASE_URL", cluster.url)
            one.start("--redis", cluster.redis)
        rows = cluster.rows(key, wait_for=finished + 10, timeout=10)
        assert finished + 10 <= len(rows) <= begun + 10
    finally:
        _stop_cluster(cluster)


async def _split_to(node: Gateway, key: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        headers = {"authorization": f"Bearer {key}"}
        return await asyncio.gather(*(client.post(node.url + "/v1/chat/completions", json=CHAT,
                                                  headers=headers) for _ in range(count)))  # fmt: skip


@pytest.mark.parametrize("outage", ["refused", "silent"])
def test_a_database_outage_delays_rows_but_loses_none_and_blocks_no_request(
    own_database: str, tmp_path: Path, outage: str
) -> None:
    from urllib.parse import urlsplit, urlunsplit

    from tcp_proxy import TcpRelay

    parts = urlsplit(own_database)
    relay = TcpRelay((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{relay.port}")
    through_relay = urlunsplit(parts._replace(netloc=netloc))
    cluster = _start_cluster(tmp_path / "c", through_relay, redis_url())
    try:
        key = cluster.key("--limit", "requests:100/1m")
        assert _statuses(asyncio.run(_split(cluster, key, 10, CHAT))) == [200] * 10
        # The database is gone: refusing connections, or answering nothing at all.
        relay.cut() if outage == "refused" else relay.stall()
        during = []
        for _ in range(10):  # about three seconds without it
            began = time.monotonic()
            during += _statuses(asyncio.run(_split(cluster, key, 4, CHAT)))
            assert time.monotonic() - began < 2, "a request waited on the database"
            time.sleep(0.3)
        assert set(during) == {200}, during
        deadline = time.monotonic() + 8
        while (
            health := httpx.get(cluster.nodes[0].url + "/healthz", timeout=10)
        ).status_code == 200:
            assert time.monotonic() < deadline, "the node stayed ready without its database"
            time.sleep(0.2)
        assert health.json()["reason"] == "the database does not answer"
        relay.restore() if outage == "refused" else relay.resume()
        rows = cluster.rows(key, wait_for=10 + len(during), timeout=30)
        assert len(rows) == 10 + len(during)
    finally:
        _stop_cluster(cluster)
        relay.close()


def test_several_workers_of_one_serve_share_the_limits_through_redis(
    own_database: str, tmp_path: Path
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPULON_DATABASE_URL", own_database)
        mock = MockProvider(MockConfig(api_key=UPSTREAM_KEY)).start()
        (tmp_path / "tmp").mkdir()
        node = Gateway(tmp_path / "home", tmp_path / "tmp", free_port(), mock, tmp_path / "log")
        cli(node.home, "providers", "add", "mock-openai", "--kind", "openai", "--base-url",
            mock.url + "/v1", "--api-key-env", "UPSTREAM_KEY", "--models", "gpt-*",
            env={"UPSTREAM_KEY": UPSTREAM_KEY})  # fmt: skip
        cluster = Cluster(own_database, redis_url(), [node], mock)
        try:
            node.start("--redis", redis_url(), "--workers", "2")
            assert node.process is not None
            workers = subprocess.run(["pgrep", "-P", str(node.process.pid)],
                                     capture_output=True, text=True).stdout.split()  # fmt: skip
            assert len(workers) >= 2, workers  # the supervisor's two workers
            key = cluster.key("--limit", "requests:10/1m")
            statuses = _statuses(asyncio.run(_split(cluster, key, 100, CHAT)))
            assert statuses.count(200) == 10 and statuses.count(429) == 90, statuses
            assert "2 workers" in node.output.read_text()
        finally:
            _stop_cluster(cluster)


def test_workers_without_redis_are_refused_with_what_to_add(tmp_path: Path) -> None:
    from cli_helpers import run_error

    message = run_error("serve", "--workers", "3")
    assert "--workers 3 needs --redis URL" in message
    assert "--redis redis://127.0.0.1:6379/0 --workers 3" in message


def test_a_new_key_that_reuses_a_deleted_keys_id_starts_with_counts_of_its_own(
    tmp_path: Path,
) -> None:
    # SQLite gives the next key the id of the newest one once it is deleted; here the node is
    # down meanwhile, so it never saw the deletion to forget the old key's counts in Redis.
    from gateway_helpers import start_gateway

    node = start_gateway(tmp_path, None, "--redis", redis_url())
    try:
        old = node.create_key("old", "--limit", "requests:3/1m")
        headers = {"authorization": f"Bearer {old}"}
        statuses = [httpx.post(node.url + "/v1/chat/completions", json=CHAT, headers=headers,
                               timeout=10).status_code for _ in range(4)]  # fmt: skip
        assert statuses == [200, 200, 200, 429]
        with sqlite3.connect(node.home / "opulon.db") as conn:
            key_id, created = conn.execute("SELECT id, created_at FROM keys").fetchone()
        old_names = f"*{{k{key_id}.{int(created * 1_000_000):x}}}*"
        assert _redis_names(old_names)  # the old key's counts are in Redis
        node.stop()
        cli(node.home, "keys", "delete", old[:16], "--yes")
        new = node.create_key("new", "--limit", "requests:3/1m")
        shown = json.loads(cli(node.home, "keys", "show", new[:16], "--json"))
        old_id = json.loads(cli(node.home, "keys", "list", "--json"))
        assert all(key["prefix"] != old[:16] for key in old_id)
        node.start("--redis", redis_url())
        headers = {"authorization": f"Bearer {new}"}
        statuses = [httpx.post(node.url + "/v1/chat/completions", json=CHAT, headers=headers,
                               timeout=10).status_code for _ in range(4)]  # fmt: skip
        assert statuses == [200, 200, 200, 429], shown
        # The node that starts sweeps the deleted key's counts out of Redis.
        deadline = time.monotonic() + 5
        while _redis_names(old_names):
            assert time.monotonic() < deadline, "the deleted key's counts stayed in Redis"
            time.sleep(0.1)
    finally:
        if node.process is not None:
            node.stop()
        node.mock.stop()


def test_nodes_sharing_limits_may_serve_one_data_dir_but_none_beside_one_counting_alone(
    tmp_path: Path,
) -> None:
    from gateway_helpers import start_gateway

    first = start_gateway(tmp_path, None, "--redis", redis_url())
    second = Gateway(first.home, first.tmp, free_port(), first.mock, tmp_path / "second.log")
    try:
        second.start("--redis", redis_url())  # shares the limits: welcome
        alone = subprocess.run(
            [OPULON_BIN, "serve", "--port", str(free_port())],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "OPULON_HOME": str(first.home)},
        )  # fmt: skip
        assert alone.returncode != 0
        lines = alone.stderr.strip().splitlines()
        assert lines[-1].startswith("error: another opulon serve"), alone.stderr
        assert "--redis URL" in lines[-1] and "Traceback" not in alone.stderr
    finally:
        for node in (second, first):
            if node.process is not None:
                node.stop()
        first.mock.stop()


def _redis_names(pattern: str) -> list[str]:
    """The names in the test Redis that match ``pattern``."""
    import redis

    client = redis.Redis.from_url(redis_url())
    try:
        return [name.decode() for name in client.scan_iter(match=pattern, count=1000)]
    finally:
        client.close()


def test_a_redis_restart_under_load_leaves_the_limits_exact(
    own_database: str, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    cluster = _start_cluster(tmp_path / "c", own_database, private_redis.url)
    try:
        key = cluster.key("--limit", "requests:30/1m")
        slow = {**CHAT, "stream": True, "mock": {"chunk-delay-ms": 30}}

        async def load() -> list[int]:
            """Requests in waves of four, across both nodes, with Redis restarted between."""
            statuses: list[int] = []
            for wave in range(30):  # bounded: at most 120 requests
                if wave == 4:
                    private_redis.stop()  # in the middle of the load, streams in flight
                if wave == 6:
                    private_redis.start()  # back, and empty
                statuses += _statuses(await _split(cluster, key, 4, slow))
                if statuses.count(429) >= 8:
                    break
                await asyncio.sleep(0.1)
            return statuses

        statuses = asyncio.run(load())
        assert 503 in statuses  # the outage was seen
        # Every admitted request counts once, before and after the restart: exactly 30 of them
        # (the rebuilt counts come from the stored rows, and the renewals bring back what was
        # in flight).
        assert statuses.count(200) == 30, statuses
        assert len(cluster.rows(key, wait_for=30)) == 30
    finally:
        _stop_cluster(cluster)
