"""The provider probe against ``httpx.MockTransport`` upstreams: what it sends, what it reads."""

from __future__ import annotations

import asyncio

import httpx

from opulon.provider_probe import ANTHROPIC_VERSION, ProbeResult, probe
from opulon.providers import Provider

OPENAI = Provider(1, "oa", "openai", "https://upstream.test/v1", "sk-operator", ())
ANTHROPIC = Provider(2, "an", "anthropic", "https://upstream.test", "sk-ant-operator", ())


def _probe(provider: Provider, handler: httpx.MockTransport, timeout: float = 5.0) -> ProbeResult:
    async def run() -> ProbeResult:
        async with httpx.AsyncClient(transport=handler) as client:
            return await probe(provider, client, timeout=timeout)

    return asyncio.run(run())


def test_an_openai_provider_is_asked_for_its_models_with_its_bearer_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [{"id": "gpt-a"}, {"id": "gpt-b"}, {"id": 3}]})

    result = _probe(OPENAI, httpx.MockTransport(handler))
    assert result.ok and result.status == 200 and result.error is None
    assert result.models == ("gpt-a", "gpt-b")
    assert str(seen[0].url) == "https://upstream.test/v1/models"
    assert seen[0].headers["authorization"] == "Bearer sk-operator"
    assert "anthropic-version" not in seen[0].headers


def test_an_anthropic_provider_gets_its_key_header_and_an_api_version() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [{"id": "claude-x"}]})

    result = _probe(ANTHROPIC, httpx.MockTransport(handler))
    assert result.models == ("claude-x",)
    assert str(seen[0].url) == "https://upstream.test/v1/models"
    assert seen[0].headers["x-api-key"] == "sk-ant-operator"
    assert seen[0].headers["anthropic-version"] == ANTHROPIC_VERSION
    assert "authorization" not in seen[0].headers


def test_a_refusal_is_a_status_without_models() -> None:
    result = _probe(
        OPENAI, httpx.MockTransport(lambda r: httpx.Response(401, json={"data": [{"id": "x"}]}))
    )
    assert result.status == 401 and not result.ok and result.models == () and result.error is None


def test_an_answer_that_is_not_a_listing_lists_nothing() -> None:
    for body in (b"not json", b"[1, 2]", b'{"data": "x"}', b'{"data": [null, "id"]}'):
        result = _probe(
            OPENAI, httpx.MockTransport(lambda r, b=body: httpx.Response(200, content=b))
        )
        assert result.ok and result.models == (), body


def test_no_answer_and_no_connection_are_errors_a_person_can_read() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    late = _probe(OPENAI, httpx.MockTransport(slow), timeout=2)
    assert late.status is None and late.error == "no answer within 2s"
    gone = _probe(OPENAI, httpx.MockTransport(refused))
    assert gone.status is None and gone.error == "cannot connect (ConnectError)"
