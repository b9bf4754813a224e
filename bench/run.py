"""Opulon's benchmark: what the gateway adds to every request, against a fixed-answer upstream.

Run it with the project's interpreter after installing the project::

    .venv/bin/python bench/run.py                   # about 7 minutes
    .venv/bin/python bench/run.py --log             # also with the per-request log line
    .venv/bin/python bench/run.py --profile         # py-spy profile of the 16-connection load
    .venv/bin/python bench/run.py --two-nodes-only  # two nodes on PostgreSQL and Redis
    .venv/bin/python bench/run.py --no-two-nodes    # the single node only

The upstream is nginx (from Debian) answering with a fixed chat completion or a fixed 20-chunk
SSE stream; the gateway is ``opulon serve --quiet`` started exactly as a user would, with
providers and a key added through the CLI. wrk measures the upstream directly and through the
gateway in the same run. Then two nodes on one PostgreSQL and one Redis (``two_nodes.py``)
are measured beside the single node. The results are printed and written to
``bench/results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import loads
import procs
import report
import two_nodes
import upstream
from loads import SlowResult, TtfbResult, WrkResult
from procs import LOOPBACK, Cpus, Processes

from opulon import interpreter

BENCH_DIR = Path(__file__).resolve().parent
# The tests' mock provider (the demo provider with fast mode), run as a script.
MOCK_PROVIDER = BENCH_DIR.parent / "tests" / "mock_provider.py"
UPSTREAM_KEY_ENV = "OPULON_BENCH_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-bench-upstream-0123456789abcdef"
DIRECT, DIRECT_XCPU = "direct", "direct-xcpu"
PHASE_GAP = 0.3  # seconds between load phases, so their usage rows are told apart by time

# The targets the gateway is held to.
TARGET_ADDED_P50_MS = 0.35
TARGET_ADDED_P99_MS = 1.0
TARGET_JSON_RPS = 5000
TARGET_JSON_P99_MS = 15.0
TARGET_STREAM_RPS = 1500
TARGET_TTFB_ADDED_MS = 0.5
TARGET_SLOW_RSS_MB = 200.0
# Two nodes on PostgreSQL and Redis, against the single SQLite node of the same run.
TARGET_TWO_NODES_ADDED_P50_MS = 0.25
TARGET_TWO_NODES_RPS = 4000
SINGLE = "single"  # the single SQLite node measured beside the two nodes


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- setup -----------------------------------------------------------------------------------


@dataclass
class Endpoint:
    json_port: int
    stream_port: int
    pid: int  # the process answering (nginx's worker), for its CPU time


@dataclass
class Upstream:
    kind: str  # "nginx" or "mock --fast"
    version: str
    # "direct": the upstream on the tools' CPU, as the gateway uses it; "direct-xcpu": a second
    # nginx on the gateway's CPU, to show what crossing CPUs costs without the gateway.
    endpoints: dict[str, Endpoint]

    @property
    def json_port(self) -> int:
        return self.endpoints[DIRECT].json_port

    @property
    def stream_port(self) -> int:
        return self.endpoints[DIRECT].stream_port


@dataclass
class Phase:
    """One load phase against the gateway, and the usage rows it must have produced."""

    label: str
    model: str
    started: float
    ended: float
    answered: int  # requests the client saw answered (200)
    in_flight: int = 0  # requests a timed run may cut off at its end (rows allowed beyond)
    ok: bool | None = None
    rows: int = 0
    detail: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    cpus: Cpus
    processes: Processes
    opulon: str
    wrk: str
    home: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    key: str = ""
    upstream: Upstream | None = None
    slow_port: int = 0
    notes: list[str] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    scripts: dict[tuple[str, bool], Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = self.tmp / "home"
        self.env = {**os.environ, "OPULON_HOME": str(self.home), UPSTREAM_KEY_ENV: UPSTREAM_KEY}
        self.env.pop("OPULON_MASTER_KEY", None)

    def cli(self, *argv: str) -> str:
        result = subprocess.run(
            [self.opulon, *argv], capture_output=True, text=True, env=self.env, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"opulon {' '.join(argv[:2])} failed: {result.stderr.strip()}")
        return result.stdout

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"


def start_upstream(bench: Bench) -> Upstream:
    """nginx with the fixed answers, or the mock provider in fast mode when nginx is missing."""
    nginx = None
    if bench.args.upstream == "nginx":
        nginx = upstream.ensure_tool("nginx", ("nginx-light", "nginx"), say)
    if nginx is not None:
        places = {DIRECT: bench.cpus.tools}
        if bench.cpus.pinned:
            places[DIRECT_XCPU] = bench.cpus.gateway
        endpoints: dict[str, Endpoint] = {}
        for name, cpu in places.items():
            endpoint = start_nginx(bench, nginx, name, cpu)
            if endpoint is None:
                break
            endpoints[name] = endpoint
        if DIRECT in endpoints:
            version = upstream.tool_version([nginx, "-v"]).replace("nginx version: ", "")
            return Upstream("nginx", version, endpoints)
    port = procs.free_port()
    argv = [sys.executable, str(MOCK_PROVIDER), "--port", str(port), "--fast"]
    process = bench.processes.start(
        "mock-fast", bench.cpus.wrap(argv, bench.cpus.tools), log=bench.log("mock-fast")
    )
    procs.wait_for_port(port, process, bench.log("mock-fast"), 20)
    why = "nginx could not be started" if bench.args.upstream == "nginx" else "--upstream mock"
    bench.notes.append(
        f"{why}: the upstream is the tests' mock provider in fast mode "
        "(`python tests/mock_provider.py --fast`), much slower than nginx"
    )
    say(f"{why}: the upstream is the mock provider in fast mode")
    return Upstream(
        "mock --fast", "tests/mock_provider.py", {DIRECT: Endpoint(port, port, process.pid)}
    )


def start_nginx(bench: Bench, nginx: str, name: str, cpu: int) -> Endpoint | None:
    json_port, stream_port = procs.free_port(), procs.free_port()
    config = upstream.nginx_config(bench.tmp / name, json_port, stream_port)
    argv = [nginx, "-p", str(config.parent), "-c", str(config), "-e", "stderr"]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        say(f"nginx rejected the generated configuration:\n{check.stderr}")
        return None
    log = bench.log(f"nginx-{name}")
    process = bench.processes.start(f"nginx-{name}", bench.cpus.wrap(argv, cpu), log=log)
    procs.wait_for_port(json_port, process, log, 15)
    procs.wait_for_port(stream_port, process, log, 15)
    # The master listens before it forks its worker: wait (bounded) for the worker to exist.
    worker = None
    deadline = time.monotonic() + 10
    while worker is None and time.monotonic() < deadline:
        worker = procs.only_child(process.pid)
        if worker is None:
            time.sleep(0.05)
    return Endpoint(json_port, stream_port, worker or process.pid)


def start_slow_mock(bench: Bench) -> int:
    port = procs.free_port()
    argv = [
        sys.executable, str(MOCK_PROVIDER), "--port", str(port),
        "--chunk-delay-ms", str(bench.args.slow_chunk_delay_ms), "--chunks",
        str(upstream.STREAM_CHUNKS),
    ]  # fmt: skip
    process = bench.processes.start(
        "mock-slow", bench.cpus.wrap(argv, bench.cpus.tools), log=bench.log("mock-slow")
    )
    procs.wait_for_port(port, process, bench.log("mock-slow"), 20)
    return port


def configure_gateway(bench: Bench) -> None:
    """Providers and the key, added with the CLI as a user would."""
    assert bench.upstream is not None
    routes = (
        ("bench-json", bench.upstream.json_port, upstream.JSON_MODEL),
        ("bench-stream", bench.upstream.stream_port, upstream.STREAM_MODEL),
        ("bench-slow", bench.slow_port, upstream.SLOW_MODEL),
    )
    for name, port, model in routes:
        bench.cli("providers", "add", name, "--kind", "openai", "--base-url",
                  f"http://{LOOPBACK}:{port}/v1", "--api-key-env", UPSTREAM_KEY_ENV,
                  "--models", model)  # fmt: skip
    created = json.loads(
        bench.cli(
            "keys",
            "create",
            "--name",
            "bench",
            "--limit",
            "requests:100M/1m",
            "--limit",
            "tokens:100B/1h",
            "--json",
        )
    )
    bench.key = created["key"]


@contextlib.contextmanager
def gateway(bench: Bench, *, log_requests: bool) -> Iterator[tuple[int, int]]:
    """A running ``opulon serve`` (port, pid); stopped with SIGTERM so it writes its rows."""
    port = procs.free_port()
    argv = [bench.opulon, "serve", "--port", str(port)]
    if not log_requests:
        argv.append("--quiet")
    name = "gateway-log" if log_requests else "gateway"
    process = bench.processes.start(
        name, bench.cpus.wrap(argv, bench.cpus.gateway), log=bench.log(name), env=bench.env
    )
    try:
        procs.wait_for_http(f"http://{LOOPBACK}:{port}/healthz", process, bench.log(name), 30)
        note = f"the gateway's Python loads {interpreter.SLOWER_BUILD}"
        if interpreter.shared_libpython(process.pid) and note not in bench.notes:
            bench.notes.append(note)
            say(note)
        yield port, process.pid
    finally:
        code = bench.processes.stop(process, signal.SIGTERM, timeout=45)
        # uvicorn shuts down gracefully, then ends itself with the signal it received.
        if code not in (0, -signal.SIGTERM):
            bench.notes.append(f"the gateway exited with status {code} after SIGTERM")


# -- load phases -----------------------------------------------------------------------------


@dataclass
class Measure:
    scenario: str
    target: str
    connections: int
    result: WrkResult


def preflight(bench: Bench, port: int) -> None:
    """One request of each kind through the gateway, checked byte for byte where it can be."""
    assert bench.upstream is not None
    started = time.time()
    headers = {"Authorization": f"Bearer {bench.key}", "Content-Type": "application/json"}
    url = f"http://{LOOPBACK}:{port}{upstream.CHAT_PATH}"
    body = upstream.request_body(upstream.JSON_MODEL, stream=False)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = response.read()
    if bench.upstream.kind == "nginx" and answer != upstream.completion_body():
        raise RuntimeError("the gateway changed the non-streaming answer")
    body = upstream.request_body(upstream.STREAM_MODEL, stream=True)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = response.read()
    if upstream.count_content_events(answer) != upstream.STREAM_CHUNKS:
        raise RuntimeError("the streamed answer through the gateway lost chunks")
    if b'"choices":[]' in answer or not answer.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError("the gateway did not strip the usage chunk it asked for")
    bench.phases.append(Phase("preflight", "*", started, time.time(), 2))
    time.sleep(PHASE_GAP)


def wrk_scripts(bench: Bench) -> dict[tuple[str, bool], Path]:
    """Lua scripts per (direct or gateway, streaming)."""
    scripts: dict[tuple[str, bool], Path] = {}
    for target, auth in ((DIRECT, f"Bearer {UPSTREAM_KEY}"), ("gateway", f"Bearer {bench.key}")):
        for stream in (False, True):
            model = upstream.STREAM_MODEL if stream else upstream.JSON_MODEL
            path = bench.tmp / f"wrk-{target}-{'stream' if stream else 'json'}.lua"
            loads.write_wrk_script(path, upstream.request_body(model, stream=stream), auth)
            scripts[target, stream] = path
    return scripts


SCENARIOS: tuple[tuple[str, bool, int], ...] = (
    ("chat JSON", False, 1),
    ("chat JSON", False, 16),
    ("chat JSON", False, 64),
    ("chat stream, 20 chunks", True, 1),
    ("chat stream, 20 chunks", True, 16),
)


def is_direct(target: str) -> bool:
    return target.startswith(DIRECT)


@dataclass
class Target:
    """Where a load goes: a gateway (port, pid) or one of the upstream's endpoints."""

    name: str
    port: int = 0
    pid: int = 0

    def resolve(self, bench: Bench, stream: bool) -> tuple[int, int, int]:
        """(port, pid, cpu) for this load."""
        if not is_direct(self.name):
            return self.port, self.pid, bench.cpus.gateway
        assert bench.upstream is not None
        endpoint = bench.upstream.endpoints[self.name]
        port = endpoint.stream_port if stream else endpoint.json_port
        cpu = bench.cpus.gateway if self.name == DIRECT_XCPU else bench.cpus.tools
        return port, endpoint.pid, cpu


def wrk_phase(
    bench: Bench,
    target: Target,
    stream: bool,
    connections: int,
    seconds: float,
    *,
    warmup: bool = False,
) -> WrkResult:
    """One wrk run, counting the CPU time of the process that answers."""
    if not bench.scripts:
        bench.scripts = wrk_scripts(bench)
    port, pid, cpu = target.resolve(bench, stream)
    meter = procs.CpuMeter(pid, cpu) if pid and not warmup else None
    result = loads.run_wrk(
        bench.cpus.wrap([bench.wrk], bench.cpus.tools),
        f"http://{LOOPBACK}:{port}{upstream.CHAT_PATH}",
        bench.scripts[DIRECT if is_direct(target.name) else "gateway", stream],
        connections=connections,
        duration=seconds,
    )
    if meter is not None:
        result.server_cpu_s, result.core_other_pct = meter.stop()
        result.thread_cpu_s = meter.threads
        if target.name == DIRECT and bench.cpus.tools != bench.cpus.gateway:
            result.core_other_pct = None  # that nginx shares its CPU with wrk
    if not is_direct(target.name):
        model = upstream.STREAM_MODEL if stream else upstream.JSON_MODEL
        label = f"{target.name} {'stream' if stream else 'json'} c{connections}"
        if warmup:
            label += " warm-up"
        bench.phases.append(
            Phase(label, model, result.started, result.ended, result.requests, connections)
        )
    time.sleep(PHASE_GAP)
    return result


def run_wrk_scenarios(bench: Bench, targets: list[Target], measures: list[Measure]) -> None:
    """Every scenario, the targets interleaved so that drift on the machine hits them alike.

    The cross-CPU control (nginx on the gateway's CPU) runs at one connection only: that is
    where waking a process on another CPU shows in the latency.
    """
    for scenario, stream, connections in SCENARIOS:
        for target in targets:
            if target.name == DIRECT_XCPU and connections != 1:
                continue
            say(f"{scenario}, {connections} connection(s), {target.name}")
            if bench.args.warmup > 0:
                wrk_phase(bench, target, stream, connections, bench.args.warmup, warmup=True)
            result = wrk_phase(bench, target, stream, connections, bench.args.duration)
            measures.append(Measure(scenario, target.name, connections, result))


def ttfb_phase(bench: Bench, target: Target) -> TtfbResult:
    port, _, _ = target.resolve(bench, True)
    auth = f"Bearer {UPSTREAM_KEY if is_direct(target.name) else bench.key}"
    say(f"time to first event, {bench.args.ttfb_requests} sequential streams, {target.name}")
    result = loads.ttfb(
        port,
        upstream.request_body(upstream.STREAM_MODEL, stream=True),
        auth,
        requests=bench.args.ttfb_requests,
        warmup=max(10, bench.args.ttfb_requests // 25),
        expect_chunks=upstream.STREAM_CHUNKS,
        time_limit=max(60.0, bench.args.ttfb_requests * 0.1),
    )
    if not is_direct(target.name):
        answered = result.requests - result.failures
        label = f"{target.name} ttfb"
        phase = Phase(label, upstream.STREAM_MODEL, result.started, result.ended, answered)
        bench.phases.append(phase)
    time.sleep(PHASE_GAP)
    return result


def slow_phase(bench: Bench, port: int, pid: int) -> SlowResult:
    streams = bench.args.slow_streams
    say(f"{streams} concurrent slow streams through the gateway")
    limit = 60.0 + upstream.STREAM_CHUNKS * bench.args.slow_chunk_delay_ms / 1000 * 3
    result = loads.slow_streams(
        f"http://{LOOPBACK}:{port}{upstream.CHAT_PATH}",
        upstream.request_body(upstream.SLOW_MODEL, stream=True),
        f"Bearer {bench.key}",
        streams=streams,
        expect_chunks=upstream.STREAM_CHUNKS,
        chunk_delay_s=bench.args.slow_chunk_delay_ms / 1000,
        time_limit=limit,
        rss=lambda: procs.vm_rss_mb(pid),
    )
    bench.phases.append(
        Phase(
            "gateway slow streams",
            upstream.SLOW_MODEL,
            result.started,
            result.ended,
            result.completed,
            streams - result.completed,
        )
    )
    time.sleep(PHASE_GAP)
    return result


# -- usage rows ------------------------------------------------------------------------------


def check_usage(bench: Bench, phases: list[Phase]) -> None:
    """Every answered request has its usage row, with the upstream's token counts."""
    expected_tokens = {
        upstream.JSON_MODEL: (upstream.PROMPT_TOKENS, upstream.COMPLETION_TOKENS),
        upstream.STREAM_MODEL: (upstream.PROMPT_TOKENS, upstream.COMPLETION_TOKENS),
    }
    if bench.upstream is not None and bench.upstream.kind != "nginx":
        expected_tokens = {}
    db = bench.home / "opulon.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for phase in phases:
            rows = conn.execute(
                "SELECT model, status, input_tokens, output_tokens FROM usage "
                "WHERE ts >= ? AND ts <= ?",
                (phase.started - 0.01, phase.ended + 0.01),
            ).fetchall()
            phase.rows = len(rows)
            ok_rows = [row for row in rows if row[1] == 200]
            odd = [row for row in rows if row[1] not in (200, 499)]
            wrong_tokens = sum(
                1
                for model, _, tin, tout in ok_rows
                if model in expected_tokens and (tin, tout) != expected_tokens[model]
            )
            slow_wrong = sum(
                1
                for model, _, _, tout in ok_rows
                if model == upstream.SLOW_MODEL and tout != upstream.STREAM_CHUNKS
            )
            problems = []
            if len(ok_rows) < phase.answered:
                problems.append(f"{phase.answered - len(ok_rows)} answered without a row")
            if len(rows) > phase.answered + phase.in_flight:
                problems.append(f"{len(rows) - phase.answered - phase.in_flight} extra rows")
            if odd:
                problems.append(f"{len(odd)} rows with status {sorted({r[1] for r in odd})}")
            if wrong_tokens or slow_wrong:
                problems.append(f"{wrong_tokens + slow_wrong} rows with wrong token counts")
            phase.ok = not problems
            phase.detail = "; ".join(problems)


# -- the report ------------------------------------------------------------------------------


@dataclass
class Verdict:
    target: str
    measured: str
    passed: bool


def _opt(value: float | None, template: str) -> str:
    return "-" if value is None else template.format(value)


def _find(measures: list[Measure], scenario: str, target: str, conns: int) -> WrkResult | None:
    for measure in measures:
        if (measure.scenario, measure.target, measure.connections) == (scenario, target, conns):
            return measure.result
    return None


def build_report(
    bench: Bench,
    measures: list[Measure],
    ttfbs: dict[str, TtfbResult],
    slow: SlowResult | None,
) -> tuple[str, str, bool, bool]:
    """(plain text, markdown, correctness ok, targets met)."""
    header = ["scenario", "target", "conns", "req/s", "p50 ms", "p90 ms", "p99 ms",
              "+p50 ms", "+p99 ms", "CPU us/req", "others %", "errors", "usage rows"]  # fmt: skip
    rows: list[list[str]] = []
    phase_of = {phase.label: phase for phase in bench.phases}
    for measure in measures:
        result = measure.result
        direct = _find(measures, measure.scenario, DIRECT, measure.connections)
        plus50 = plus99 = "-"
        if measure.target != DIRECT and direct is not None:
            plus50 = report.fmt_delta(result.ms("p50") - direct.ms("p50"))
            plus99 = report.fmt_delta(result.ms("p99") - direct.ms("p99"))
        usage = "-"
        label = f"{measure.target} {'stream' if 'stream' in measure.scenario else 'json'}"
        phase = phase_of.get(f"{label} c{measure.connections}")
        if phase is not None:
            usage = f"{phase.rows}/{phase.answered} {'ok' if phase.ok else 'FAIL'}"
        rows.append([
            measure.scenario, measure.target, str(measure.connections),
            report.fmt_count(result.rps), report.fmt_ms(result.ms("p50")),
            report.fmt_ms(result.ms("p90")), report.fmt_ms(result.ms("p99")), plus50, plus99,
            _opt(result.cpu_us_per_request, "{:.0f}"), _opt(result.core_other_pct, "{:.0f}"),
            str(result.failures), usage,
        ])  # fmt: skip
    for target, first in ttfbs.items():
        direct_ttfb = ttfbs.get(DIRECT)
        plus50 = plus99 = "-"
        if target != DIRECT and direct_ttfb is not None:
            plus50 = report.fmt_delta(first.percentile(50) - direct_ttfb.percentile(50))
            plus99 = report.fmt_delta(first.percentile(99) - direct_ttfb.percentile(99))
        phase = phase_of.get(f"{target} ttfb")
        usage = f"{phase.rows}/{phase.answered} {'ok' if phase.ok else 'FAIL'}" if phase else "-"
        rows.append([
            f"stream first event ({len(first.samples_ms)} seq.)", target, "1", "-",
            report.fmt_ms(first.percentile(50)), report.fmt_ms(first.percentile(90)),
            report.fmt_ms(first.percentile(99)), plus50, plus99, "-", "-", str(first.failures),
            usage,
        ])  # fmt: skip
    if slow is not None:
        phase = phase_of.get("gateway slow streams")
        usage = f"{phase.rows}/{phase.answered} {'ok' if phase.ok else 'FAIL'}" if phase else "-"
        rows.append([
            f"slow streams, {upstream.STREAM_CHUNKS}x{bench.args.slow_chunk_delay_ms:g} ms",
            "gateway", str(slow.streams), f"{slow.completed} done",
            f"{slow.median_stream_s * 1000:.0f}", "-", "-", "-", "-", "-", "-",
            str(sum(slow.failures.values())), usage,
        ])  # fmt: skip

    verdicts = verdicts_of(bench, measures, ttfbs, slow)
    correct = all(v.passed for v in verdicts if v.target.startswith("no request"))
    met = all(v.passed for v in verdicts)
    vheader = ["target", "measured", "result"]
    vrows = [[v.target, v.measured, "PASS" if v.passed else "FAIL"] for v in verdicts]

    upstream_kind = bench.upstream.kind if bench.upstream else "?"
    title = (
        f"gateway = `opulon serve --quiet` (no per-request log line)"
        f"{'; gateway+log = without --quiet' if bench.args.log else ''}; "
        f"upstream = {upstream_kind}; {bench.args.duration:g} s per run after "
        f"{bench.args.warmup:g} s warm-up; CPUs: {bench.cpus.describe()}"
    )
    notes = [
        "req/s: answers per second (whole 20-chunk answers for streams); +p50/+p99: minus "
        "direct. First event: time from sending the request to the first `data:` event.",
        f"{DIRECT_XCPU}: wrk at a second nginx pinned to the gateway's CPU: what crossing CPUs "
        "costs on this machine without any gateway (the gateway's answers cross CPUs twice)"
        if bench.upstream is not None and DIRECT_XCPU in bench.upstream.endpoints
        else "",
        "slow streams: p50 column is the median whole-stream time in ms; peak gateway RSS "
        f"{slow.rss_peak_mb:.0f} MB (before: {slow.rss_before_mb:.0f} MB)"
        if slow
        else "",
        "CPU us/req: CPU time (user + system) of the answering process per answer: the gateway, "
        "or the upstream (nginx's worker) for direct; 1e6 / CPU us is what one core could serve. "
        "others %: share of the gateway's CPU taken by other processes during the run (noise).",
        "usage rows: rows in the gateway's `usage` table for the run / answers the client got "
        "(a timed run may leave up to one request per connection cut off: it has a row too)",
        *bench.notes,
    ]
    notes = [n for n in notes if n]
    text = "\n".join([
        title, "", report.text_table(header, rows), "", report.text_table(vheader, vrows), "",
        *(f"* {note}" for note in notes),
    ])  # fmt: skip
    markdown = "\n".join([
        f"{title}\n", report.markdown_table(header, rows), "",
        report.markdown_table(vheader, vrows),
        "", *(f"* {note}" for note in notes),
    ])  # fmt: skip
    return text, markdown, correct, met


def verdicts_of(
    bench: Bench,
    measures: list[Measure],
    ttfbs: dict[str, TtfbResult],
    slow: SlowResult | None,
) -> list[Verdict]:
    out: list[Verdict] = []
    direct1 = _find(measures, "chat JSON", DIRECT, 1)
    xcpu1 = _find(measures, "chat JSON", DIRECT_XCPU, 1)
    gate1 = _find(measures, "chat JSON", "gateway", 1)
    if direct1 and gate1:
        for point, limit in (("p50", TARGET_ADDED_P50_MS), ("p99", TARGET_ADDED_P99_MS)):
            added = gate1.ms(point) - direct1.ms(point)
            measured = f"{added:+.2f} ms"
            if xcpu1 is not None:
                # What remains once the cost of crossing CPUs on this machine is taken out.
                measured += f" ({gate1.ms(point) - xcpu1.ms(point):+.2f} ms vs {DIRECT_XCPU})"
            out.append(Verdict(f"1 conn: added {point} <= {limit:g} ms", measured, added <= limit))
    for target in ("gateway", "gateway+log"):
        for conns in (16, 64):
            result = _find(measures, "chat JSON", target, conns)
            if result is None:
                continue
            out.append(Verdict(
                f"{target} JSON {conns} conns: >= {TARGET_JSON_RPS:,} req/s, "
                f"p99 <= {TARGET_JSON_P99_MS:g} ms",
                f"{result.rps:,.0f} req/s, p99 {result.ms('p99'):.2f} ms",
                result.rps >= TARGET_JSON_RPS and result.ms("p99") <= TARGET_JSON_P99_MS,
            ))  # fmt: skip
        streams = [m.result for m in measures if m.target == target and "stream" in m.scenario]
        if streams:
            best = max(r.rps for r in streams)
            out.append(Verdict(f"{target} >= {TARGET_STREAM_RPS:,} streamed answers/s",
                               f"{best:,.0f}/s", best >= TARGET_STREAM_RPS))  # fmt: skip
    if DIRECT in ttfbs and "gateway" in ttfbs:
        gateway50 = ttfbs["gateway"].percentile(50)
        added = gateway50 - ttfbs[DIRECT].percentile(50)
        measured = f"{added:+.2f} ms"
        if DIRECT_XCPU in ttfbs:
            measured += (
                f" ({gateway50 - ttfbs[DIRECT_XCPU].percentile(50):+.2f} ms vs {DIRECT_XCPU})"
            )
        out.append(Verdict(f"first event: p50 at most {TARGET_TTFB_ADDED_MS} ms above direct",
                           measured, added <= TARGET_TTFB_ADDED_MS))  # fmt: skip
    if slow is not None:
        out.append(Verdict(
            f"{slow.streams:,} slow streams all complete, RSS < {TARGET_SLOW_RSS_MB:g} MB",
            f"{slow.completed:,} complete, peak {slow.rss_peak_mb:.0f} MB",
            slow.completed == slow.streams and slow.rss_peak_mb < TARGET_SLOW_RSS_MB,
        ))  # fmt: skip
        half = bench.args.slow_chunk_delay_ms / 2
        smallest = slow.smallest_gap_s * 1000 if slow.gaps else float("nan")
        out.append(Verdict(
            "slow streams: each chunk forwarded as it arrives",
            f"{slow.bunched:,} of {slow.gaps:,} gaps under {half:g} ms; smallest {smallest:.0f} ms",
            slow.gaps > 0 and slow.bunched == 0,
        ))  # fmt: skip
    errors = sum(m.result.failures for m in measures)
    errors += sum(t.failures for t in ttfbs.values())
    errors += sum(slow.failures.values()) if slow else 0
    bad = [p for p in bench.phases if not p.ok]
    rows_seen = sum(p.rows for p in bench.phases)
    answered = sum(p.answered for p in bench.phases)
    detail = f"{errors} errors; usage rows {rows_seen:,} for {answered:,} answered"
    if bad:
        detail += "; " + "; ".join(f"{p.label}: {p.detail or 'not checked'}" for p in bad)
    out.append(Verdict("no request lost or failed", detail, errors == 0 and not bad))
    return out


def two_node_report(
    bench: Bench, two: two_nodes.TwoNodes, single_phases: list[Phase]
) -> tuple[str, str, bool, bool]:
    """The two nodes beside the single node: (plain text, markdown, correct, targets met)."""
    single = two.single
    phase_of = {phase.label: phase for phase in single_phases}
    single_rows = {
        conns: f"{phase.rows}/{phase.answered} {'ok' if phase.ok else 'FAIL'}"
        for conns in single
        if (phase := phase_of.get(f"{SINGLE} json c{conns}")) is not None
    }
    header, rows = two_nodes.table(two, single, single_rows, bench.cpus)
    verdicts: list[Verdict] = []
    one1, two1 = two.find("node one", 1), two.find("node two", 1)
    if 1 in single and one1 is not None:
        added = one1.ms("p50") - single[1].ms("p50")
        measured = f"{added:+.2f} ms (node one, on the single node's CPU)"
        if two1 is not None:
            measured += f"; node two {two1.ms('p50') - single[1].ms('p50'):+.2f} ms"
        verdicts.append(Verdict(
            f"two nodes, 1 conn: p50 at most {TARGET_TWO_NODES_ADDED_P50_MS:g} ms above the "
            "single node's", measured, added <= TARGET_TWO_NODES_ADDED_P50_MS,
        ))  # fmt: skip
    alone = [load for load in (two.find("node one", 16), two.find("node two", 16)) if load]
    if alone:
        worst = min(load.rps for load in alone)
        measured = ", ".join(f"{load.label} {load.rps:,.0f}" for load in alone)
        both = two.find("both nodes", 16)
        if both is not None:
            per_node = " + ".join(f"{r.rps:,.0f}" for r in both.results)
            measured += f" (both at once on 2 CPUs: {per_node})"
        verdicts.append(Verdict(
            f"two nodes, 16 conns: >= {TARGET_TWO_NODES_RPS:,} req/s per node (one loaded, "
            "the other idle)", measured, worst >= TARGET_TWO_NODES_RPS,
        ))  # fmt: skip
    every = two.loads + two.discarded  # the attempts measured again must be right too
    errors = sum(load.failures for load in every)
    errors += sum(result.failures for result in single.values())
    bad = [load for load in every if not load.rows_ok]
    bad_single = [phase for phase in single_phases if not phase.ok]
    rows_seen = sum(load.rows for load in every)
    answered = sum(load.requests for load in every)
    single_seen = sum(phase.rows for phase in single_phases)
    single_answered = sum(phase.answered for phase in single_phases)
    detail = (
        f"{errors} errors; usage rows in PostgreSQL {rows_seen:,} for {answered:,} answered, "
        f"in the single node's SQLite {single_seen:,} for {single_answered:,}"
    )
    if bad or bad_single:
        detail += "; " + "; ".join(
            [f"{load.label} c{load.connections}: {load.rows_detail or 'not checked'}"
             for load in bad]
            + [f"{phase.label}: {phase.detail or 'not checked'}" for phase in bad_single]
        )  # fmt: skip
    passed = not errors and not bad and not bad_single
    verdicts.append(Verdict("two nodes: no request lost or failed", detail, passed))
    correct = verdicts[-1].passed
    met = all(v.passed for v in verdicts)
    vheader = ["target", "measured", "result"]
    vrows = [[v.target, v.measured, "PASS" if v.passed else "FAIL"] for v in verdicts]
    title = (
        f"Two nodes on PostgreSQL and Redis beside the single node on SQLite, chat JSON; "
        f"{bench.args.duration:g} s per run after {bench.args.warmup:g} s warm-up"
    )
    notes = two_nodes.notes(two, bench.cpus, single)
    text = "\n".join([
        title, "", report.text_table(header, rows), "", report.text_table(vheader, vrows), "",
        *(f"* {note}" for note in notes),
    ])  # fmt: skip
    markdown = "\n".join([
        "## Two nodes", "", f"{title}\n", report.markdown_table(header, rows), "",
        report.markdown_table(vheader, vrows), "", *(f"* {note}" for note in notes),
    ])  # fmt: skip
    return text, markdown, correct, met


def machine_lines(bench: Bench) -> list[str]:
    wrk_version = upstream.tool_version([bench.wrk, "-v"]).split(" [")[0]
    return [
        f"* date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"* machine: {os.cpu_count()} CPUs (nproc), {report.cpu_model()}, "
        f"load average at start {bench.args.load_at_start}",
        f"* {interpreter.summary()}; {wrk_version}; upstream "
        f"{bench.upstream.version if bench.upstream else '?'}",
        f"* command: `{shlex.join(sys.orig_argv)}`; code: {bench.args.code_version} (at start)",
    ]


# -- profile ---------------------------------------------------------------------------------


def ensure_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    for candidate in (local, shutil.which("py-spy")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    say("installing py-spy into this environment with pip ...")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not os.access(local, os.X_OK):
        say(f"could not install py-spy: {result.stderr.strip()[-500:]}")
        return None
    return str(local)


def run_profile(bench: Bench, port: int, pid: int) -> None:
    import profile_summary

    py_spy = ensure_py_spy()
    if py_spy is None:
        raise SystemExit(2)
    out = BENCH_DIR / "out"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    seconds = max(1, round(bench.args.duration))
    conns = bench.args.profile_connections
    target = Target("gateway", port, pid)
    files = {
        "speedscope": out / f"profile-{stamp}.speedscope.json",
        "flamegraph": out / f"profile-{stamp}.svg",
    }
    say(f"warming up: {bench.args.warmup:g} s of 16 connections")
    if bench.args.warmup > 0:
        wrk_phase(bench, target, False, 16, bench.args.warmup, warmup=True)
    results: dict[str, WrkResult] = {}
    for fmt, path in files.items():
        argv = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds + 1),
                "--rate", str(bench.args.profile_rate), "--format", fmt,
                "-o", str(path)]  # fmt: skip
        if bench.args.profile_native:
            argv.append("--native")
        recorder = bench.processes.start(f"py-spy-{fmt}", argv, log=bench.log(f"py-spy-{fmt}"))
        time.sleep(0.5)  # let it attach
        say(f"profiling ({fmt}) under {conns} connections of chat JSON for {seconds} s")
        results[fmt] = wrk_phase(bench, target, False, conns, seconds)
        try:
            recorder.wait(timeout=seconds + 60)
        finally:
            bench.processes.stop(recorder, signal.SIGINT, timeout=30)
        if not path.exists():
            raise RuntimeError(f"py-spy wrote nothing:\n{procs.tail(bench.log(f'py-spy-{fmt}'))}")
    summary = profile_summary.summarize(files["speedscope"], top=bench.args.profile_top)
    load = results["speedscope"]
    text = (
        f"gateway under {conns} connections of chat JSON: {load.rps:,.0f} req/s while sampled "
        f"at {bench.args.profile_rate} Hz ({load.failures} errors)\n\n{summary}"
    )
    summary_path = out / f"profile-{stamp}-top.txt"
    summary_path.write_text(text + "\n")
    print(text)
    print(f"\nflamegraph: {files['flamegraph']}\nspeedscope: {files['speedscope']}")
    print(f"summary: {summary_path}")


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the Opulon gateway against a fixed-answer upstream."
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per run (10)")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up seconds per run (2)")
    parser.add_argument("--ttfb-requests", type=int, default=500, help="sequential streams (500)")
    parser.add_argument("--slow-streams", type=int, default=1000, help="concurrent streams (1000)")
    parser.add_argument("--slow-chunk-delay-ms", type=float, default=200, help="delay (200)")
    parser.add_argument(
        "--upstream", choices=("nginx", "mock"), default="nginx", help="fixed-answer upstream"
    )
    parser.add_argument("--log", action="store_true", help="also measure without --quiet")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results.md")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    parser.add_argument("--profile", action="store_true", help="profile with py-spy instead")
    parser.add_argument("--profile-rate", type=int, default=250, help="samples per second")
    parser.add_argument("--profile-native", action="store_true", help="include C frames")
    parser.add_argument("--profile-top", type=int, default=25, help="functions to list")
    parser.add_argument(
        "--profile-connections", type=int, default=16, help="connections while profiling (16)"
    )
    parser.add_argument(
        "--two-nodes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run two nodes on PostgreSQL and Redis (default: yes; --no-two-nodes skips)",
    )
    parser.add_argument(
        "--two-nodes-only",
        action="store_true",
        help="only the two nodes, beside the single node's chat JSON at 1 and 16 connections "
        "(with --profile: profile node one)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("OPULON_BENCH_POSTGRES_URL", two_nodes.DEFAULT_POSTGRES_URL),
        help="a PostgreSQL database the benchmark may CREATE DATABASE from "
        f"({two_nodes.DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("OPULON_BENCH_REDIS_URL", two_nodes.DEFAULT_REDIS_URL),
        help=f"the Redis the two nodes share ({two_nodes.DEFAULT_REDIS_URL})",
    )
    args = parser.parse_args()
    if args.two_nodes_only and not args.two_nodes:
        parser.error("--two-nodes-only and --no-two-nodes contradict each other")
    if not 1 <= args.duration <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be 1..600 s and --warmup 0..60 s")
    if not 1 <= args.ttfb_requests <= 100_000 or not 1 <= args.slow_streams <= 20_000:
        parser.error("--ttfb-requests must be 1..100000 and --slow-streams 1..20000")
    args.load_at_start = report.load_average()
    args.code_version = code_version()
    return args


def code_version() -> str:
    """The commit measured, and whether the gateway's code had changes beyond it at start."""
    root = BENCH_DIR.parent

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    changed = git("status", "--porcelain", "--", "opulon")
    return f"commit {commit}" + (" with uncommitted changes in opulon/" if changed else "")


def _terminate(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def find_opulon() -> str:
    local = Path(sys.executable).parent / "opulon"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("opulon")
    if found is None:
        raise SystemExit("opulon is not installed: run `pip install -e .` in the project first")
    return found


def main() -> int:
    args = parse_args()
    # Ctrl-C, a hang-up or a kill end the run through the same cleanup (even when started in
    # the background, where SIGINT would otherwise be ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    limit = procs.raise_fd_limit()
    if limit < args.slow_streams * 2 + 512:
        raise SystemExit(f"the open-file limit is {limit}: too low for {args.slow_streams} streams")
    cpus = Cpus(enabled=not args.no_pin)
    cpus.pin_self()
    wrk = upstream.ensure_tool("wrk", ("wrk",), say)
    if wrk is None:
        return 2
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="opulon-bench-"))
    tmp.chmod(0o711)  # nginx workers run as an unprivileged user and need to get in
    bench = Bench(args, tmp, cpus, processes, find_opulon(), wrk)
    try:
        return run(bench)
    finally:
        processes.stop_all()
        if args.keep_tmp:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def two_node_setup(bench: Bench) -> two_nodes.Setup:
    assert bench.upstream is not None
    return two_nodes.Setup(
        opulon=bench.opulon,
        wrk=bench.wrk,
        tmp=bench.tmp,
        cpus=bench.cpus,
        processes=bench.processes,
        env=bench.env,
        upstream_key_env=UPSTREAM_KEY_ENV,
        json_port=bench.upstream.json_port,
        upstream_pid=bench.upstream.endpoints[DIRECT].pid,
        check_body=bench.upstream.kind == "nginx",
        duration=bench.args.duration,
        warmup=bench.args.warmup,
        postgres_url=bench.args.postgres_url,
        redis_url=bench.args.redis_url,
        say=say,
    )


def run_two_nodes(bench: Bench) -> tuple[two_nodes.TwoNodes, list[Phase]]:
    """The two nodes, with the single SQLite node running beside them and measured between
    their loads (its phases checked against its usage table once it has stopped)."""
    phases_before = len(bench.phases)
    with gateway(bench, log_requests=False) as (port, pid):
        preflight(bench, port)
        target = Target(SINGLE, port, pid)

        def single(connections: int) -> WrkResult:
            if bench.args.warmup > 0:
                wrk_phase(bench, target, False, connections, bench.args.warmup, warmup=True)
            return wrk_phase(bench, target, False, connections, bench.args.duration)

        two = two_nodes.run(two_node_setup(bench), single)
    check_usage(bench, bench.phases[phases_before:])
    return two, bench.phases[phases_before:]


def profile_two_nodes(bench: Bench) -> None:
    """py-spy on node one of the two, under the same load as the single node's profile."""
    notes: list[str] = []
    with two_nodes.cluster(two_node_setup(bench), notes) as found:
        bench.key, bench.scripts = found.key, {}  # wrk's scripts with the cluster's key
        node = found.nodes[0]
        say(f"profiling node one (CPU {node.cpu}; node two idles on CPU {found.nodes[1].cpu})")
        run_profile(bench, node.port, node.pid)
    for note in notes:
        say(note)


def run(bench: Bench) -> int:
    args = bench.args
    bench.upstream = start_upstream(bench)
    if not args.profile and not args.two_nodes_only:
        bench.slow_port = start_slow_mock(bench)
    else:
        bench.slow_port = procs.free_port()  # a route nothing uses here
    configure_gateway(bench)
    if args.profile:
        if args.two_nodes_only:
            profile_two_nodes(bench)
            return 0
        with gateway(bench, log_requests=False) as (port, pid):
            run_profile(bench, port, pid)
        return 0

    measures: list[Measure] = []
    ttfbs: dict[str, TtfbResult] = {}
    slow: SlowResult | None = None
    text = markdown = ""
    correct = met = True
    if not args.two_nodes_only:
        variants = [("gateway", False)] + ([("gateway+log", True)] if args.log else [])
        for index, (name, log_requests) in enumerate(variants):
            phases_before = len(bench.phases)
            with gateway(bench, log_requests=log_requests) as (port, pid):
                preflight(bench, port)
                gate = Target(name, port, pid)
                targets = [gate]
                if index == 0:
                    targets[:0] = [Target(name) for name in bench.upstream.endpoints]
                run_wrk_scenarios(bench, targets, measures)
                if index == 0:
                    for target in targets:
                        ttfbs[target.name] = ttfb_phase(bench, target)
                    slow = slow_phase(bench, port, pid)
            # The gateway has stopped (SIGTERM): every usage row is on disk now.
            check_usage(bench, bench.phases[phases_before:])
        text, markdown, correct, met = build_report(bench, measures, ttfbs, slow)
    why_not = two_nodes.unavailable(two_node_setup(bench)) if args.two_nodes else ""
    if why_not:
        say(f"two nodes skipped: {why_not}")
        if args.two_nodes_only:
            return 2
        markdown += f"\n\nTwo nodes: not measured, {why_not}."
        text += f"\n\nTwo nodes: not measured, {why_not}."
    elif args.two_nodes:
        two, single_phases = run_two_nodes(bench)
        two_text, two_markdown, two_correct, two_met = two_node_report(bench, two, single_phases)
        text = f"{text}\n\n{two_text}" if text else two_text
        markdown = f"{markdown}\n\n{two_markdown}" if markdown else two_markdown
        correct, met = correct and two_correct, met and two_met
    print(text)
    machine = machine_lines(bench)
    print("\n" + "\n".join(machine))
    args.results.write_text(
        "# Opulon gateway benchmark\n\n" + "\n".join(machine) + "\n\n" + markdown + "\n"
    )
    say(f"wrote {args.results}")
    if not correct:
        return 2
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; every process the benchmark started has been stopped")
        sys.exit(130)
