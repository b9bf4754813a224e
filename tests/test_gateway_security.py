"""A key buys inference and nothing more: the gateway as an attacker holding an ordinary key
sees it, against an upstream on loopback that records every request it receives."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gateway_helpers import UPSTREAM_KEY, Gateway, cli, start_gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mock_provider import MockConfig, Received

from opulon.gateway.headers import REQUEST_HEADERS
from opulon.gateway.routes import ROUTES

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
WRONG_KEY = "sk-wrongoperatorkey-0123456789"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("security")
    gw = start_gateway(base, MockConfig(api_key=UPSTREAM_KEY, record=True))
    env = {"WRONG": WRONG_KEY}
    cli(gw.home, "providers", "add", "stale-openai", "--kind", "openai", "--base-url",
        gw.mock.url + "/v1", "--api-key-env", "WRONG", "--models", "stale-*", env=env)  # fmt: skip
    cli(gw.home, "providers", "add", "stale-anthropic", "--kind", "anthropic", "--base-url",
        gw.mock.url, "--api-key-env", "WRONG", "--models", "stale-claude-*", env=env)  # fmt: skip
    gw.create_key("narrow", "--models", "gpt-4o-mini")
    yield gw
    if gw.process is not None:
        gw.stop()
    gw.mock.stop()


@pytest.fixture
def key(gateway: Gateway) -> str:
    return gateway.new_key()


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _received_after(gateway: Gateway, mark: int) -> list[Received]:
    time.sleep(0.05)  # the mock records in its own thread
    return gateway.mock.received()[mark:]


def _mark(gateway: Gateway) -> int:
    return len(gateway.mock.received())


def _raw(gateway: Gateway, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client normalises the path); the status and the body."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _get(path: bytes, key: str, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return (
        method + b" " + path + b" HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n"
        b"authorization: Bearer " + key.encode() + b"\r\n" + extra + b"content-length: 0\r\n\r\n"
    )


def _set_allow(gateway: Gateway, provider: str, families: str) -> str:
    output = cli(gateway.home, "providers", "update", provider, "--allow", families)
    time.sleep(0.6)  # the server picks the change up within a second
    return output


# -- 1. the route table ----------------------------------------------------------------------

STATEFUL = [
    ("GET", "/v1/files"),
    ("DELETE", "/v1/files/file-abc"),
    ("GET", "/v1/files/file-abc/content"),
    ("POST", "/v1/uploads"),
    ("GET", "/v1/batches"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/assistants"),
    ("POST", "/v1/threads"),
    ("GET", "/v1/vector_stores"),
    ("GET", "/v1/conversations/conv_1"),
    ("GET", "/v1/chat/completions"),
    ("GET", "/v1/chat/completions/chatcmpl-1/messages"),
    ("GET", "/v1/responses/resp_1"),
    ("DELETE", "/v1/responses/resp_1"),
    ("GET", "/v1/organization/users"),
    ("GET", "/v1/organizations/me"),
    ("POST", "/v1/realtime/sessions"),
    ("POST", "/v1/messages/batches"),
    ("GET", "/v1/containers/cntr_1/files"),
    ("GET", "/v1/evals"),
    ("GET", "/v1/dashboard/billing"),
]


@pytest.mark.parametrize(("method", "path"), STATEFUL)
def test_stateful_and_unknown_paths_get_404_and_never_reach_the_upstream(
    gateway: Gateway, key: str, method: str, path: str
) -> None:
    mark = _mark(gateway)
    response = httpx.request(method, gateway.url + path, headers=_auth(key), timeout=10)
    assert response.status_code == 404
    if path.startswith("/v1/messages"):  # the Anthropic API's own path
        assert response.json()["error"]["type"] == "not_found_error"
    else:
        error = response.json()["error"]
        assert error["message"] == f"{path} is not offered by this gateway"
        assert error["code"] == "unknown_url"
    anthropic_shape = httpx.request(
        method, gateway.url + path, headers={**_auth(key), "anthropic-version": "2023-06-01"}
    ).json()
    assert anthropic_shape["type"] == "error"
    assert anthropic_shape["error"]["type"] == "not_found_error"
    assert _received_after(gateway, mark) == []
    assert gateway.rows(key) == []  # refused before forwarding: no usage row


def test_the_sdks_stateful_calls_are_refused(gateway: Gateway, key: str) -> None:
    mark = _mark(gateway)
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not offered"):
        oai.files.list()
    with pytest.raises(openai.NotFoundError, match="not offered"):
        oai.files.delete("file-abc")
    with pytest.raises(openai.NotFoundError, match="not offered"):
        oai.responses.retrieve("resp_123")
    with pytest.raises(openai.NotFoundError, match="not offered"):
        oai.chat.completions.list()
    with pytest.raises(openai.NotFoundError, match="not offered"):
        oai.batches.list()
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.NotFoundError, match="not offered"):
        claude.messages.batches.list()
    assert _received_after(gateway, mark) == []


def test_a_family_turned_on_reaches_the_upstream_at_its_canonical_path_with_a_warning(
    gateway: Gateway, key: str
) -> None:
    output = _set_allow(gateway, "mock-openai", "files")
    assert "Warning" in output and "every key routed to mock-openai" in output
    try:
        mark = _mark(gateway)
        response = httpx.get(
            gateway.url + "/v1/files/file-abc/content?limit=2&after=a%20b", headers=_auth(key)
        )
        assert response.status_code == 200
        (received,) = _received_after(gateway, mark)
        assert (received.method, received.raw_path) == (
            "GET",
            "/v1/files/file-abc/content?limit=2&after=a%20b",
        )
        # Still only that family; still no traversal inside it.
        status, _ = _raw(gateway, _get(b"/v1/files/file-a%2F..%2F..%2Fadmin", key))
        assert status == 400
        assert httpx.get(gateway.url + "/v1/batches", headers=_auth(key)).status_code == 404
        assert _received_after(gateway, mark + 1) == []
    finally:
        _set_allow(gateway, "mock-openai", "none")
    assert httpx.get(gateway.url + "/v1/files", headers=_auth(key)).status_code == 404


def test_an_unknown_family_name_is_a_one_line_error(gateway: Gateway) -> None:
    import subprocess

    from gateway_helpers import OPULON

    result = subprocess.run(
        [OPULON, "--home", str(gateway.home), "providers", "update", "mock-openai",
         "--allow", "files,everything"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unknown API family 'everything'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


# -- 3. paths normalised or refused ----------------------------------------------------------

BAD_PATHS = [
    b"/v1/../../admin",
    b"/v1/./chat/completions",
    b"/v1/chat/completions/..",
    b"/v1/chat/../chat/completions",
    b"/v1/%2e%2e/admin",
    b"/v1/%2E%2e/%2e%2E/admin",
    b"/v1/chat%2fcompletions",
    b"/v1/chat%2Fcompletions",
    b"/v1/chat%5ccompletions",
    b"/v1/chat\\completions",
    b"/v1//chat/completions",
    b"/v1/chat/completions/",
    b"/v1/chat/completions%00",
    b"/v1/models/%2e%2e",
    b"/v1/models/..%2f..%2fadmin",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_traversals_and_encoded_separators_get_400_before_anything_is_forwarded(
    gateway: Gateway, key: str, path: bytes
) -> None:
    mark = _mark(gateway)
    body = json.dumps(CHAT).encode()
    status, answer = _raw(
        gateway,
        b"POST " + path + b" HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n"
        b"authorization: Bearer " + key.encode() + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    assert status in (400, 404), answer  # uvicorn itself refuses some with 400 or 404
    assert _received_after(gateway, mark) == []
    status, answer = _raw(gateway, _get(path, key))
    assert status == 400, answer
    assert b"invalid request path" in answer
    assert _received_after(gateway, mark) == []


# -- 2. the model of every route, multipart included ------------------------------------------


def _audio(model: str | None, *, twice: bool = False) -> dict[str, Any]:
    fields: list[tuple[str, Any]] = [("file", ("a.wav", b"RIFF" + b"\0" * 4000, "audio/wav"))]
    if model is not None:
        fields.insert(0, ("model", (None, model)))
        if twice:
            fields.append(("model", (None, "gpt-4o-mini")))
    return {"files": fields}


def test_a_multipart_model_the_key_may_not_use_is_refused_with_403(gateway: Gateway) -> None:
    narrow = gateway.keys["narrow"]
    mark = _mark(gateway)
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=narrow, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'gpt-4o-x'"):
        oai.audio.transcriptions.create(model="gpt-4o-x", file=("a.wav", b"RIFF0000", "audio/wav"))
    for path in ("/v1/audio/translations", "/v1/images/edits", "/v1/images/variations"):
        response = httpx.post(gateway.url + path, headers=_auth(narrow), **_audio("gpt-image-1"))
        assert response.status_code == 403, response.text
    assert _received_after(gateway, mark) == []


def test_a_multipart_model_is_routed_recorded_and_counted_like_any_other(
    gateway: Gateway,
) -> None:
    key = gateway.new_key("requests:2/1m")
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    mark = _mark(gateway)
    oai.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("a.wav", b"RIFF" + b"\0" * 5000, "audio/wav")
    )
    (received,) = _received_after(gateway, mark)
    assert received.raw_path == "/v1/audio/transcriptions"
    assert b'name="model"' in received.body and len(received.body) > 5000
    response = httpx.post(
        gateway.url + "/v1/audio/transcriptions", headers=_auth(key), **_audio("whisper-9")
    )
    assert response.status_code == 404 and "not served" in response.text
    response = httpx.post(
        gateway.url + "/v1/audio/translations", headers=_auth(key), **_audio("gpt-4o-transcribe")
    )
    assert response.status_code == 200
    response = httpx.post(
        gateway.url + "/v1/audio/translations", headers=_auth(key), **_audio("gpt-4o-transcribe")
    )
    assert response.status_code == 429  # two requests a minute: multipart ones count too
    rows = gateway.rows(key, wait_for=2)
    assert [(r["model"], r["status"]) for r in rows] == [("gpt-4o-transcribe", 200)] * 2


@pytest.mark.parametrize(
    ("form", "message"),
    [
        (_audio(None), "names no 'model'"),
        (_audio("gpt-4o-transcribe", twice=True), "more than once"),
        (_audio("gpt\x01x"), "control characters"),
    ],
)
def test_a_multipart_body_without_one_clear_model_gets_400(
    gateway: Gateway, key: str, form: dict[str, Any], message: str
) -> None:
    mark = _mark(gateway)
    response = httpx.post(gateway.url + "/v1/audio/transcriptions", headers=_auth(key), **form)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    response = httpx.post(
        gateway.url + "/v1/audio/transcriptions",
        headers={**_auth(key), "content-type": "multipart/form-data; boundary=xyz"},
        content=b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o',
    )
    assert response.status_code == 400 and "malformed" in response.text
    assert _received_after(gateway, mark) == []


def test_json_routes_without_a_model_get_400(gateway: Gateway, key: str) -> None:
    mark = _mark(gateway)
    for path in ("/v1/moderations", "/v1/images/generations", "/v1/audio/speech"):
        response = httpx.post(gateway.url + path, headers=_auth(key), json={"input": "x"})
        assert response.status_code == 400 and "names no 'model'" in response.text
    assert _received_after(gateway, mark) == []


def test_every_stateless_route_reaches_the_upstream_at_its_own_path(
    gateway: Gateway, key: str
) -> None:
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    mark = _mark(gateway)
    oai.moderations.create(model="gpt-moderation", input="hi")
    oai.images.generate(model="gpt-image-1", prompt="a cat")
    speech = oai.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hi")
    assert speech.read()
    paths = [r.raw_path for r in _received_after(gateway, mark)]
    assert paths == ["/v1/moderations", "/v1/images/generations", "/v1/audio/speech"]


# -- 4. headers by allow-list ----------------------------------------------------------------

# What aiohttp adds to every request it sends, and what the gateway adds itself.
_HOP_HEADERS = {"host", "content-length", "accept-encoding", "user-agent", "authorization",
                "x-api-key"}  # fmt: skip


def test_only_allow_listed_request_headers_reach_the_upstream(gateway: Gateway, key: str) -> None:
    sent = {
        "OpenAI-Organization": "org-attacker",
        "OpenAI-Project": "proj_attacker",
        "x-forwarded-for": "203.0.113.9",
        "cookie": "session=attacker",
        "x-stainless-os": "Linux",
        "user-agent": "attacker-agent/1.0",
        "x-custom-secret": "s3cret",
        "anthropic-beta": "tools-2024-04-04",
        "openai-beta": "assistants=v2",
        "idempotency-key": "idem-1",
        "accept": "application/json",
    }
    mark = _mark(gateway)
    response = httpx.post(
        gateway.url + "/v1/chat/completions", headers={**_auth(key), **sent}, json=CHAT
    )
    assert response.status_code == 200
    (received,) = _received_after(gateway, mark)
    names = {name for name, _ in received.headers}
    assert names - _HOP_HEADERS <= {n.decode() for n in REQUEST_HEADERS}
    headers = dict(received.headers)
    assert headers["openai-beta"] == "assistants=v2" and headers["idempotency-key"] == "idem-1"
    assert headers["anthropic-beta"] == "tools-2024-04-04"
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert headers.get("user-agent") != "attacker-agent/1.0"
    flat = repr(received.headers)
    for needle in ("org-attacker", "proj_attacker", "203.0.113.9", "attacker", "s3cret", key):
        assert needle not in flat


def test_the_providers_account_headers_never_reach_the_key_holder(
    gateway: Gateway, key: str
) -> None:
    oai_response = httpx.post(gateway.url + "/v1/chat/completions", headers=_auth(key), json=CHAT)
    claude_response = httpx.post(
        gateway.url + "/v1/messages",
        headers={**_auth(key), "anthropic-version": "2023-06-01"},
        json={"model": "claude-x", "max_tokens": 5, "messages": MESSAGES},
    )
    streamed = httpx.post(
        gateway.url + "/v1/chat/completions", headers=_auth(key), json={**CHAT, "stream": True}
    )
    failed = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=_auth(key),
        json={**CHAT, "mock": {"status": 429}},
    )
    for response in (oai_response, claude_response, streamed, failed):
        names = set(response.headers)
        assert not names & {"openai-organization", "openai-project", "anthropic-organization-id",
                            "set-cookie", "cf-ray", "openai-processing-ms", "openai-version",
                            "anthropic-ratelimit-requests-limit"}, names  # fmt: skip
        assert "mockoperator" not in repr(response.headers.raw)
        assert response.headers.get("x-ratelimit-limit-requests") != "10000"
    assert oai_response.headers["x-request-id"].startswith("req_")
    assert claude_response.headers["request-id"].startswith("req_")
    assert failed.status_code == 429 and failed.headers["retry-after"] == "1"


# -- 5. the operator's credentials refused ---------------------------------------------------


def test_a_refused_provider_key_is_the_gateways_502_and_leaks_nothing(
    gateway: Gateway, key: str
) -> None:
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        oai.chat.completions.create(model="stale-model", messages=MESSAGES)
    assert raised.value.status_code == 502
    assert "the gateway's credentials for this provider were refused" in str(raised.value)
    assert WRONG_KEY[:8] not in raised.value.response.text
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as denied:
        claude.messages.create(model="stale-claude-1", max_tokens=5, messages=MESSAGES)
    assert denied.value.status_code == 502
    assert denied.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    forbidden = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=_auth(key),
        json={**CHAT, "mock": {"status": 403}},
    )
    assert forbidden.status_code == 502 and "credentials" in forbidden.text
    rows = gateway.rows(key, wait_for=3)
    assert [r["status"] for r in rows] == [502, 502, 502]
    deadline = time.monotonic() + 3
    while b"provider stale-openai refused" not in gateway.output.read_bytes():
        assert time.monotonic() < deadline, "the server log names the provider"
        time.sleep(0.1)
    assert WRONG_KEY.encode() not in gateway.output.read_bytes()


# -- 6. no conversation records at the provider ----------------------------------------------


def test_the_responses_api_is_sent_store_false(gateway: Gateway, key: str) -> None:
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    mark = _mark(gateway)
    oai.responses.create(model="gpt-4o", input="hi")
    oai.responses.create(model="gpt-4o", input="hi", store=False)
    sent = [json.loads(r.body) for r in _received_after(gateway, mark)]
    assert [body["store"] for body in sent] == [False, False]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/responses", {"model": "gpt-4o", "input": "x", "store": True}, "'store': true"),
        ("/v1/chat/completions", {**CHAT, "store": True}, "'store': true"),
        ("/v1/chat/completions", {**CHAT, "store": "yes"}, "must be true or false"),
        ("/v1/responses", {"model": "gpt-4o", "input": "x", "previous_response_id": "resp_1"},
         "'previous_response_id'"),
        ("/v1/responses", {"model": "gpt-4o", "input": "x", "conversation": "conv_1"},
         "'conversation'"),
        ("/v1/responses", {"model": "gpt-4o", "input": [{"type": "item_reference", "id": "m1"}]},
         "'item_reference'"),
        ("/v1/responses", {"model": "gpt-4o", "input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": "file-other"}]}]}, "'file_id'"),
        ("/v1/responses", {"model": "gpt-4o", "input": "x", "tools": [
            {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "'vector_store_ids'"),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-other"}}]}]}, "'file_id'"),
        ("/v1/responses", {"model": "gpt-4o", "input": "x", "tools": [{"type": "code_interpreter",
            "container": {"type": "auto", "file_ids": ["file-1"]}}]}, "'file_ids'"),
        ("/v1/responses", {"model": "gpt-4o", "input": "x", "tools": [{"type": "code_interpreter",
            "container": "cntr_other"}]}, "'container' id"),
        ("/v1/messages", {"model": "claude-x", "max_tokens": 5, "container": "container_other",
            "messages": MESSAGES}, "'container' id"),
        ("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user",
            "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}]}]},
         "'file_id'"),
    ],
)  # fmt: skip
def test_requests_that_store_or_read_objects_at_the_provider_get_400(
    gateway: Gateway, key: str, path: str, body: dict[str, Any], message: str
) -> None:
    mark = _mark(gateway)
    response = httpx.post(gateway.url + path, headers=_auth(key), json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    if path == "/v1/messages":
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert _received_after(gateway, mark) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"file",'
         b'"file":{"file\\u005fid":"file-OTHER"}}]}]}', "'file_id'"),
        (b'{"model":"gpt-4o","input":[{"type":"item\\u005freference","id":"m"}]}',
         "'item_reference'"),
        (b'{"model":"gpt-4o","input":"x","prompt":{"id":"pmpt_operator"}}', "'prompt' id"),
        (b'{"model":"gpt-4o","messages":[{"role":"assistant","audio":{"id":"audio_1"}}]}',
         "'audio' id"),
        (b'{"model":"claude-x","max_tokens":5,"messages":[],"container":{"id":"c_1"}}',
         "'container' id"),
    ],
)  # fmt: skip
def test_references_hidden_behind_escapes_or_objects_are_found(
    gateway: Gateway, key: str, raw: bytes, message: str
) -> None:
    path = "/v1/messages" if b"claude" in raw else (
        "/v1/responses" if b'"input"' in raw else "/v1/chat/completions")  # fmt: skip
    mark = _mark(gateway)
    response = httpx.post(gateway.url + path, headers={**_auth(key),
                          "content-type": "application/json"}, content=raw)  # fmt: skip
    assert response.status_code == 400 and message in response.text
    assert _received_after(gateway, mark) == []


def test_the_upstream_gets_the_gateways_own_encoding_of_what_it_checked(
    gateway: Gateway, key: str
) -> None:
    # Duplicate keys: the gateway reads the last, and so does whatever reads its re-encoding.
    raw = b'{"model":"gpt-4o-mini","model":"gpt-4o","store":true,"store":false,"messages":[]}'
    mark = _mark(gateway)
    response = httpx.post(
        gateway.url + "/v1/chat/completions?foo=bar&beta=true&api-version=x",
        headers={**_auth(gateway.keys["narrow"]), "content-type": "Text/Plain"},
        content=raw,
    )
    assert response.status_code == 403  # the model the gateway checked is the one sent
    response = httpx.post(
        gateway.url + "/v1/chat/completions?foo=bar&beta=true",
        headers={**_auth(key), "content-type": "text/plain"},
        content=raw,
    )
    assert response.status_code == 200
    (received,) = _received_after(gateway, mark)
    assert received.body.count(b'"model"') == 1 and received.body.count(b'"store"') == 1
    assert json.loads(received.body)["model"] == "gpt-4o"
    assert dict(received.headers)["content-type"] == "application/json"
    assert received.raw_path == "/v1/chat/completions?beta=true"  # other parameters dropped


def test_a_json_body_on_a_family_route_is_read_whatever_the_case_of_its_type(
    gateway: Gateway,
) -> None:
    _set_allow(gateway, "mock-openai", "assistants")
    try:
        narrow = gateway.keys["narrow"]
        mark = _mark(gateway)
        response = httpx.post(
            gateway.url + "/v1/assistants",
            headers={**_auth(narrow), "content-type": "Application/JSON; charset=UTF-8"},
            content=b'{"model":"gpt-4o"}',
        )
        assert response.status_code == 403
        assert _received_after(gateway, mark) == []
    finally:
        _set_allow(gateway, "mock-openai", "none")


def test_multipart_bodies_that_two_parsers_could_read_differently_get_400(
    gateway: Gateway, key: str
) -> None:
    request = httpx.Request(
        "POST", "http://x/", files=[("model", (None, "gpt-4o-transcribe")),
                                    ("file", ("a.wav", b"RIFF0000", "audio/wav"))]
    )  # fmt: skip
    content_type, body = request.headers["content-type"], request.read()
    cases = [
        [("content-type", content_type), ("content-type", "multipart/form-data; boundary=zz")],
        [("content-type", content_type + "; boundary=zz")],
    ]
    mark = _mark(gateway)
    for headers in cases:
        status, answer = _raw(
            gateway,
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: g\r\nconnection: close\r\n"
            b"authorization: Bearer " + key.encode() + b"\r\n"
            + b"".join(f"{n}: {v}\r\n".encode() for n, v in headers)
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
        )  # fmt: skip
        assert status == 400, answer
    twice = body.replace(b'name="model"', b'name="model"; name="prompt"', 1)
    response = httpx.post(gateway.url + "/v1/audio/transcriptions",
                          headers={**_auth(key), "content-type": content_type}, content=twice)  # fmt: skip
    assert response.status_code == 400 and "ambiguous" in response.text
    assert _received_after(gateway, mark) == []


def test_the_providers_429_and_5xx_words_never_reach_the_key_holder(
    gateway: Gateway, key: str
) -> None:
    for status in (429, 500, 529):
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            headers=_auth(key),
            json={**CHAT, "mock": {"status": status}},
        )
        assert response.status_code == status
        text = response.text
        assert "Mock" not in text and "mock-openai" in text  # the gateway's own words


def test_a_prompt_that_mentions_file_id_is_not_a_reference(gateway: Gateway, key: str) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": 'what is "file_id": 3?'}]}
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=_auth(key), json=body)
    assert response.status_code == 200


def test_stored_conversations_when_the_operator_allows_them(gateway: Gateway, key: str) -> None:
    output = _set_allow(gateway, "mock-openai", "stored")
    assert "stored chat completions and responses" in " ".join(output.split())
    page = " ".join(httpx.get(gateway.url + "/privacy").text.split())
    assert "the operator of this gateway has turned on stored chat completions" in page
    try:
        oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        mark = _mark(gateway)
        oai.responses.create(model="gpt-4o", input="hi")
        oai.responses.create(model="gpt-4o", input="hi", store=True)
        sent = [json.loads(r.body) for r in _received_after(gateway, mark)]
        assert ["store" in sent[0], sent[1]["store"]] == [False, True]
        response = httpx.get(gateway.url + "/v1/responses/resp_1", headers=_auth(key))
        assert response.status_code == 200
    finally:
        _set_allow(gateway, "mock-openai", "none")


# -- 7. a key created while the server runs ---------------------------------------------------


def test_a_key_created_while_the_server_runs_works_at_once(gateway: Gateway) -> None:
    for attempt in range(5):
        created = json.loads(
            cli(gateway.home, "keys", "create", "--name", f"fresh{attempt}", "--json")
        )
        response = httpx.post(
            gateway.url + "/v1/chat/completions", headers=_auth(created["key"]), json=CHAT
        )
        assert response.status_code == 200, response.text


def test_a_flood_of_unknown_keys_is_refused_without_a_lookup_each(gateway: Gateway) -> None:
    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            import asyncio

            bad = [f"op-ul-{i:010d}" + "x" * 40 for i in range(200)]
            answers = await asyncio.gather(
                *(client.get(gateway.url + "/v1/models", headers=_auth(k)) for k in bad)
            )
            return [a.status_code for a in answers]

    import asyncio

    started = time.monotonic()
    assert set(asyncio.run(flood())) == {401}
    assert time.monotonic() - started < 10


# -- the property: only routes from the table reach the upstream ------------------------------

_SEGMENTS = st.sampled_from(
    ["v1", "chat", "completions", "files", "models", "responses", "messages", "batches",
     "organization", "..", ".", "", "%2e%2e", "%2f", "%5c", "%2E", "%00", "a%2fb", "\\",
     "admin", "audio", "transcriptions", "count_tokens", "x"]
)  # fmt: skip
_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
_HEADER_SETS = st.lists(
    st.sampled_from(
        [b"anthropic-version: 2023-06-01\r\n", b"content-type: application/json\r\n",
         b"content-type: multipart/form-data; boundary=b\r\n", b"openai-organization: x\r\n",
         b"x-forwarded-for: 10.0.0.1\r\n", b"openai-beta: assistants=v2\r\n"]
    ),
    max_size=4,
    unique=True,
)  # fmt: skip
_ALLOWED = {(method, path) for method, path in ROUTES} | {("GET", "/v1/models")}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    segments=st.lists(_SEGMENTS, min_size=1, max_size=5),
    method=_METHODS,
    headers=_HEADER_SETS,
)
def test_random_requests_reach_the_upstream_only_on_routes_from_the_table(
    gateway: Gateway, segments: list[str], method: str, headers: list[bytes]
) -> None:
    key = gateway.keys.get("prop") or gateway.create_key("prop")
    path = ("/v1/" + "/".join(segments)).encode()
    body = json.dumps(CHAT).encode()
    mark = _mark(gateway)
    request = (
        method.encode() + b" " + path + b" HTTP/1.1\r\nhost: g\r\nconnection: close\r\n"
        b"authorization: Bearer " + key.encode() + b"\r\n" + b"".join(headers)
        + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    status, _ = _raw(gateway, request)
    assert status != 500
    for received in _received_after(gateway, mark):
        assert (received.method, received.raw_path.split("?")[0]) in _ALLOWED
        assert "openai-organization" not in dict(received.headers)


def test_the_operators_key_is_in_nothing_a_key_holder_gets(gateway: Gateway, key: str) -> None:
    answers = [
        httpx.post(gateway.url + "/v1/chat/completions", headers=_auth(key), json=CHAT),
        httpx.post(
            gateway.url + "/v1/chat/completions",
            headers=_auth(key),
            json={"model": "stale-model", "messages": MESSAGES},
        ),
        httpx.get(gateway.url + "/v1/models", headers=_auth(key)),
        httpx.get(gateway.url + "/v1/files", headers=_auth(key)),
    ]
    for answer in answers:
        everything = repr(answer.headers.raw).encode() + answer.content
        for secret in (UPSTREAM_KEY, WRONG_KEY, UPSTREAM_KEY[:12], WRONG_KEY[:8]):
            assert secret.encode() not in everything


def test_the_privacy_page_says_no_conversation_is_stored_at_the_provider(
    gateway: Gateway,
) -> None:
    page = " ".join(httpx.get(gateway.url + "/privacy").text.split())
    assert "the gateway asks it not to store them (store: false)" in page
    assert "has turned on" not in page
