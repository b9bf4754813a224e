"""Every ``opulon`` command and option the READMEs show exists, by the ``--help`` of each.

The invocations are read from the READMEs' shell code blocks (and inline code that starts
with ``opulon``): each command path must exist, and each option it uses must appear in that
command's ``--help``, run as the CLI tests run it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from cli_helpers import run

from opulon.cli import app

ROOT = Path(__file__).resolve().parent.parent
READMES = (ROOT / "README.md", ROOT / "bench" / "README.md")
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`(opulon [^`]+)`(?!`)")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = {"<", ">", ">>", "2>", "&>"}
# opulon.cli.main() moves ``--home DIR`` in front of the subcommand, so it may come after it.
ANYWHERE = {"--home"}
CLI = typer.main.get_command(app)


@dataclass(frozen=True)
class Invocation:
    source: str  # README and line, for the message
    line: str
    args: tuple[str, ...]  # after ``opulon``


def _commands(line: str) -> Iterator[list[str]]:
    """The simple commands of one shell line, without redirections and comments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    tokens = iter(lexer)
    for token in tokens:
        if token in SEPARATORS:
            yield command
            command = []
        elif token in REDIRECTS:
            next(tokens, None)  # the file
        else:
            command.append(token)
    yield command


def _opulon_args(command: list[str]) -> list[str] | None:
    if command and Path(command[0]).name == "opulon":
        return command[1:]
    if len(command) >= 3 and command[1:3] == ["-m", "opulon"]:  # python -m opulon
        return command[3:]
    return None


def _lines(block: str, first: int) -> Iterator[tuple[int, str]]:
    """A block's lines with their line numbers; a line ending in a backslash goes on."""
    start, pending = first, ""
    for number, line in enumerate(block.splitlines(), first):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def invocations() -> Iterator[Invocation]:
    for readme in READMES:
        text = readme.read_text()
        name = readme.relative_to(ROOT)
        snippets: list[tuple[int, str]] = []
        for block in FENCE.finditer(text):
            if block.group(1) in SHELL_BLOCKS:
                first = text.count("\n", 0, block.start(2)) + 1
                snippets.extend(_lines(block.group(2), first))
        for inline in INLINE.finditer(text):
            snippets.append((text.count("\n", 0, inline.start()) + 1, inline.group(1)))
        for number, line in snippets:
            for command in _commands(line):
                args = _opulon_args(command)
                if args is not None:
                    yield Invocation(f"{name}:{number}", line.strip(), tuple(args))


INVOCATIONS = list(invocations())


def _is_option(token: str) -> bool:
    return re.match(r"--?[A-Za-z]", token) is not None


def _takes_value(command: Any, option: str) -> bool:
    for param in command.params:
        if param.param_type_name == "option" and option in param.opts + param.secondary_opts:
            return not param.is_flag
    return False


def _parse(args: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """The command path, the options before it and the options after it."""
    path: list[str] = []
    before: list[str] = []
    after: list[str] = []
    command: Any = CLI
    tokens = iter(args)
    for token in tokens:
        if _is_option(token):
            option = token.split("=", 1)[0]
            (after if path else before).append(option)
            if "=" not in token and _takes_value(command, option):
                next(tokens, None)
        elif hasattr(command, "commands"):  # a group: the token names a subcommand
            path.append(token)
            sub = command.commands.get(token)
            if sub is None:
                break  # reported by the test: no such command
            command = sub
    return path, before, after


def _shown(option: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text) is not None


def test_the_readmes_show_opulon_commands() -> None:
    # A parser that found nothing would make the test below pass on anything.
    assert len(INVOCATIONS) >= 20
    assert any(inv.args[:2] == ("keys", "create") for inv in INVOCATIONS)


@pytest.mark.parametrize(
    "invocation", INVOCATIONS, ids=[f"{inv.source} {' '.join(inv.args)}" for inv in INVOCATIONS]
)
def test_documented_commands_and_options_exist(invocation: Invocation) -> None:
    where = f"{invocation.source}: `{invocation.line}`"
    path, before, after = _parse(invocation.args)
    shown = run(*path, "--help")
    assert shown.exit_code == 0, f"{where}: no command `opulon {' '.join(path)}`\n{shown.output}"
    root = run("--help").output
    for option in before:
        assert _shown(option, root), f"{where}: `opulon --help` shows no {option}"
    for option in after:
        assert _shown(option, shown.output) or (option in ANYWHERE and _shown(option, root)), (
            f"{where}: `opulon {' '.join(path)} --help` shows no {option}"
        )


def test_the_readmes_test_command_is_what_ci_runs() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Test it\n", 1)[1].split("\n## ", 1)[0]
    block = FENCE.search(section)
    assert block is not None, "README.md's 'Test it' shows no command"
    assert block.group(2).strip() == "bash .ci/run"
    assert (ROOT / ".ci" / "run").is_file()
