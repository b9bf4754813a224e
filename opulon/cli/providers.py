"""``opulon providers ...``: the upstream APIs requests are forwarded to."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from opulon.cli.common import Yes, confirm, opened_store
from opulon.cli.console import console, escape, print_json
from opulon.errors import InvalidInput, OpulonError
from opulon.providers import FAMILIES, Provider, ProviderStore, parse_families

if TYPE_CHECKING:
    from opulon.provider_probe import ProbeResult

app = typer.Typer(
    rich_markup_mode=None,  # plain help, as gh and sqlite-utils print it: --limit LIMIT
    help="Add, list, test and remove upstream providers.\n\n"
    "Example: opulon providers add openai --kind openai --base-url https://api.openai.com/v1 "
    "--api-key-env OPENAI_API_KEY",
    no_args_is_help=True,
)

Name = Annotated[str, typer.Argument(help="The provider's name, e.g. openai.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Allow = Annotated[
    list[str] | None,
    typer.Option(
        "--allow",
        metavar="FAMILIES",
        help="Stateful API families to forward, comma-separated (off by default; every key "
        f"routed to the provider shares their objects): {', '.join(FAMILIES)}; or none.",
    ),
]


def _warn_shared(provider: Provider) -> None:
    for family in sorted(provider.allow):
        console.print(
            f"[yellow]Warning:[/] every key routed to {escape(provider.name)} now shares its "
            f"{escape(FAMILIES[family])}: one key holder can read, change or delete what "
            "another left there."
        )


@app.command()
def add(
    ctx: typer.Context,
    name: Name,
    kind: Annotated[
        str, typer.Option("--kind", help="openai (any OpenAI-compatible API) or anthropic.")
    ],
    base_url: Annotated[
        str,
        typer.Option(
            "--base-url",
            metavar="URL",
            help="The API root: https://api.openai.com/v1 (or any OpenAI-compatible root, e.g. "
            "Gemini's .../v1beta/openai), https://api.anthropic.com for anthropic.",
        ),
    ],
    api_key_env: Annotated[
        str | None,
        typer.Option("--api-key-env", help="Read the provider's API key from this variable."),
    ] = None,
    api_key_stdin: Annotated[
        bool,
        typer.Option("--api-key-stdin", help="Read the provider's API key from standard input."),
    ] = False,
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--models",
            help="Model globs it serves, comma-separated, e.g. 'gpt-*,o3*'. Default: all.",
        ),
    ] = None,
    allow: Allow = None,
) -> None:
    """Add a provider; its API key is stored encrypted.

    Example: opulon providers add anthropic --kind anthropic --base-url https://api.anthropic.com --api-key-env ANTHROPIC_API_KEY --models 'claude-*'
    """
    if api_key_env and api_key_stdin:
        raise InvalidInput("give either --api-key-env or --api-key-stdin, not both")
    api_key: str | None = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise InvalidInput(f"the variable {api_key_env} is not set or empty")
    elif api_key_stdin:
        api_key = sys.stdin.readline().strip()
        if not api_key:
            raise InvalidInput("no API key on standard input")
    else:
        raise InvalidInput("give the provider's API key with --api-key-env VAR or --api-key-stdin")
    patterns = tuple(part for value in models or [] for part in value.split(","))
    families = parse_families(allow or [])
    with opened_store(ctx) as store:
        provider = ProviderStore(store).add(
            name, kind=kind, base_url=base_url, api_key=api_key, models=patterns, allow=families
        )
    console.print(
        f"Added provider [bold]{provider.name}[/] ({provider.kind}, {escape(provider.base_url)}, "
        f"models {escape(', '.join(provider.models) or '*')})."
    )
    _warn_shared(provider)


@app.command()
def update(ctx: typer.Context, name: Name, allow: Allow = None) -> None:
    """Change which stateful API families a provider serves (the rest stay refused).

    Example: opulon providers update openai --allow files,batches
    """
    if allow is None:
        raise InvalidInput("nothing to change: give --allow FAMILIES (or --allow none)")
    families = parse_families(allow)
    with opened_store(ctx) as store:
        provider = ProviderStore(store).set_allow(name, families)
    shown = ", ".join(sorted(provider.allow)) or "none"
    console.print(f"Provider {escape(provider.name)} now serves stateful families: {shown}.")
    _warn_shared(provider)


@app.command("list")
def list_providers(ctx: typer.Context, json: Json = False) -> None:
    """List providers (never their API keys)."""
    with opened_store(ctx) as store:
        providers = ProviderStore(store).all()
    if json:
        print_json([provider.to_json() for provider in providers])
        return
    if not providers:
        console.print("No providers yet. Add one: opulon providers add NAME --kind openai ...")
        return
    table = Table()
    for column in ("name", "kind", "base url", "models", "stateful APIs"):
        table.add_column(column, overflow="fold")
    for provider in providers:
        table.add_row(
            provider.name,
            provider.kind,
            provider.base_url,
            ", ".join(provider.models) or "*",
            ", ".join(sorted(provider.allow)) or "none",
        )
    console.print(table)


@app.command()
def remove(ctx: typer.Context, name: Name, yes: Yes = False) -> None:
    """Remove a provider; requests for its models then get 404."""
    with opened_store(ctx) as store:
        providers = ProviderStore(store)
        provider = providers.get(name)
        confirm(f"Remove the provider {provider.name} and its stored API key?", yes)
        providers.remove(provider.name)
    console.print(f"Removed provider {provider.name}.")


def check_provider(provider: Provider, *, timeout: float = 15.0) -> ProbeResult:
    """One cheap call (list models); a one-line error when the provider does not answer."""
    from opulon.provider_probe import client, probe  # imported here: few commands need httpx

    async def run() -> ProbeResult:
        async with client() as http:
            return await probe(provider, http, timeout=timeout)

    result = asyncio.run(run())
    if result.error is not None:
        raise OpulonError(f"provider {provider.name}: {result.error}")
    return result


@app.command()
def test(ctx: typer.Context, name: Name, json: Json = False) -> None:
    """Make one cheap call to a provider and print its status and latency."""
    with opened_store(ctx) as store:
        provider = ProviderStore(store).get(name)
    result = check_provider(provider)
    status, latency_ms, ok = result.status, result.latency_ms, result.ok
    if json:
        print_json(
            {"name": provider.name, "status": status, "latency_ms": round(latency_ms, 1), "ok": ok}
        )
    else:
        colour = "green" if ok else "red"
        console.print(f"{provider.name}: [{colour}]HTTP {status}[/] in {latency_ms:.0f} ms")
    if not ok:
        raise typer.Exit(1)
