"""The privacy promise, tested: no content on disk, no addresses or keys in the server's output."""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from gateway_helpers import Gateway, start_gateway

# IPv4, and IPv6 written with "::" or with five or more groups (so clock times don't match).
IP_ADDRESS = re.compile(
    rb"\b(?:\d{1,3}\.){3}\d{1,3}\b|[0-9a-f]*::[0-9a-f:]*|\b(?:[0-9a-f]{1,4}:){4,7}[0-9a-f]{1,4}\b",
    re.I,
)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path, None, "--read-timeout", "1", "--stream-idle-timeout", "1")
    yield gw
    if gw.process is not None:
        gw.stop()
    gw.mock.stop()


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(path, path.read_bytes()) for path in root.rglob("*") if path.is_file()]


def test_no_trace_of_content_anywhere_after_traffic_with_faults(gateway: Gateway) -> None:
    canary = "CANARY" + secrets.token_hex(12)
    key = gateway.new_key()
    prompt = [{"role": "user", "content": f"my secret is {canary}"}]
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=10)

    # Plain and streamed answers that echo the canary back.
    answer = oai.chat.completions.create(model="gpt-4o", messages=prompt)  # type: ignore[arg-type]
    assert canary in (answer.choices[0].message.content or "")
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(model="gpt-4o", messages=prompt, stream=True)  # type: ignore[arg-type]
        if c.choices
    )
    assert canary in streamed
    oai.chat.completions.create(
        model="gpt-4o",
        messages=prompt,
        extra_body={"mock": {"reply": f"reply {canary}"}},
    )
    oai.responses.create(model="gpt-4o", input=f"again {canary}")
    oai.embeddings.create(model="text-embedding-3-small", input=canary)
    claude.messages.create(model="claude-test-model", max_tokens=50, messages=prompt)  # type: ignore[arg-type]
    with claude.messages.stream(
        model="claude-test-model", max_tokens=50, messages=prompt
    ) as stream:  # type: ignore[arg-type]
        assert canary in "".join(stream.text_stream)
    # A multipart upload, read in memory for its model: the canary in the file and a field.
    uploaded = oai.audio.transcriptions.create(
        model="gpt-4o-transcribe",
        file=("notes.wav", f"audio {canary}\n".encode() * 2000, "audio/wav"),
        prompt=f"a prompt {canary}",
    )
    assert uploaded is not None
    # Refused before forwarding: a stateful path, a model the key may not name, a bad path.
    refused = httpx.post(
        gateway.url + "/v1/files",
        headers={"authorization": f"Bearer {key}"},
        files={"file": ("notes.txt", f"file content {canary}\n" * 2000, "text/plain")},
        data={"purpose": "assistants"},
        timeout=10,
    )
    assert refused.status_code == 404 and canary not in refused.text
    refused = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": f"x{canary}\u0001", "messages": prompt},
        headers={"authorization": f"Bearer {key}"},
    )
    assert refused.status_code == 400 and canary not in refused.text
    for path in (f"/v1/{canary}", f"/v1/files/{canary}", f"/v1/{canary}/%2e%2e/x"):
        assert httpx.get(gateway.url + path, headers={"authorization": f"Bearer {key}"}).is_error
        assert httpx.get(gateway.url + path, headers={"x-api-key": "op-ul-x"}).status_code == 401

    # Errors, timeouts and disconnects, all carrying the canary.
    for switch in ({"status": 500}, {"status": 400}, {"stall-after": 0}):
        with pytest.raises(openai.APIStatusError):
            oai.chat.completions.create(
                model="gpt-4o", messages=prompt, extra_body={"mock": switch}
            )  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError):
        oai.chat.completions.create(model="dead-model", messages=prompt)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError):
        list(oai.chat.completions.create(model="gpt-4o", messages=prompt, stream=True,  # type: ignore[arg-type]
                                         extra_body={"mock": {"disconnect-after": 2}}))  # fmt: skip
    with pytest.raises(openai.APIError):
        list(oai.chat.completions.create(model="gpt-4o", messages=prompt, stream=True,  # type: ignore[arg-type]
                                         extra_body={"mock": {"stall-after": 2}}))  # fmt: skip
    bad = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=f'{{"model": "gpt-4o", "messages": "{canary}'.encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert bad.status_code == 400 and canary not in bad.text
    payload = json.dumps(
        {"model": "gpt-4o", "stream": True, "messages": prompt, "mock": {"chunk-delay-ms": 50}}
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        sock.recv(200)
    statuses = {row["status"] for row in gateway.rows(key, wait_for=16)}
    assert {200, 400, 500, 502, 504, 499} <= statuses

    gateway.stop()
    needles = [canary.encode(), canary.encode("utf-16-le"), key.encode(), key[16:].encode()]
    for root in (gateway.home, gateway.tmp):
        for path, content in _all_bytes(root):
            for needle in needles:
                assert needle not in content, f"{needle!r} found in {path}"
    output = gateway.output.read_bytes()
    assert output, "the server wrote its log"
    assert canary.encode() not in output
    assert key.encode() not in output and key[16:].encode() not in output
    assert key[:16].encode() in output  # the display prefix is what identifies a key
    assert not IP_ADDRESS.search(output), IP_ADDRESS.search(output)


def test_no_code_session_token_or_key_of_a_sign_in_is_kept_anywhere(tmp_path: Path) -> None:
    from sign_in_helpers import create_owned_key, form_token, look_up, start_mail_gateway

    gateway, fake = start_mail_gateway(tmp_path)
    try:
        email = "canary.owner@example.org"
        key = create_owned_key(gateway, email, "requests:10/1m")
        with httpx.Client(base_url=gateway.url, timeout=15, follow_redirects=True) as client:
            policy = " ".join(client.get("/privacy").text.split())
            assert (
                "If you sign in on /key-status with your email address, the sign-in code is "
                "sent to it through Resend, and we keep only keyed hashes of the address"
            ) in policy
            assert "Your request arrives via encrypted HTTPS/TLS" in policy  # the mail's https URL
            assert look_up(client, key).status_code == 200
            csrf_cookie = client.cookies["opulon_csrf"]
            ask = {"email": email, "csrf_token": form_token(client)}
            assert client.post("/key-status/code", data=ask).status_code == 200
            first = fake.code_for(email)
            wrong = f"{(int(first) + 1) % 1_000_000:06d}"
            tries = [{**ask, "code": wrong}, {**ask, "code": first}]
            answers = [client.post("/key-status/sign-in", data=data) for data in tries]
            assert [a.status_code for a in answers] == [401, 200]
            session = answers[1].history[0].cookies["opulon_session"]
            token = form_token(client, "/key-status/account")
            sent = client.post(
                "/key-status/account/send", data={"prefix": key[:16], "csrf_token": token}
            )
            assert sent.status_code == 200 and key in fake.wait_for(email, 2)[1]["text"]
            assert client.post("/key-status/code", data=ask).status_code == 200
            second = fake.code_for(email, 3)  # asked for, never used
            client.post("/key-status/sign-out", data={"csrf_token": token})
    finally:
        gateway.stop()
        gateway.mock.stop()
        fake.stop()
    secrets_ = [key, key[16:], first, second, session, csrf_cookie, token]
    needles = [s.encode() for s in secrets_] + [key.encode("utf-16-le")]
    for root in (gateway.home, gateway.tmp):
        for path, content in _all_bytes(root):
            for needle in needles:
                assert needle not in content, f"{needle!r} found in {path}"
    output = gateway.output.read_bytes()
    assert b"a sign-in code was sent" in output and key[:16].encode() in output
    for needle in (*needles, email.encode(), b"canary.owner"):
        assert needle not in output, needle
    assert not IP_ADDRESS.search(output), IP_ADDRESS.search(output)
