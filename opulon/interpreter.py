"""What the running CPython is built like, as far as it matters for serving speed.

A CPython linked against a shared ``libpython`` (pyenv's and ``./configure --enable-shared``
builds; usually also without profile-guided optimisation) runs the gateway's Python code
markedly slower than a static build with PGO and LTO, such as Debian's ``/usr/bin/python3``:
on the benchmark machine the same code took about 17% more CPU per request.
"""

from __future__ import annotations

import sys
from pathlib import Path

SLOWER_BUILD = (
    "a shared libpython: expect about 17% more CPU per request than a static, PGO-built "
    "CPython such as Debian's /usr/bin/python3"
)


def shared_libpython(pid: int | str = "self") -> bool | None:
    """Whether process ``pid`` runs on a shared ``libpython``; ``None`` where /proc cannot tell."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "libpython" in maps


def _name() -> str:
    return f"Python {sys.version.split()[0]} ({sys.executable})"


def summary() -> str:
    """This interpreter in a few words: version, path and the kind of build."""
    shared = shared_libpython()
    if shared is None:
        return _name()
    return f"{_name()}, {'shared' if shared else 'static'} libpython"


def describe() -> tuple[str, bool]:
    """(a line about this interpreter, whether it is the fast kind or cannot be told apart)."""
    if shared_libpython():
        return f"{_name()} loads {SLOWER_BUILD}", False
    return summary(), True
