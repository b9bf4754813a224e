"""The route table, path checks, the multipart model field and the stored-state policy, as units;
and the look for new keys that an unknown key makes."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec
import pytest

from opulon.errors import InvalidInput
from opulon.gateway.multipart_model import MultipartRefusal, form_model
from opulon.gateway.proxy import Proxy
from opulon.gateway.routes import ROUTES, Match, PathRefusal, match
from opulon.gateway.stored_state import check_references, check_stored_state
from opulon.keys import KeyStore
from opulon.providers import Provider, parse_families
from opulon.runtime import Runtime
from opulon.settings import Settings
from opulon.storage import Store


def test_every_table_route_matches_itself_at_its_own_path() -> None:
    for (method, path), route in ROUTES.items():
        found = match(method, path.encode())
        assert isinstance(found, Match) and found.route is route and found.path == path


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", b"/v1/chat/completions", 405),
        ("GET", b"/v1/messages", 405),
        ("POST", b"/v1/models", 405),
        ("DELETE", b"/v1/models/ft:gpt-4o:org:x", 405),
        ("GET", b"/v1/nothing", 404),
        ("PUT", b"/v1/files", 405),
        ("GET", b"/v2/chat/completions", 400),
        ("GET", b"/v1/a/../b", 400),
        ("GET", b"/v1/a/%2E/b", 400),
        ("GET", b"/v1/a%2Fb", 400),
        ("GET", b"/v1/a%5Cb", 400),
        ("GET", b"/v1/a%00b", 400),
        ("GET", b"/v1/a%0ab", 400),
        ("GET", b"/v1/a%ffb", 400),  # not UTF-8
        ("GET", b"/v1/a//b", 400),
    ],
)
def test_paths_outside_the_table_are_refused(method: str, path: bytes, status: int) -> None:
    found = match(method, path)
    assert isinstance(found, PathRefusal) and found.status == status


def test_a_family_path_is_canonical_and_names_its_family() -> None:
    found = match("GET", b"/v1/files/file%2Dabc/content")
    assert isinstance(found, Match)
    assert (found.path, found.route.family) == ("/v1/files/file-abc/content", "files")
    found = match("GET", b"/v1/chat/completions")  # listing stored completions
    assert isinstance(found, Match) and found.route.family == "stored"
    found = match("POST", b"/v1/messages/batches", "json")
    assert isinstance(found, Match) and found.route.family == "batches"
    assert found.route.body == "json"
    found = match("GET", b"/v1/models/claude%20x")
    assert isinstance(found, Match) and found.path == "/v1/models/claude%20x"


def test_families_are_parsed_and_an_unknown_one_is_named() -> None:
    assert parse_families(["files, batches", "stored"]) == {"files", "batches", "stored"}
    assert parse_families(["none"]) == frozenset()
    with pytest.raises(InvalidInput, match="unknown API family 'everything'"):
        parse_families(["files,everything"])


def _form(fields: list[tuple[str, Any]]) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://x/", files=fields)
    return request.headers["content-type"].encode(), request.read()


def test_the_model_form_field_is_read_whatever_its_position() -> None:
    upload = ("file", ("a.wav", b"x" * 100_000, "audio/wav"))
    assert form_model(*_form([("model", (None, "whisper-1")), upload])) == "whisper-1"
    assert form_model(*_form([upload, ("model", (None, "gpt-4o"))])) == "gpt-4o"
    assert form_model(*_form([upload])) is None


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        (b"application/json", b"{}", "multipart/form-data"),
        (b"multipart/form-data", b"", "boundary"),
        (b"multipart/form-data; boundary=b", b"--b\r\nno headers", "malformed"),
        (b"multipart/form-data; boundary=b", b"garbage", "malformed"),
    ],
)
def test_bodies_that_could_be_read_two_ways_are_refused(
    content_type: bytes, body: bytes, message: str
) -> None:
    with pytest.raises(MultipartRefusal, match=message):
        form_model(content_type, body)


def test_a_second_model_field_or_a_model_file_is_refused() -> None:
    with pytest.raises(MultipartRefusal, match="more than once"):
        form_model(*_form([("model", (None, "a")), ("model", (None, "b"))]))
    with pytest.raises(MultipartRefusal, match="more than once"):
        form_model(*_form([("model", ("m.txt", b"gpt-4o", "text/plain"))]))


def _provider(*allow: str) -> Provider:
    return Provider(1, "p", "openai", "https://x", "k", (), frozenset(allow))


def _check(endpoint: str, payload: dict[str, Any], *allow: str) -> tuple[str | None, bool]:
    provider = _provider(*allow)
    refusal, changed = check_stored_state(endpoint, payload, provider)
    if refusal is None:
        refusal = check_references(msgspec.json.encode(payload), payload, provider)
    return refusal, changed


def test_the_responses_api_gets_store_false_unless_stored_is_allowed() -> None:
    payload: dict[str, Any] = {"model": "m", "input": "x"}
    assert _check("responses", payload) == (None, True) and payload["store"] is False
    payload = {"model": "m", "input": "x", "store": None}
    assert _check("responses", payload) == (None, True) and payload["store"] is False
    payload = {"model": "m", "input": "x"}
    assert _check("responses", payload, "stored") == (None, False) and "store" not in payload
    assert _check("chat", {"model": "m", "messages": []}) == (None, False)


def test_references_to_stored_objects_need_their_family() -> None:
    deep: dict[str, Any] = {"model": "m", "input": [{"content": [{"file_id": "f"}]}]}
    refusal, _ = _check("responses", deep)
    assert refusal is not None and "'file_id'" in refusal and "'files'" in refusal
    assert _check("responses", deep, "files")[0] is None
    nested: dict[str, Any] = {"model": "m", "messages": []}
    cursor = nested
    for _ in range(100):
        cursor["x"] = {"file_id": None}
        cursor = cursor["x"]
    refusal, _ = _check("chat", nested)
    assert refusal is not None and "nested" in refusal


def test_an_unknown_key_looks_for_new_keys_at_most_a_hundred_times_a_second(
    settings: Settings, store: Store
) -> None:
    async def run() -> tuple[int, list[int], int]:
        runtime = Runtime(settings)
        looks = 0
        real = runtime._store.config_generation

        def counting() -> int:
            nonlocal looks
            looks += 1
            return real()

        runtime._store = _Counting(runtime._store, counting)  # type: ignore[assignment]
        proxy = Proxy(runtime)
        await proxy.start()
        try:
            statuses = await asyncio.gather(*(_call(proxy, f"op-ul-{i:010d}" + "x" * 40)
                                              for i in range(300)))  # fmt: skip
            flood_looks = looks
            _, new_key = KeyStore(store).create("new")
            status_new = await _call(proxy, new_key)
        finally:
            await proxy.close()
            runtime.close()
        return flood_looks, [*statuses, status_new], looks

    flood_looks, statuses, _ = asyncio.run(run())
    assert statuses[:300] == [401] * 300
    assert statuses[300] == 200  # a key created a moment ago is known at once
    assert 1 <= flood_looks <= 3


class _Counting:
    def __init__(self, store: Store, counting: Any) -> None:
        self._store = store
        self.config_generation = counting

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def _call(proxy: Proxy, key: str) -> int:
    started: list[int] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            started.append(message["status"])

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "raw_path": b"/v1/models",
             "query_string": b"", "headers": [(b"authorization", f"Bearer {key}".encode())]}  # fmt: skip
    await proxy(scope, receive, send)
    return started[0]
