"""Instructions per request of the gateway process, counted by callgrind: a repeatable figure.

Wall-clock CPU time per request moves by ±30% between runs on a shared virtual machine;
the number of instructions the gateway executes per request does not. This runs
``opulon serve`` under ``valgrind --tool=callgrind`` against nginx's fixed answers
(bench/upstream.py), warms it up, zeroes the counters, sends ``--requests`` chat completions
over ``--connections`` keep-alive connections, dumps the counters, and divides. JSON answers
and 20-chunk streams are counted separately, in the same gateway process.

    .venv-serve/bin/python bench/instructions.py                       # this checkout
    .venv-serve/bin/python bench/instructions.py --python OTHER/.venv-serve/bin/python

``--python`` is the interpreter whose ``opulon`` is measured (another checkout's, to compare
two versions under the same load). Needs valgrind and nginx from Debian's packages (installed
when missing and run as root). About two minutes per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
import upstream

LOOPBACK = procs.LOOPBACK
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"


def say(message: str) -> None:
    print(f"[instructions] {message}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter with opulon")
    parser.add_argument("--requests", type=int, default=2000, help="counted, per scenario")
    parser.add_argument("--warmup", type=int, default=400, help="requests before counting")
    parser.add_argument("--connections", type=int, default=16)
    return parser.parse_args()


def opulon(python: str) -> list[str]:
    """The ``opulon`` command of that interpreter's environment (not ``-m``: the current
    directory's package would win)."""
    return [python, str(Path(python).parent / "opulon")]


def cli(python: str, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [*opulon(python), *args], env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise SystemExit(f"opulon {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


async def load(port: int, key: str, model: str, count: int, connections: int) -> int:
    """Send ``count`` chat completions over ``connections`` connections; the 200s."""
    body = upstream.request_body(model, stream=model == upstream.STREAM_MODEL)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    url = f"http://{LOOPBACK}:{port}{upstream.CHAT_PATH}"
    left = count
    ok = 0
    other: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal left, ok
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        ok += 1
                    else:
                        other[response.status] = other.get(response.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    if other:
        say(f"answers other than 200: {other}")
    return ok


def control(flag: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", flag, str(pid)], capture_output=True, check=True, timeout=120
    )


def dumped_instructions(directory: Path, before: set[Path]) -> int:
    """The instruction total of the newest dump written since ``before``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(directory.glob("callgrind.out*")) - before, key=os.path.getmtime)
        for path in reversed(new):
            match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.MULTILINE)
            if match:
                return int(match.group(1))
        time.sleep(0.5)
    raise SystemExit("callgrind wrote no dump")


def main() -> int:
    args = parse_args()
    for tool, packages in (("valgrind", ("valgrind",)), ("nginx", ("nginx-light", "nginx"))):
        if upstream.ensure_tool(tool, packages, say) is None:
            raise SystemExit(f"needs {tool}")
    nginx = shutil.which("nginx")
    assert nginx is not None
    processes = procs.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="opulon-instructions-"))
    tmp.chmod(0o755)  # nginx's worker (another user) reads the answers under it
    json_port, stream_port = procs.free_port(), procs.free_port()
    config = upstream.nginx_config(tmp / "nginx", json_port, stream_port)
    nginx_process = processes.start(
        "nginx", [nginx, "-p", str(config.parent), "-c", str(config), "-e", "stderr"],
        log=tmp / "nginx.log",
    )  # fmt: skip
    procs.wait_for_port(stream_port, nginx_process, tmp / "nginx.log", 15)
    env = {**os.environ, "OPULON_HOME": str(tmp / "home"), UPSTREAM_KEY_ENV: "sk-bench"}
    for model, port in ((upstream.JSON_MODEL, json_port), (upstream.STREAM_MODEL, stream_port)):
        cli(args.python, env, "providers", "add", model, "--kind", "openai", "--base-url",
            f"http://{LOOPBACK}:{port}/v1", "--api-key-env", UPSTREAM_KEY_ENV, "--models", model)  # fmt: skip
    created = cli(args.python, env, "keys", "create", "--name", "bench", "--limit",
                  "requests:100M/1m", "--limit", "tokens:100B/1h", "--json")  # fmt: skip
    key = json.loads(created)["key"]
    port = procs.free_port()
    dumps = tmp / "callgrind"
    dumps.mkdir()
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={dumps}/callgrind.out.%p",
        *opulon(args.python), "serve", "--port", str(port), "--quiet",
    ]  # fmt: skip
    gateway = processes.start("gateway", argv, log=tmp / "gateway.log", env=env)
    procs.wait_for_http(f"http://{LOOPBACK}:{port}/healthz", gateway, tmp / "gateway.log", 600)
    version = cli(args.python, env, "--version").strip()
    say(f"measuring {version} ({args.python})")
    results: dict[str, float] = {}
    for model in (upstream.JSON_MODEL, upstream.STREAM_MODEL):
        asyncio.run(load(port, key, model, args.warmup, args.connections))
        control("--zero", gateway.pid)
        ok = asyncio.run(load(port, key, model, args.requests, args.connections))
        if ok != args.requests:
            log = procs.tail(tmp / "gateway.log")
            raise SystemExit(f"{model}: {ok} of {args.requests} answered 200; gateway log:\n{log}")
        before = set(dumps.glob("callgrind.out*"))
        control("--dump", gateway.pid)
        results[model] = dumped_instructions(dumps, before) / args.requests
        say(f"{model}: {results[model]:,.0f} instructions per request")
    processes.stop(gateway)
    processes.stop(nginx_process)
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{version}: {args.connections} connections, {args.requests} requests each: "
        f"JSON {results[upstream.JSON_MODEL]:,.0f} instructions/request, "
        f"20-chunk stream {results[upstream.STREAM_MODEL]:,.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
