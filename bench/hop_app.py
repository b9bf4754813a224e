"""A bare proxy hop as a raw ASGI app, for ``bench/hop.py``: no keys, limits or usage rows.

``HOP_CLIENT`` picks the upstream client; ``HOP_UPSTREAM`` is the upstream's base URL. Each
variant reads the request body, forwards it with the same headers and sends the answer back,
so the only difference between them is the client.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import httpx

from opulon.gateway.upstream import UpstreamClient

CLIENT = os.environ.get("HOP_CLIENT", "opulon")
UPSTREAM = os.environ.get("HOP_UPSTREAM", "http://127.0.0.1:8001")
HEADERS = [("content-type", "application/json"), ("authorization", "Bearer sk-hop")]

state: dict[str, Any] = {}


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if CLIENT == "httpx":
                limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
                state["client"] = httpx.AsyncClient(limits=limits, timeout=30)
            elif CLIENT == "aiohttp-session":
                connector = aiohttp.TCPConnector(limit=0)
                state["client"] = aiohttp.ClientSession(connector=connector)
            else:
                client = UpstreamClient(connect_timeout=10)
                await client.start()
                state["client"] = client
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            client = state.pop("client", None)
            if isinstance(client, httpx.AsyncClient):
                await client.aclose()
            elif client is not None:
                await client.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = await _body(receive)
    url = UPSTREAM + scope["path"]
    client = state["client"]
    if isinstance(client, httpx.AsyncClient):
        response = await client.post(url, content=body, headers=HEADERS)
        status, content = response.status_code, response.content
    elif isinstance(client, aiohttp.ClientSession):
        async with client.post(url, data=body, headers=HEADERS) as upstream:
            status, content = upstream.status, await upstream.read()
    else:
        upstream = await client.send(
            "POST", client.url(UPSTREAM + scope["path"], ""), HEADERS, body
        )
        try:
            status, content = upstream.status, await upstream.read()
        finally:
            upstream.release()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
