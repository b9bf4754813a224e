"""Requests as a new user sends them: small limits that work, costs that can never fit, streams
cut short, and malformed fields, through the real server and SDKs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gateway_helpers import UPSTREAM_KEY, Gateway, cli, start_gateway
from mock_provider import MockConfig

from opulon.usage_extract import estimate_input_tokens

MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "gpt-4o", "messages": MESSAGES}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("requests"), MockConfig(api_key=UPSTREAM_KEY, record=True)
    )
    yield gw
    if gw.process is not None:
        gw.stop()
    gw.mock.stop()


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _sent(gateway: Gateway, mark: int) -> list[dict[str, Any]]:
    time.sleep(0.05)
    return [json.loads(r.body) for r in gateway.mock.received()[mark:]]


# -- limits ----------------------------------------------------------------------------------


def test_a_key_with_a_small_token_limit_can_make_requests(gateway: Gateway) -> None:
    key = gateway.new_key("tokens:1000/1h")
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    mark = len(gateway.mock.received())
    for _ in range(7):
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    oai.responses.create(model="gpt-4o", input="hi")
    sent = _sent(gateway, mark)
    caps = [body.get("max_completion_tokens", body.get("max_output_tokens")) for body in sent]
    assert all(isinstance(cap, int) and 0 < cap < 1000 for cap in caps), caps
    assert caps == sorted(caps, reverse=True)  # each cap is what the window still had room for
    rows = gateway.rows(key, wait_for=8)
    assert [r["status"] for r in rows] == [200] * 8
    assert sum(r["input_tokens"] + r["output_tokens"] for r in rows) <= 1000


def test_a_client_cap_is_kept_and_plenty_of_room_adds_none(gateway: Gateway) -> None:
    key = gateway.new_key("tokens:1M/1h")
    mark = len(gateway.mock.received())
    httpx.post(gateway.url + "/v1/chat/completions", headers=_auth(key), json=CHAT)
    httpx.post(
        gateway.url + "/v1/chat/completions", headers=_auth(key), json={**CHAT, "max_tokens": 7}
    )
    first, second = _sent(gateway, mark)
    assert "max_completion_tokens" not in first and "max_tokens" not in first
    assert second["max_tokens"] == 7 and "max_completion_tokens" not in second


def test_a_request_that_can_never_fit_its_limit_gets_400_which_the_sdks_do_not_retry(
    gateway: Gateway,
) -> None:
    key = gateway.new_key("tokens:100/1h")
    mark = len(gateway.mock.received())
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=3)
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500)
    assert time.monotonic() - started < 2  # no retries with backoff
    message = raised.value.body["message"]  # type: ignore[index]
    assert "exceeds the whole limit tokens:100/1h" in message and "tokens)" in message
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=3)
    with pytest.raises(anthropic.BadRequestError, match="exceeds the whole limit"):
        claude.messages.create(model="claude-x", max_tokens=500, messages=MESSAGES)
    assert gateway.mock.received()[mark:] == []


def test_a_stream_stopped_early_is_charged_its_input(gateway: Gateway) -> None:
    key = gateway.new_key("tokens:2000/10m")
    prompt = " ".join(["word"] * 1200)
    body = {
        "model": "gpt-4o",
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
        "mock": {"chunk-delay-ms": 100},
    }
    content = json.dumps(body).encode()
    reserved_input = estimate_input_tokens(content)
    headers = {**_auth(key), "content-type": "application/json"}
    statuses = []
    for _ in range(5):
        with httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", headers=headers, content=content
        ) as response:
            statuses.append(response.status_code)
            if response.status_code == 200:
                for line in response.iter_lines():
                    if '"content"' in line:
                        break  # leave after the first chunk
        time.sleep(0.3)
    assert statuses.count(200) < 5 and 429 in statuses  # the limit holds
    rows = gateway.rows(key, wait_for=statuses.count(200))
    assert rows and all(r["status"] == 499 for r in rows), rows
    assert all(r["input_tokens"] >= reserved_input for r in rows), (rows, reserved_input)
    assert sum(r["input_tokens"] + r["output_tokens"] for r in rows) <= 2000 + reserved_input


def test_an_anthropic_stream_cut_by_the_upstream_keeps_its_input(gateway: Gateway) -> None:
    key = gateway.new_key()
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    with (
        pytest.raises(anthropic.APIError),
        claude.messages.stream(
            model="claude-x",
            max_tokens=50,
            messages=[{"role": "user", "content": "long " * 400}],
            extra_body={"mock": {"disconnect-after": 2}},
        ) as stream,
    ):
        for _ in stream.text_stream:
            pass
    (row,) = gateway.rows(key, wait_for=1)
    assert row["status"] == 502 and row["input_tokens"] >= 400


# -- fields the gateway reads ---------------------------------------------------------------

MALFORMED = [
    ({"stream_options": "bad", "stream": True}, "'stream_options' must be an object"),
    ({"stream": "yes"}, "'stream' must be true or false"),
    ({"max_tokens": "10"}, "'max_tokens' must be an integer from 1 to 100000000"),
    ({"max_tokens": -1}, "'max_tokens' must be an integer from 1 to 100000000"),
    (
        {"max_completion_tokens": True},
        "'max_completion_tokens' must be an integer from 1 to 100000000",
    ),
    ({"max_output_tokens": 1.5}, "'max_output_tokens' must be an integer from 1 to 100000000"),
    ({"model": 123}, "'model' must be a non-empty string"),
    ({"model": ""}, "'model' must be a non-empty string"),
    ({"model": "g" * 257}, "longer than 256 characters"),
    ({"model": "gpt-4o\n"}, "control characters"),
    ({"model": "gpt\x00"}, "control characters"),
]


@pytest.mark.parametrize(("fields", "message"), MALFORMED)
def test_malformed_fields_the_gateway_reads_get_400_and_store_nothing(
    gateway: Gateway, fields: dict[str, Any], message: str
) -> None:
    key = gateway.new_key()
    mark = len(gateway.mock.received())
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/messages", {
            "model": "claude-x", "max_tokens": 5, "messages": MESSAGES})):  # fmt: skip
        response = httpx.post(gateway.url + path, headers=_auth(key), json={**base, **fields})
        assert response.status_code == 400, response.text
        body = response.json()
        text = body["error"]["message"]
        assert message in text
        if path == "/v1/messages":
            assert body["type"] == "error"
    assert gateway.mock.received()[mark:] == []
    time.sleep(0.1)
    assert gateway.rows(key) == []
    assert b"Traceback" not in gateway.output.read_bytes()


def test_a_model_of_256_characters_is_accepted(gateway: Gateway) -> None:
    key = gateway.new_key()
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=_auth(key),
        json={**CHAT, "model": "gpt-" + "x" * 252},
    )
    assert response.status_code == 200


def test_an_openai_base_url_is_the_api_root_the_operator_gave(gateway: Gateway) -> None:
    cli(gateway.home, "providers", "add", "compat", "--kind", "openai", "--base-url",
        gateway.mock.url + "/v1/openai-compat", "--api-key-env", "UPSTREAM_KEY",
        "--models", "compat-*", env={"UPSTREAM_KEY": UPSTREAM_KEY})  # fmt: skip
    key = gateway.new_key()
    deadline = time.monotonic() + 3
    mark = len(gateway.mock.received())
    while True:
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            headers=_auth(key),
            json={**CHAT, "model": "compat-1"},
        )
        if response.status_code != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200
    paths = [r.raw_path for r in gateway.mock.received()[mark:]]
    assert paths == ["/v1/openai-compat/chat/completions"]


def test_anthropic_routes_carry_anthropics_own_rate_limit_headers(gateway: Gateway) -> None:
    from datetime import UTC, datetime

    key = gateway.new_key(
        "requests:3/1m", "tokens:100k/1h", "input_tokens:50k/1h", "output_tokens:9k/1d"
    )
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    raw = claude.messages.with_raw_response.create(
        model="claude-x", max_tokens=20, messages=MESSAGES
    )
    headers = raw.headers
    assert not any(name.startswith("x-ratelimit") for name in headers)
    assert headers["anthropic-ratelimit-requests-limit"] == "3"
    assert headers["anthropic-ratelimit-requests-remaining"] == "2"
    assert headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "50000"
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "9000"
    reset = datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"])
    assert reset.tzinfo is not None
    assert 50 <= (reset - datetime.now(UTC)).total_seconds() <= 61
    claude.messages.create(model="claude-x", max_tokens=20, messages=MESSAGES)
    claude.messages.create(model="claude-x", max_tokens=20, messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError) as refused:
        claude.messages.create(model="claude-x", max_tokens=20, messages=MESSAGES)
    assert refused.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "retry-after" in refused.value.response.headers
    openai_side = httpx.post(gateway.url + "/v1/chat/completions", headers=_auth(key), json=CHAT)
    assert openai_side.headers["x-ratelimit-limit-requests"] == "3"
    assert "anthropic-ratelimit-requests-limit" not in openai_side.headers


def test_several_answers_reserve_their_cap_each_and_a_foreign_cap_field_counts_for_nothing(
    gateway: Gateway,
) -> None:
    key = gateway.new_key("tokens:2000/1h")
    refused = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=_auth(key),
        json={**CHAT, "max_completion_tokens": 100, "n": 30},
    )
    assert refused.status_code == 400 and "expected cost (30" in refused.text  # 30 x 100 + input
    mark = len(gateway.mock.received())
    answer = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=_auth(key),
        json={**CHAT, "max_output_tokens": 1, "n": 2},  # not a chat completions field
    )
    assert answer.status_code == 200
    (sent,) = _sent(gateway, mark)
    assert 1 < sent["max_completion_tokens"] < 1000  # the gateway's cap, per answer
    bad = httpx.post(gateway.url + "/v1/chat/completions", headers=_auth(key),
                     json={**CHAT, "n": 0})  # fmt: skip
    assert bad.status_code == 400 and "'n' must be an integer from 1 to 128" in bad.text


def test_answers_without_usage_are_charged_their_input(gateway: Gateway) -> None:
    key = gateway.new_key("tokens:100k/1h")
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    oai.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="say " * 500).read()
    oai.images.generate(model="gpt-image-1", prompt="a cat " * 300)
    rows = gateway.rows(key, wait_for=2)
    assert all(r["input_tokens"] >= 300 for r in rows), rows
