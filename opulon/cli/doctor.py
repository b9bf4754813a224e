"""``opulon doctor``: is this installation sound?"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from opulon.cli.common import settings_of
from opulon.cli.console import console, print_json
from opulon.errors import OpulonError
from opulon.interpreter import describe
from opulon.settings import MASTER_KEY_ENV
from opulon.storage import migrations, open_store


def _mode(path: Path) -> str | None:
    try:
        return oct(stat.S_IMODE(os.stat(path).st_mode))
    except FileNotFoundError:
        return None


def doctor(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check the data dir, file modes, schema and master key; exit 1 when something is wrong."""
    settings = settings_of(ctx)
    checks: list[tuple[str, bool, str]] = []
    checks.append(("data dir", settings.home.is_dir(), str(settings.home)))
    db_mode = _mode(settings.db_path)
    checks.append(
        ("database", db_mode == "0o600", f"{settings.db_path} (mode {db_mode or 'missing'})")
    )
    if settings.master_key_text is not None:
        checks.append(("master key", True, f"from {MASTER_KEY_ENV}"))
    else:
        key_mode = _mode(settings.master_key_path)
        checks.append(
            (
                "master key file",
                key_mode == "0o600",
                f"{settings.master_key_path} (mode {key_mode or 'missing'})",
            )
        )
    for suffix in ("-wal", "-shm"):
        extra = settings.db_path.with_name(settings.db_path.name + suffix)
        mode = _mode(extra)
        if mode is not None:
            checks.append((f"database{suffix}", mode == "0o600", f"{extra} (mode {mode})"))
    schema = "-"
    if db_mode is not None:
        try:
            store = open_store(settings, create=False)
        except OpulonError as exc:
            checks.append(("master key fits", False, str(exc)))
        else:
            applied = store.schema_version()
            pending = len(migrations.pending(store.db))
            store.close()
            schema = applied[-1] if applied else "-"
            checks.append(("master key fits", True, "yes"))
            checks.append(("schema", pending == 0, f"{schema} ({len(applied)} migrations)"))
    ok = all(passed for _, passed, _ in checks)
    # Advice, not a failure: the gateway works on any CPython, only its speed differs.
    python_line, _ = describe()
    checks.append(("python", True, python_line))
    if json:
        print_json(
            {
                "ok": ok,
                "home": str(settings.home),
                "schema": schema,
                "checks": [{"name": n, "ok": p, "detail": d} for n, p, d in checks],
            }
        )
    else:
        table = Table(show_header=False, box=None)
        for name, passed, detail in checks:
            table.add_row("[green]ok[/]" if passed else "[red]FAIL[/]", name, detail)
        console.print(table)
        console.print("[green]All checks passed.[/]" if ok else "[red]Something is wrong.[/]")
    if not ok:
        raise typer.Exit(1)
