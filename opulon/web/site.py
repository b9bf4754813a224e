"""The site's templates and static files, as the gateway serves them.

:func:`environment` is the Jinja environment every page renders from: templates of this
package, autoescaped, strict about undefined names, with :mod:`opulon.formatting` as filters.
:class:`StaticFile` is a file of ``static/`` under a name that carries its content hash
(``opulon.3f2a9c1e4b7d.css``): browsers may keep it for a year, and a changed file ships
under a new name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from opulon import formatting

__all__ = ["FILTERS", "NAVIGATION", "StaticFile", "environment"]

#: The site's navigation: (path, name), in order.
NAVIGATION = (("/", "Home"), ("/key-status", "Key status"), ("/privacy", "Privacy"))

#: What the templates may format with, by filter name.
FILTERS = {
    "compact": formatting.compact,
    "duration": formatting.format_duration,
    "grouped": formatting.grouped,
    "iso": formatting.iso,
    "latency": formatting.latency_text,
    "relative": formatting.relative_duration,
    "short_date": formatting.short_date,
    "utc": formatting.utc,
    "window": formatting.window_text,
}


_MEDIA_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    """A file of ``opulon/web/static/`` with its bytes and content-hashed name."""

    name: str  # e.g. opulon.3f2a9c1e4b7d.css
    body: bytes
    media_type: str

    @property
    def url(self) -> str:
        return f"/static/{self.name}"

    @classmethod
    def load(cls, filename: str) -> StaticFile:
        """Read ``static/<filename>`` and name it by the hash of its bytes."""
        body = resources.files("opulon").joinpath("web/static", filename).read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:12]
        path = PurePosixPath(filename)
        # Fixed, not the host's mime.types: with nosniff, a wrong type would be refused.
        media_type = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        return cls(f"{path.stem}.{digest}{path.suffix}", body, media_type)


def environment(**globals_: Any) -> Environment:
    """The Jinja environment of the site's templates, with ``globals_`` visible to all."""
    env = Environment(
        loader=PackageLoader("opulon", "web/templates"),
        # Pages are escaped; a .txt template (the policy's text) is not markup.
        autoescape=select_autoescape(disabled_extensions=("txt",), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    env.globals.update(
        navigation=NAVIGATION,
        DATE=formatting.DATE,
        MINUTE=formatting.MINUTE,
        SECOND=formatting.SECOND,
        **globals_,
    )
    return env
