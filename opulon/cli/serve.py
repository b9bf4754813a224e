"""``opulon serve``: run the gateway under uvicorn."""

from __future__ import annotations

import logging
import socket
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from opulon.cli.common import settings_of
from opulon.errors import InvalidInput
from opulon.gateway.client_address import parse_trusted
from opulon.limits import parse_amount
from opulon.providers import is_loopback
from opulon.settings import GatewaySettings, Settings

if TYPE_CHECKING:  # the server stack loads only for the commands that serve
    import uvicorn


def configure_logging(level: int = logging.INFO) -> None:
    """The gateway's own log: one line per request, no addresses, no content."""
    logger = logging.getLogger("opulon")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def uvicorn_config(settings: Settings, gateway: GatewaySettings, **extra: object) -> uvicorn.Config:
    """uvicorn's settings: its access log is off, because it prints client addresses."""
    import uvicorn

    from opulon.gateway.app import create_app
    from opulon.gateway.server import GatewayHttpProtocol

    return uvicorn.Config(
        create_app(settings, gateway),
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
        int, typer.Option("--workers", help="Worker processes; only 1 is supported.")
    ] = 1,
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
    if workers != 1:
        raise InvalidInput(
            "--workers must be 1: rolling limits are kept exact in one process's memory, "
            "and several workers would each admit a full quota"
        )
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
    )
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
    lock = hold_data_dir(settings.home)
    log = logging.getLogger("opulon.gateway")
    if no_provider:
        log.warning(
            "no provider is configured: every request will get 404 until you add one "
            "(opulon providers add NAME --kind openai --base-url URL --api-key-env VAR)"
        )
    if no_key:
        log.warning("no key exists yet: create one with opulon keys create --name NAME")
    config = uvicorn_config(settings, gateway, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    try:
        data = str(settings.home)
        if settings.is_postgresql and settings.database_url is not None:
            data += f", store {redact(settings.database_url)}"
        announcing_server(config, " with TLS" if ssl_certfile else "", data).run()
    finally:
        lock.close()


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
