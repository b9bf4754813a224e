"""The gateway application: the ``/v1`` proxy and the Litestar app for everything else.

``/v1/...`` goes straight to :class:`~opulon.gateway.proxy.Proxy` (a raw ASGI app, the hot
path); the pages, ``/healthz`` and the lifespan belong to Litestar.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response, route
from litestar.datastructures import State
from litestar.di import Provide

from opulon import __version__
from opulon.gateway.client_address import parse_trusted
from opulon.gateway.forms import FormGuard
from opulon.gateway.key_status import API_PATH as KEY_STATUS_API_PATH
from opulon.gateway.key_status import FailureThrottle, key_status_router
from opulon.gateway.page_errors import EXCEPTION_HANDLERS
from opulon.gateway.pages import (
    CONSENT_SCRIPT,
    READ,
    STYLESHEET,
    landing,
    privacy,
    provide_providers,
    static_file,
    template_config,
)
from opulon.gateway.proxy import Message, Proxy, Receive, Scope, Send
from opulon.gateway.sign_in import sign_in_router
from opulon.runtime import Runtime
from opulon.settings import GatewaySettings, Settings
from opulon.web.site import StaticFile

log = logging.getLogger("opulon.gateway")
_NO_STORE = {"cache-control": "no-store"}


async def _flush_request_log(proxy: Proxy, interval: float) -> None:
    while proxy.request_log is not None:
        await asyncio.sleep(interval)
        proxy.request_log.flush()


async def _follow_changes(runtime: Runtime, interval: float) -> None:
    """Pick up keys, limits and providers changed by the CLI while the server runs."""
    while True:
        await asyncio.sleep(interval)
        try:
            if await runtime.refresh():
                log.info("configuration reloaded")
        except Exception as exc:
            log.error("reloading the configuration failed: %s", type(exc).__name__)


@route("/healthz", http_method=READ, include_in_schema=False)
async def healthz(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    """Ready (200) or not (503): for a load balancer, which sends traffic elsewhere while
    this node is starting or its database or shared limiter's Redis does not answer."""
    runtime: Runtime | None = request.app.state.get("runtime")
    if runtime is None:
        body = {"status": "starting", "version": __version__}
        return Response(body, status_code=503, headers=_NO_STORE)
    reason = await runtime.ready()
    limits = runtime.limits_kind
    if reason is not None:
        body = {"status": "not ready", "reason": reason, "version": __version__}
        return Response(body, status_code=503, headers=_NO_STORE)
    return Response({"status": "ok", "version": __version__, "limits": limits}, headers=_NO_STORE)


class GatewayApp:
    """The ASGI app that ``opulon serve`` runs."""

    def __init__(self, settings: Settings, gateway: GatewaySettings | None = None) -> None:
        self.settings = settings
        self.gateway = gateway or GatewaySettings()
        self.runtime: Runtime | None = None
        self.proxy: Proxy | None = None
        # The stylesheet's name carries the hash of its bytes, computed here at start-up.
        stylesheet, script = StaticFile.load(STYLESHEET), StaticFile.load(CONSENT_SCRIPT)
        static_files = {stylesheet.name: stylesheet, script.name: script}
        # The look-up and the sign-in share one failure count per client and one form guard.
        trusted = parse_trusted(self.gateway.trusted_proxies)
        throttle, guard = FailureThrottle(), FormGuard(trusted)
        self.litestar = Litestar(
            route_handlers=[
                landing,
                privacy,
                static_file,
                healthz,
                key_status_router(trusted, throttle, guard),
                sign_in_router(trusted, throttle, guard),
            ],
            dependencies={
                "providers": Provide(provide_providers, sync_to_thread=False),
                "static_files": Provide(lambda: static_files, sync_to_thread=False),
            },
            template_config=template_config(stylesheet, script),
            lifespan=[self._lifespan],
            openapi_config=None,
            # Never Litestar's debug pages (LITESTAR_DEBUG would turn them on): a traceback
            # could show what a request carried.
            debug=False,
            exception_handlers=EXCEPTION_HANDLERS,
            # Litestar's default logging config would log at INFO from the root logger; the
            # gateway writes its own lines (no addresses, no content) and nothing else.
            logging_config=None,
            # The lifespan puts the live runtime here; the page handlers are given it from here.
            # The form guard also tells the pages whether the browser came over TLS (for HSTS).
            state=State({"runtime": None, "form_guard": guard}),
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Litestar) -> AsyncIterator[None]:
        runtime = Runtime(self.settings, self.gateway)
        proxy = Proxy(runtime)
        await proxy.start()
        # Everything loaded so far lives as long as the server: keep it out of the collector's
        # full passes, which otherwise stall the event loop for milliseconds.
        gc.freeze()
        gc.set_threshold(5_000, 50, 100)
        # The usage writer thread holds the GIL while it binds rows; hand it back to the
        # event loop sooner than the default 5 ms so it does not show up in latency tails.
        sys.setswitchinterval(0.0005)
        self.runtime, self.proxy = runtime, proxy
        app.state.runtime = runtime
        runtime.start(self.gateway.flush_interval)
        tasks = [
            asyncio.create_task(_follow_changes(runtime, self.gateway.reload_interval)),
            asyncio.create_task(_flush_request_log(proxy, 0.2)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await proxy.close()
            if proxy.request_log is not None:
                proxy.request_log.flush()
            await runtime.close_limiter()
            written = runtime.close()  # writes every row still waiting
            log.info("stopped; %d waiting usage rows written", written)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/v1/")
            and scope["path"] != KEY_STATUS_API_PATH
        ):
            proxy = self.proxy
            if proxy is None:
                await _unavailable(send)
                return
            await proxy(scope, receive, send)
            return
        await self.litestar(scope, receive, send)  # type: ignore[arg-type]


async def _unavailable(send: Send) -> None:
    start: Message = {
        "type": "http.response.start",
        "status": 503,
        "headers": [(b"content-type", b"application/json")],
    }
    await send(start)
    body: dict[str, Any] = {"type": "http.response.body", "body": b'{"error": "starting"}'}
    await send(body)


def create_app(settings: Settings, gateway: GatewaySettings | None = None) -> GatewayApp:
    """The gateway as an ASGI app, for uvicorn or tests."""
    return GatewayApp(settings, gateway)


#: How ``opulon serve --workers N`` hands its gateway settings to the worker processes.
GATEWAY_SETTINGS_ENV = "OPULON_GATEWAY_SETTINGS"


def gateway_settings_text(gateway: GatewaySettings) -> str:
    """``gateway`` as the workers read it back (:func:`app_from_environment`)."""
    return json.dumps(dataclasses.asdict(gateway))


def app_from_environment() -> GatewayApp:
    """The app of one worker of ``opulon serve --workers N``: the settings the serving command
    put in the environment (data dir, database, and :data:`GATEWAY_SETTINGS_ENV`)."""
    configure_logging()
    values = json.loads(os.environ[GATEWAY_SETTINGS_ENV])
    values["trusted_proxies"] = tuple(values.get("trusted_proxies", ()))
    return GatewayApp(Settings.resolve(), GatewaySettings(**values))


def configure_logging(level: int = logging.INFO) -> None:
    """The gateway's own log: one line per request, no addresses, no content."""
    logger = logging.getLogger("opulon")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
