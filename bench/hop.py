"""Which upstream client: a bare proxy hop measured with each candidate, on one CPU.

    .venv/bin/python bench/hop.py              # about 2 minutes

The hop (``bench/hop_app.py``) is a raw ASGI app under uvicorn (uvloop, httptools) that
forwards each chat completion to nginx's fixed answer and sends it back: no keys, limits or
usage rows, so the client is the only difference. The candidates:

* ``httpx``: ``httpx.AsyncClient``;
* ``aiohttp-session``: ``aiohttp.ClientSession.request``;
* ``opulon``: aiohttp's pool, writer and parser driven directly
  (:class:`opulon.gateway.upstream.UpstreamClient`, what the gateway uses).

Variants are interleaved round by round; the table gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import loads
import procs
import report
import upstream
from procs import LOOPBACK, Cpus, Processes

BENCH_DIR = Path(__file__).resolve().parent
CLIENTS = ("httpx", "aiohttp-session", "opulon")


def say(message: str) -> None:
    print(f"[hop] {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds per run (5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per client (2)")
    parser.add_argument("--connections", default="1,16", help="comma-separated (1,16)")
    args = parser.parse_args()
    if not 1 <= args.duration <= 120 or not 1 <= args.rounds <= 10:
        parser.error("--duration must be 1..120 s and --rounds 1..10")
    connections = [int(c) for c in args.connections.split(",")]
    if not all(1 <= c <= 1024 for c in connections):
        parser.error("--connections must be 1..1024 each")

    cpus = Cpus()
    cpus.pin_self()
    wrk = upstream.ensure_tool("wrk", ("wrk",), say)
    nginx = upstream.ensure_tool("nginx", ("nginx-light", "nginx"), say)
    if wrk is None or nginx is None:
        return 2
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="opulon-hop-"))
    tmp.chmod(0o711)
    try:
        json_port, stream_port = procs.free_port(), procs.free_port()
        config = upstream.nginx_config(tmp / "nginx", json_port, stream_port)
        log = tmp / "nginx.log"
        argv = [nginx, "-p", str(config.parent), "-c", str(config), "-e", "stderr"]
        nginx_process = processes.start("nginx", cpus.wrap(argv, cpus.tools), log=log)
        procs.wait_for_port(json_port, nginx_process, log, 15)
        script = loads.write_wrk_script(
            tmp / "hop.lua",
            upstream.request_body(upstream.JSON_MODEL, stream=False),
            "Bearer sk-hop",
        )
        results: dict[tuple[str, int], list[loads.WrkResult]] = {}
        for round_ in range(args.rounds):
            for client in CLIENTS:
                port = procs.free_port()
                env = {
                    **os.environ,
                    "HOP_CLIENT": client,
                    "HOP_UPSTREAM": f"http://{LOOPBACK}:{json_port}",
                }
                argv = [
                    sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH_DIR), "hop_app:app",
                    "--host", LOOPBACK, "--port", str(port), "--loop", "uvloop",
                    "--http", "httptools", "--no-access-log", "--log-level", "warning",
                ]  # fmt: skip
                log = tmp / f"hop-{client}.log"
                hop = processes.start(client, cpus.wrap(argv, cpus.gateway), log=log, env=env)
                procs.wait_for_port(port, hop, log, 30)
                url = f"http://{LOOPBACK}:{port}{upstream.CHAT_PATH}"
                wrk_argv = cpus.wrap([wrk], cpus.tools)
                loads.run_wrk(wrk_argv, url, script, connections=16, duration=1)  # warm-up
                for conns in connections:
                    say(f"round {round_ + 1}: {client}, {conns} connection(s)")
                    meter = procs.CpuMeter(hop.pid, cpus.gateway)
                    result = loads.run_wrk(
                        wrk_argv, url, script, connections=conns, duration=args.duration
                    )
                    result.server_cpu_s, result.core_other_pct = meter.stop()
                    if result.failures:
                        raise RuntimeError(f"{client}: {result.failures} failed requests")
                    results.setdefault((client, conns), []).append(result)
                processes.stop(hop, signal.SIGTERM, timeout=20)
    finally:
        processes.stop_all()

    header = ["client", "conns", "req/s", "p50 ms", "p99 ms", "CPU us/req"]
    rows = []
    for conns in connections:
        for client in CLIENTS:
            runs = results[client, conns]
            cpu = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
            rows.append([
                client, str(conns), report.fmt_count(statistics.median(r.rps for r in runs)),
                report.fmt_ms(statistics.median(r.ms("p50") for r in runs)),
                report.fmt_ms(statistics.median(r.ms("p99") for r in runs)),
                f"{statistics.median(cpu):.0f}" if cpu else "-",
            ])  # fmt: skip
    print(f"bare hop on one CPU ({cpus.describe()}); medians of {args.rounds} round(s) of "
          f"{args.duration:g} s")  # fmt: skip
    print(report.markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
