"""The ``opulon`` command: a thin Typer layer over the core modules."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
import typer.main
from typer.core import TyperGroup

from opulon import __version__
from opulon.cli.console import error_line
from opulon.database_url import check_database_url
from opulon.errors import OpulonError
from opulon.settings import DATABASE_ENV, HOME_ENV, Settings

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
        except Exception as exc:
            psycopg = sys.modules.get("psycopg")
            if psycopg is None or not isinstance(exc, psycopg.Error):
                raise
            message = str(exc).strip().splitlines()
            error_line(f"database error: {message[0] if message else type(exc).__name__}")
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
            if type(exc).__name__ == "NoArgsIsHelpError":
                # Bare "opulon" (or "opulon keys") asks for the help.
                typer.echo(exc.ctx.get_help())  # type: ignore[attr-defined]
                sys.exit(0)
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
    rich_markup_mode=None,  # plain help, as gh and sqlite-utils print it: --limit LIMIT
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
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            envvar=DATABASE_ENV,
            help="The store: postgresql://USER@HOST:PORT/DBNAME for a PostgreSQL database that "
            "several nodes share, or sqlite:///PATH. Default: opulon.db in the data dir.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Opulon: a privacy-first AI API gateway.

    Example: opulon keys create --name alice --limit requests:60/1m
    """
    if database is not None:
        check_database_url(database)
    ctx.obj = Settings.resolve(home, database=database)


def _register() -> None:
    from opulon.cli import db, demo, doctor, email, keys, providers, serve, site, usage

    app.add_typer(keys.app, name="keys")
    app.add_typer(providers.app, name="providers")
    app.add_typer(email.app, name="email")
    app.add_typer(site.app, name="site")
    app.add_typer(db.app, name="db")
    app.command(name="serve")(serve.serve)
    app.command(name="doctor")(doctor.doctor)
    app.command(name="demo")(demo.demo)
    app.command(name="usage")(usage.usage)


_register()


# What an option's value is, where its name alone says it less well.
_METAVARS = {
    "home": "DIR",
    "database": "URL",
    "host": "ADDRESS",
    "port": "PORT",
    "api_key_env": "VAR",
    "concurrency": "N",
    "workers": "N",
    "grace": "DURATION",
    "expires": "WHEN",
    "since": "WHEN",
    "until": "WHEN",
    "ssl_certfile": "FILE",
    "ssl_keyfile": "FILE",
    "models": "GLOBS",
    "max_body": "SIZE",
    "by": "GROUPING",
}


def _no_type(ctx: Any) -> None:
    return None


def _name_values(command: Any) -> None:
    """Give every option a metavar that names its value (``--limit LIMIT``); flags get none."""
    for param in command.params:
        if param.param_type_name == "argument" and param.metavar is None:
            param.metavar = (param.name or "value").upper()
            param.display_type_rich = _no_type  # the name says what it is: PREFIX, NAME
        elif param.param_type_name == "option" and param.metavar is None:
            if param.is_flag:
                param.metavar = ""
            else:
                name = param.name or "value"
                param.metavar = _METAVARS.get(name, name.upper())
    for sub in getattr(command, "commands", {}).values():
        _name_values(sub)


_GLOBAL_OPTIONS = ("--home", "--database")


def _home_first(args: list[str]) -> list[str]:
    """``--home DIR`` and ``--database URL`` accepted after the subcommand too: moved to the
    front for the parser.

    ``opulon demo`` keeps its own ``--home`` (a temporary data dir unless given one).
    """
    if "demo" in args[:1]:
        return args
    moved: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest.extend(args[index:])
            break
        if arg in _GLOBAL_OPTIONS and index + 1 < len(args):
            moved += args[index : index + 2]
            index += 2
            continue
        if arg.startswith(tuple(f"{option}=" for option in _GLOBAL_OPTIONS)):
            moved.append(arg)
        else:
            rest.append(arg)
        index += 1
    return moved + rest


def main() -> None:
    """Console-script entry point."""
    command = typer.main.get_command(app)
    _name_values(command)
    command.main(_home_first(sys.argv[1:]), prog_name="opulon")
