"""``opulon serve``: run the gateway under uvicorn."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Annotated, Any

import typer

from opulon.cli.common import settings_of
from opulon.errors import InvalidInput
from opulon.gateway.client_address import parse_trusted
from opulon.limits import parse_amount
from opulon.providers import is_loopback
from opulon.service_checks import ServiceUnreachable, check_redis, check_redis_url
from opulon.settings import GatewaySettings, Settings

if TYPE_CHECKING:  # the server stack loads only for the commands that serve
    import uvicorn


def uvicorn_config(
    settings: Settings, gateway: GatewaySettings, workers: int = 1, **extra: object
) -> uvicorn.Config:
    """uvicorn's settings: its access log is off, because it prints client addresses. Several
    ``workers`` each build the app from the environment (see ``app_from_environment``)."""
    import uvicorn

    from opulon.gateway.app import create_app
    from opulon.gateway.server import GatewayHttpProtocol

    app: Any = "opulon.gateway.app:app_from_environment"
    if workers > 1:
        extra = {**extra, "factory": True}
    else:
        app = create_app(settings, gateway)
    return uvicorn.Config(
        app,
        workers=workers,
        host=gateway.host,
        port=gateway.port,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
        loop="uvloop",
        http=GatewayHttpProtocol,
        log_level="warning",
        timeout_graceful_shutdown=30,
        **extra,  # type: ignore[arg-type]
    )


def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", envvar="OPULON_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", envvar="OPULON_PORT", min=1, max=65535, help="Port.")
    ] = 8000,
    ssl_certfile: Annotated[
        str | None, typer.Option("--ssl-certfile", help="TLS certificate (PEM).")
    ] = None,
    ssl_keyfile: Annotated[
        str | None, typer.Option("--ssl-keyfile", help="TLS private key (PEM).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="Worker processes; more than 1 only with --redis (the limits they share).",
        ),
    ] = 1,
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis",
            envvar="OPULON_REDIS_URL",
            metavar="URL",
            help="Share every key's limits with the other nodes through this Redis, e.g. "
            "redis://127.0.0.1:6379/0.",
        ),
    ] = None,
    on_redis_failure: Annotated[
        str,
        typer.Option(
            "--on-redis-failure",
            metavar="refuse|local",
            help="While Redis cannot be reached: refuse requests with 503 (exact), or admit "
            "with this node's own counts (inexact across nodes, and logged so).",
        ),
    ] = "refuse",
    redis_lease: Annotated[
        float,
        typer.Option(
            "--redis-lease",
            min=3.0,
            max=3600.0,
            metavar="SECONDS",
            help="How long a request's reservation holds in Redis unrenewed: the requests "
            "of a node that dies free their limits and slots within it.",
        ),
    ] = 60.0,
    connect_timeout: Annotated[
        float, typer.Option("--connect-timeout", min=0.1, help="Seconds to connect upstream.")
    ] = 10.0,
    read_timeout: Annotated[
        float,
        typer.Option("--read-timeout", min=0.1, help="Seconds for a whole non-streaming answer."),
    ] = 600.0,
    stream_idle_timeout: Annotated[
        float,
        typer.Option(
            "--stream-idle-timeout", min=0.1, help="Longest silence within a stream, in seconds."
        ),
    ] = 120.0,
    max_body: Annotated[
        str, typer.Option("--max-body", help="Largest request body, e.g. 32M.")
    ] = "32M",
    default_output_tokens: Annotated[
        int,
        typer.Option(
            "--default-output-tokens",
            min=1,
            help="Tokens reserved when a request names no max_tokens.",
        ),
    ] = 1024,
    quiet: Annotated[bool, typer.Option("--quiet", help="No log line per request.")] = False,
    behind_tls_proxy: Annotated[
        bool,
        typer.Option(
            "--behind-tls-proxy",
            help="Allow plain HTTP on a non-loopback --host because a TLS-terminating proxy "
            "is in front.",
        ),
    ] = False,
    forwarded_allow_ips: Annotated[
        list[str] | None,
        typer.Option(
            "--forwarded-allow-ips",
            metavar="ADDRESSES",
            envvar="OPULON_FORWARDED_ALLOW_IPS",
            help="Proxies (addresses or networks, comma-separated) whose X-Forwarded-For names "
            "the client, so that /key-status throttles each visitor, not the proxy.",
        ),
    ] = None,
) -> None:
    """Run the gateway.

    Example: opulon serve --port 8000
    """
    if workers != 1 and not redis:
        raise InvalidInput(
            f"--workers {workers} needs --redis URL: without it each worker keeps the limits "
            "in its own memory and would admit a full quota; share them through Redis, e.g. "
            f"--redis redis://127.0.0.1:6379/0 --workers {workers}"
        )
    if on_redis_failure not in ("refuse", "local"):
        raise InvalidInput(f"invalid --on-redis-failure {on_redis_failure!r}: refuse or local")
    if redis:
        redis = check_redis_url(redis)
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise InvalidInput("give both --ssl-certfile and --ssl-keyfile, or neither")
    if not ssl_certfile and not behind_tls_proxy and not is_loopback(host):
        # Keys and prompts must not cross a network in clear text.
        raise InvalidInput(
            f"--host {host} without TLS would take keys and prompts in clear text: give "
            "--ssl-certfile and --ssl-keyfile, or --behind-tls-proxy"
        )
    try:
        trusted = tuple(str(net) for net in parse_trusted(forwarded_allow_ips or []))
    except ValueError as exc:
        raise InvalidInput(f"--forwarded-allow-ips: {exc}") from None
    settings = settings_of(ctx)
    gateway = GatewaySettings(
        host=host,
        port=port,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        stream_idle_timeout=stream_idle_timeout,
        max_body_bytes=parse_amount(max_body, context=f"--max-body {max_body!r}"),
        default_output_tokens=default_output_tokens,
        log_requests=not quiet,
        trusted_proxies=trusted,
        redis_url=redis,
        on_redis_failure=on_redis_failure,
        redis_lease=redis_lease,
    )
    from opulon.gateway.app import configure_logging

    configure_logging()
    # Open (and, on first use, create) the database now, so a setup error is one clear line.
    from opulon.database_url import redact
    from opulon.keys import KeyStore
    from opulon.providers import ProviderStore
    from opulon.serve_lock import hold_data_dir
    from opulon.storage import open_store

    store = open_store(settings)
    try:
        no_provider = not ProviderStore(store).all()
        no_key = not KeyStore(store).all()
    finally:
        store.close()
    # One node per data dir, unless the limits are shared: then any number may serve it
    # (a shared lock), but none beside a node that counts alone.
    lock = hold_data_dir(settings.home, shared=bool(redis))
    log = logging.getLogger("opulon.gateway")
    if no_provider:
        log.warning(
            "no provider is configured: every request will get 404 until you add one "
            "(opulon providers add NAME --kind openai --base-url URL --api-key-env VAR)"
        )
    if no_key:
        log.warning("no key exists yet: create one with opulon keys create --name NAME")
    if redis:
        try:
            found = check_redis(redis)
            log.info("limits shared through %s", found.describe())
        except ServiceUnreachable as exc:
            answer = "with this node's own counts" if on_redis_failure == "local" else "503"
            log.error("%s: requests get %s until it answers", exc, answer)
    config = uvicorn_config(
        settings, gateway, workers, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile
    )
    try:
        data = str(settings.home)
        if settings.is_postgresql and settings.database_url is not None:
            data += f", store {redact(settings.database_url)}"
        tls = " with TLS" if ssl_certfile else ""
        if workers > 1:
            _serve_workers(config, settings, gateway, f"{tls}, {workers} workers", data)
        else:
            announcing_server(config, tls, data).run()
    finally:
        lock.close()


def _serve_workers(
    config: uvicorn.Config, settings: Settings, gateway: GatewaySettings, how: str, data: str
) -> None:
    """Run ``config.workers`` processes on one socket (uvicorn's supervisor, which restarts a
    worker that dies); each builds its app from what this puts in the environment."""
    from uvicorn.supervisors import Multiprocess

    from opulon.gateway.app import GATEWAY_SETTINGS_ENV, gateway_settings_text
    from opulon.settings import DATABASE_ENV, HOME_ENV

    os.environ[HOME_ENV] = str(settings.home)
    if settings.database_url:
        os.environ[DATABASE_ENV] = settings.database_url
    os.environ[GATEWAY_SETTINGS_ENV] = gateway_settings_text(gateway)
    sock = config.bind_socket()
    logging.getLogger("opulon.gateway").info(
        "serving on port %d%s (data in %s)", config.port, how, data
    )
    Multiprocess(config, sockets=[sock]).run()


def announcing_server(config: uvicorn.Config, tls: str, home: str) -> uvicorn.Server:
    """uvicorn's server, saying that it serves only once its socket is bound."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                # The log names no address at all, not even the one it listens on.
                logging.getLogger("opulon.gateway").info(
                    "serving on port %d%s (data in %s)", config.port, tls, home
                )

    return Server(config)
