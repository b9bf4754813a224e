"""Child processes of the benchmark: started pinned to a CPU, always stopped again.

Every process is started in its own session, so the benchmark decides the order in which they
stop (the gateway first, with SIGTERM, so it writes its usage rows) and a Ctrl-C in the
terminal reaches only the benchmark itself. :class:`Processes` stops whatever is still running
on exit, also after an error or an interrupt.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit (inherited by its children); returns the new one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Cpus:
    """Which CPU the gateway gets and which one the load tools share."""

    def __init__(self, enabled: bool = True) -> None:
        allowed = sorted(os.sched_getaffinity(0))
        self.taskset = shutil.which("taskset")
        self.pinned = enabled and self.taskset is not None and len(allowed) >= 2
        self.gateway = allowed[0]
        self.tools = allowed[1] if len(allowed) >= 2 else allowed[0]

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (needs taskset and two CPUs)"
        return f"gateway on CPU {self.gateway}; wrk, nginx, mock and clients on CPU {self.tools}"

    def pin_self(self) -> None:
        """Put this process (the clients) on the tools' CPU; children inherit it."""
        if self.pinned:
            os.sched_setaffinity(0, {self.tools})

    def wrap(self, argv: Sequence[str], cpu: int | None) -> list[str]:
        if not self.pinned or cpu is None or self.taskset is None:
            return list(argv)
        return [self.taskset, "-c", str(cpu), *argv]


class Processes:
    """The children started by the benchmark."""

    def __init__(self) -> None:
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self._running.append((name, process))
        return process

    def stop(
        self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 40.0
    ) -> int:
        """Stop one child (and its process group) and wait for it, at most ``timeout``."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # Whatever the leader left behind in its group (nginx workers, say) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self._running = [(n, p) for n, p in self._running if p is not process]
        return process.returncode

    def stop_all(self) -> None:
        for _, process in reversed(list(self._running)):
            with contextlib.suppress(Exception):
                self.stop(process, timeout=15.0)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait (bounded) until something accepts connections on the loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout:.0f} s:\n{tail(log)}")


def wait_for_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait (bounded) until ``url`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")


def only_child(pid: int) -> int | None:
    """The single child process of ``pid`` (nginx's worker), if it has exactly one."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            children = handle.read().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def vm_rss_mb(pid: int) -> float | None:
    """The resident set size of ``pid`` in MB (from /proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def last_cpu(pid: int) -> int | None:
    """The CPU ``pid`` last ran on (``/proc/<pid>/stat``'s ``processor``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User plus system CPU time of ``pid``'s main thread (``main``) and of all its other
    threads together (``others``: the gateway's usage writer, libuv's and asyncio's pools)."""
    out = {"main": 0.0, "others": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, ValueError, IndexError):
            continue
        out["main" if tid == str(pid) else "others"] += seconds
    return out


def thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds by thread between two :func:`thread_cpu_seconds` readings (a thread that
    began in between counts all its time, one that ended in between counts nothing)."""
    return {name: seconds - before.get(name, 0.0) for name, seconds in after.items()}


def cpu_seconds(cpu: int) -> tuple[float, float] | None:
    """(busy, total) seconds CPU ``cpu`` has counted since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"cpu{cpu} "):
                    values = [int(v) for v in line.split()[1:9]]
                    idle = values[3] + values[4]
                    return (sum(values) - idle) / _TICK, sum(values) / _TICK
    except (OSError, ValueError):
        return None
    return None


class CpuMeter:
    """The CPU a process uses over an interval, and what other processes take of its core."""

    def __init__(self, pid: int, cpu: int) -> None:
        self.pid, self.cpu = pid, cpu
        self._threads = thread_cpu_seconds(pid)
        self._process = process_cpu_seconds(pid)
        self._core = cpu_seconds(cpu)
        self.threads: dict[str, float] = {}  # CPU seconds by thread name, after stop()

    def stop(self) -> tuple[float | None, float | None]:
        """(CPU seconds of the process, share of the core used by others in %)."""
        process, core = process_cpu_seconds(self.pid), cpu_seconds(self.cpu)
        self.threads = thread_delta(self._threads, thread_cpu_seconds(self.pid))
        if process is None or self._process is None:
            return None, None
        used = process - self._process
        if core is None or self._core is None or core[1] <= self._core[1]:
            return used, None
        busy, total = core[0] - self._core[0], core[1] - self._core[1]
        return used, max(0.0, 100 * (busy - used) / total)
