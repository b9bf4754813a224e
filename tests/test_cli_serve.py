from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cli_helpers import run_error
from gateway_helpers import OPULON, free_port
from tls_helpers import self_signed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "4"], "--workers 4 needs --redis URL: without it each worker keeps"),
        (["--workers", "0"], "--workers"),
        (["--redis", "http://127.0.0.1:6379"], "invalid --redis http://127.0.0.1:6379"),
        (["--redis", "redis://:pw@127.0.0.1:x/0"], "invalid --redis URL"),
        (
            ["--redis", "redis://127.0.0.1:6379/0", "--on-redis-failure", "maybe"],
            "invalid --on-redis-failure 'maybe': refuse or local",
        ),
        (["--ssl-certfile", "cert.pem"], "both --ssl-certfile and --ssl-keyfile"),
        (["--max-body", "lots"], "invalid amount 'lots'"),
        (["--port", "70000"], "less than or equal to 65535"),
        (["--read-timeout", "0"], "--read-timeout"),
        (["--host", "0.0.0.0"], "clear text"),
    ],
)
def test_bad_serve_options_are_one_line(args: list[str], message: str) -> None:
    assert message in run_error("serve", *args)


def test_serve_speaks_tls_with_its_own_certificate(tmp_path: Path, isolated_home: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [
            OPULON,
            "serve",
            "--port",
            str(port),
            "--ssl-certfile",
            str(cert),
            "--ssl-keyfile",
            str(key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"https://localhost:{port}/healthz", verify=context, timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert b"with TLS" in output


def _wait_healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "did not start"
        time.sleep(0.05)


def test_a_second_serve_on_one_data_dir_refuses_and_the_lock_survives_no_kill(
    tmp_path: Path, isolated_home: Path
) -> None:
    import signal

    first_port = free_port()
    first = subprocess.Popen([OPULON, "serve", "--port", str(first_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_healthy(first_port, first)
        second = subprocess.run([OPULON, "serve", "--port", str(free_port())],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another opulon serve (pid {first.pid})" in lines[0]
        assert str(isolated_home) in lines[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    # kill -9 left no stale lock behind.
    port = free_port()
    again = subprocess.Popen([OPULON, "serve", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_healthy(port, again)
    finally:
        again.terminate()
        again.wait(timeout=30)


def test_serve_says_it_serves_only_once_bound_and_warns_when_nothing_is_set_up(
    isolated_home: Path,
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([OPULON, "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode != 0
    assert "serving on port" not in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert "no provider is configured" in result.stderr
    assert "no key exists yet: create one with opulon keys create" in result.stderr


def test_a_bad_forwarded_allow_ips_entry_is_one_line() -> None:
    assert "--forwarded-allow-ips: invalid address or network 'proxy'" in run_error(
        "serve", "--forwarded-allow-ips", "10.0.0.1,proxy"
    )
