"""What the running CPython is built like, as far as it matters for serving speed.

A CPython linked against a shared ``libpython`` (pyenv's and ``./configure --enable-shared``
builds; usually also without profile-guided optimisation) runs the gateway's Python code
markedly slower than a static build with PGO and LTO, such as Debian's ``/usr/bin/python3``:
on the benchmark machine the same code took about 17% more CPU per request.
"""

from __future__ import annotations

import sys
from pathlib import Path


def shared_libpython(pid: int | str = "self") -> bool | None:
    """Whether process ``pid`` runs on a shared ``libpython``; ``None`` where /proc cannot tell."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "libpython" in maps


def describe(pid: int | str = "self") -> tuple[str, bool]:
    """(a line about the interpreter, whether it is the fast kind or cannot be told apart)."""
    version = sys.version.split()[0] if pid == "self" else "?"
    where = sys.executable if pid == "self" else f"process {pid}"
    shared = shared_libpython(pid)
    if shared is None:
        return f"Python {version} ({where})", True
    if shared:
        return (
            f"Python {version} ({where}) loads a shared libpython: expect about 17% more CPU "
            "per request than a static, PGO-built CPython such as Debian's /usr/bin/python3",
            False,
        )
    return f"Python {version} ({where}), static libpython", True
