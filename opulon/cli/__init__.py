"""The ``opulon`` command: a thin Typer layer over the core modules."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from opulon import __version__
from opulon.cli.console import error_line
from opulon.errors import OpulonError
from opulon.settings import HOME_ENV, Settings

# Typer may vendor its own copy of click; find its exception classes through its public ones.
_ClickException: type[Exception] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"
)


class _OneLineErrors(TyperGroup):
    """Turns every expected error, from option parsing to the core, into one line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except OpulonError as exc:
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except sqlite3.Error as exc:
            error_line(f"database error: {exc}")
            raise typer.Exit(1) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as exc:
            message = exc.format_message().replace("\n", " ")  # type: ignore[attr-defined]
            context = getattr(exc, "ctx", None)
            if context is not None:
                message += f" (see: {context.command_path} --help)"
            error_line(message)
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="opulon",
    help="Opulon: a privacy-first AI API gateway.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"opulon {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[
        str | None,
        typer.Option(
            "--home",
            envvar=HOME_ENV,
            help="Data directory (database, master key). Default: the user data dir.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Opulon: a privacy-first AI API gateway.

    Example: opulon keys create --name alice --limit requests:60/1m
    """
    ctx.obj = Settings.resolve(home)


def _register() -> None:
    from opulon.cli import demo, doctor, keys, providers, serve, usage

    app.add_typer(keys.app, name="keys")
    app.add_typer(providers.app, name="providers")
    app.command(name="serve")(serve.serve)
    app.command(name="doctor")(doctor.doctor)
    app.command(name="demo")(demo.demo)
    app.command(name="usage")(usage.usage)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
