"""The fixed-answer upstream: request bodies, answers, the nginx configuration, tool setup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

JSON_MODEL = "bench-json"
STREAM_MODEL = "bench-stream"
SLOW_MODEL = "bench-slow"
CHAT_PATH = "/v1/chat/completions"
STREAM_CHUNKS = 20

PROMPT_TOKENS = 57
COMPLETION_TOKENS = 20
_CREATED = 1_700_000_000
_ANSWER = (
    "A privacy-first gateway keeps one key per person, enforces limits in memory and stores "
    "only metadata, so answers stream straight through without being written anywhere."
)
_WORDS = _ANSWER.split(" ")


def _usage() -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def request_body(model: str, *, stream: bool) -> bytes:
    """What the clients send: a short chat request, as an SDK would."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {
                "role": "user",
                "content": "In two sentences: why should an API gateway store no prompts?",
            },
        ],
        "max_tokens": 256,
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
    return _dumps(body).encode()


def completion_body() -> bytes:
    """The fixed non-streaming answer, with a realistic ``usage`` object."""
    text = " ".join(_WORDS[:COMPLETION_TOKENS])
    return _dumps(
        {
            "id": "chatcmpl-bench0000000000000000000001",
            "object": "chat.completion",
            "created": _CREATED,
            "model": JSON_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_bench",
        }
    ).encode()


def stream_body() -> bytes:
    """The fixed SSE answer: 20 content chunks, a usage chunk, then ``[DONE]``."""
    base = {
        "id": "chatcmpl-bench0000000000000000000002",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": STREAM_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
    }
    events: list[str] = []
    for index in range(STREAM_CHUNKS):
        delta: dict[str, Any] = {"content": _WORDS[index % len(_WORDS)] + " "}
        if index == 0:
            delta = {"role": "assistant", **delta, "refusal": None}
        last = index == STREAM_CHUNKS - 1
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": "stop" if last else None,
        }
        events.append(_dumps({**base, "choices": [choice], "usage": None}))
    events.append(_dumps({**base, "choices": [], "usage": _usage()}))
    events.append("[DONE]")
    return "".join(f"data: {event}\n\n" for event in events).encode()


def count_content_events(body: bytes) -> int:
    """How many SSE events of an answer carry text (role, finish and usage chunks do not)."""
    count = 0
    for line in body.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        try:
            choices = json.loads(line[6:]).get("choices") or []
        except ValueError:
            continue
        if choices and (choices[0].get("delta") or {}).get("content"):
            count += 1
    return count


def nginx_config(directory: Path, json_port: int, stream_port: int) -> Path:
    """Write an nginx configuration answering chat completions with fixed bodies.

    The answers are files (an SSE answer is longer than an nginx string may be); nginx's static
    handler refuses a POST with 405, which ``error_page`` turns into the file with status 200.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    answers = directory / "answers"
    answers.mkdir(exist_ok=True)
    answers.chmod(0o755)
    (answers / "completion.json").write_bytes(completion_body())
    (answers / "stream.sse").write_bytes(stream_body())
    for path in answers.iterdir():
        path.chmod(0o644)
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)

    def server(port: int, answer: str, content_type: str) -> str:
        return f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {answers};
        location = {CHAT_PATH} {{
            error_page 405 =200 /{answer};
            return 405;
        }}
        location = /{answer} {{
            internal;
            default_type {content_type};
            add_header Cache-Control no-cache;
        }}
        location / {{
            return 404;
        }}
    }}"""

    config = f"""# generated by bench/run.py
worker_processes 1;
daemon off;
master_process on;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
worker_rlimit_nofile 16384;
events {{
    worker_connections 8192;
}}
http {{
    types {{ }}
    access_log off;
    server_tokens off;
    etag off;
    if_modified_since off;
    max_ranges 0;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    open_file_cache max=16 inactive=1h;
    open_file_cache_valid 1h;
    client_body_buffer_size 64k;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{server(json_port, "completion.json", "application/json")}
{server(stream_port, "stream.sse", "text/event-stream")}
}}
"""
    path = directory / "nginx.conf"
    path.write_text(config)
    return path


def ensure_tool(binary: str, packages: tuple[str, ...], say: Callable[[str], None]) -> str | None:
    """Find ``binary``; when missing and running as root, install it with apt-get."""
    found = _which(binary)
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(
            f"{binary} is missing: install it with `sudo apt-get install -y {packages[0]}` "
            "(Debian/Ubuntu) and run the benchmark again"
        )
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
    for package in packages:
        say(f"installing {package} with apt-get ...")
        # Without package lists (a fresh container), update them once and try again.
        for argv in ([*install, package], ["apt-get", "update", "-q"], [*install, package]):
            try:
                result = subprocess.run(argv, capture_output=True, env=env, timeout=600)
            except subprocess.TimeoutExpired:
                say(f"`{' '.join(argv)}` took more than 10 minutes; giving up")
                return None
            if argv[1] == "install" and result.returncode == 0:
                break
        found = _which(binary)
        if found is not None:
            return found
    say(f"could not install {binary} (tried {', '.join(packages)})")
    return None


def _which(binary: str) -> str | None:
    for candidate in (shutil.which(binary), f"/usr/sbin/{binary}", f"/usr/bin/{binary}"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def tool_version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0].strip() if text else "?"
