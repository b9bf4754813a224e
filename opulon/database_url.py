"""Database URLs: which engine a ``--database`` names, and how to print one without its password.

``postgresql://user:password@host:5432/dbname`` (or ``postgres://``) names a PostgreSQL
database; ``sqlite:///absolute/path/opulon.db`` a SQLite file. Anything else is refused with a
one-line :class:`~opulon.errors.InvalidInput`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from opulon.errors import InvalidInput

__all__ = ["POSTGRESQL_SCHEMES", "check_database_url", "redact", "redact_query", "sqlite_path"]

POSTGRESQL_SCHEMES = ("postgresql", "postgres")
_HINT = "use postgresql://USER@HOST:PORT/DBNAME or sqlite:///PATH/TO/opulon.db"
_SECRET_PARAMETERS = {"password", "sslpassword"}


def redact(url: str) -> str:
    """``url`` as it may be printed or logged: without its password (nor a password parameter)."""
    if url.startswith("sqlite:"):
        return url  # a path, no credentials
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}@{hostinfo}"
        query = redact_query(parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "(a database URL that cannot be read)"


def redact_query(query: str) -> str:
    """A URL's query without the value of any password parameter (``?password=...``)."""
    if not query:
        return query
    return urlencode(
        [
            (name, "***" if name.lower() in _SECRET_PARAMETERS else value)
            for name, value in parse_qsl(query, keep_blank_values=True)
        ],
        safe="=*",
    )


def check_database_url(url: str, *, option: str = "--database") -> str:
    """``url`` if it names a database Opulon can use; else :class:`InvalidInput` saying why."""
    text = url.strip()
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if scheme in POSTGRESQL_SCHEMES:
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise InvalidInput(f"invalid {option} {redact(text)}: {exc}; {_HINT}") from None
        if not parts.hostname and "host=" not in parts.query:
            raise InvalidInput(f"invalid {option} {redact(text)}: it names no host; {_HINT}")
        return text
    if scheme == "sqlite":
        path = text[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise InvalidInput(
                f"invalid {option} {text}: a SQLite URL names an absolute path, "
                "e.g. sqlite:///var/lib/opulon/opulon.db"
            )
        return text
    if not scheme:
        raise InvalidInput(f"invalid {option}: it is not a database URL; {_HINT}")
    raise InvalidInput(f"invalid {option} {redact(text)}: {scheme} is not supported; {_HINT}")


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:///`` URL names."""
    return Path(url[len("sqlite://") :]).expanduser()
