"""Upstream AI model providers: where a request's model is sent.

A provider has a name, a kind (``openai``: any OpenAI-compatible API; ``anthropic``), a base
URL, an API key stored encrypted under the master key, and model glob patterns. The request's
model picks the provider; the first provider (in order of addition) whose patterns match wins.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from opulon.errors import Conflict, InvalidInput, NotFound
from opulon.storage import Store

KINDS = ("openai", "anthropic")
# Stateful provider API families an operator may turn on for a provider, with what every key
# routed there then shares. Off by default: see opulon.gateway.routes.
FAMILIES: dict[str, str] = {
    "files": "uploaded files (/v1/files)",
    "uploads": "multi-part uploads (/v1/uploads)",
    "batches": "batch jobs (/v1/batches, /v1/messages/batches)",
    "fine_tuning": "fine-tuning jobs and checkpoints (/v1/fine_tuning)",
    "assistants": "assistants (/v1/assistants)",
    "threads": "threads, messages and runs (/v1/threads)",
    "vector_stores": "vector stores (/v1/vector_stores)",
    "conversations": "conversations (/v1/conversations)",
    "stored": "stored chat completions and responses (store: true, /v1/responses/{id})",
    "admin": "the organisation's admin API (/v1/organization, /v1/organizations)",
    "realtime": "realtime sessions (/v1/realtime)",
    "containers": "code-execution containers and their files (/v1/containers)",
}


_MISSING = object()
# A model pattern: a model name's characters and the glob's * ? [ ]. The landing page prints
# them in its examples, so nothing else (no quote, no space) gets in.
_PATTERN_RE = re.compile(r"[A-Za-z0-9._:/@*?\[\]-]{1,200}")


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider with its API key decrypted (in memory only)."""

    id: int
    name: str
    kind: str
    base_url: str  # the API root as the operator gave it (OpenAI kind: with its /v1, if any)
    api_key: str | None
    models: tuple[str, ...]
    allow: frozenset[str] = frozenset()  # stateful API families turned on (FAMILIES)

    def allows(self, family: str) -> bool:
        return family in self.allow

    def url_for(self, route_path: str) -> str:
        """The upstream URL (without query) of a gateway route such as ``/v1/chat/completions``.

        An OpenAI-compatible base URL is the API root, e.g. ``https://api.openai.com/v1`` or
        Gemini's ``.../v1beta/openai``: the route's own ``/v1`` is replaced by it. Anthropic's
        base URL is the host root (as its SDK takes it), so the route is appended whole.
        """
        if self.kind == "anthropic":
            return self.base_url + route_path
        return self.base_url + route_path[3:]

    def serves(self, model: str) -> bool:
        return not self.models or any(fnmatchcase(model, pattern) for pattern in self.models)

    def auth_headers(self) -> list[tuple[str, str]]:
        if not self.api_key:
            return []
        if self.kind == "anthropic":
            return [("x-api-key", self.api_key)]
        return [("authorization", f"Bearer {self.api_key}")]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "base_url": self.base_url,
            "models": list(self.models) or ["*"],
            "api_key": "set" if self.api_key else None,
            "allow": sorted(self.allow),
        }


_ROUTE_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class ProviderTable:
    """A snapshot of all providers, for routing without SQL per request."""

    providers: tuple[Provider, ...]
    _routes: dict[tuple[str, str], Provider | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    def route(self, model: str, kind: str) -> Provider | None:
        """The first provider of ``kind`` whose patterns match ``model`` (remembered)."""
        found = self._routes.get((model, kind), _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        choice = next((p for p in self.providers if p.kind == kind and p.serves(model)), None)
        if len(self._routes) >= _ROUTE_CACHE_SIZE:  # model names come from clients: bound it
            self._routes.clear()
        self._routes[(model, kind)] = choice
        return choice

    def first(self, kind: str) -> Provider | None:
        return next((p for p in self.providers if p.kind == kind), None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_base_url(url: str, kind: str = "openai") -> str:
    """Validate a base URL: the API root for OpenAI-kind providers, the host root for Anthropic.

    Requests leave for providers over HTTPS; plain HTTP is accepted only for a provider on
    this machine (a local model server, or the mock provider). A trailing ``/`` is dropped, and
    for Anthropic a trailing ``/v1`` (its routes carry it).
    """
    cleaned = url.strip().rstrip("/")
    parts = urlsplit(cleaned)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"invalid base URL {url!r}: expected https://host[:port][/path]")
    if parts.query or parts.fragment:
        raise InvalidInput(f"invalid base URL {url!r}: no query or fragment")
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise InvalidInput(
            f"invalid base URL {url!r}: use https; plain http is only for providers on "
            "this machine (127.0.0.1, localhost)"
        )
    if kind == "anthropic" and cleaned.endswith("/v1"):
        cleaned = cleaned[: -len("/v1")]
    return cleaned


def _validate_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned or not all(ch.isalnum() or ch in "-_." for ch in cleaned):
        raise InvalidInput(f"invalid provider name {name!r}: use letters, digits, '-', '_' and '.'")
    return cleaned


class ProviderStore:
    """Providers in the database."""

    def __init__(self, store: Store) -> None:
        self._db = store.db
        self._master = store.master_key

    def add(
        self,
        name: str,
        *,
        kind: str,
        base_url: str,
        api_key: str | None,
        models: tuple[str, ...] = (),
        allow: frozenset[str] = frozenset(),
    ) -> Provider:
        name = _validate_name(name)
        if kind not in KINDS:
            raise InvalidInput(f"invalid kind {kind!r}: use openai or anthropic")
        url = normalize_base_url(base_url, kind)
        if api_key is not None and (
            not api_key.strip() or any(c.isspace() for c in api_key.strip())
        ):
            raise InvalidInput("the provider API key is empty or contains spaces")
        patterns = tuple(m.strip() for m in models if m.strip())
        for pattern in patterns:
            if not _PATTERN_RE.fullmatch(pattern):
                raise InvalidInput(
                    f"invalid model pattern {pattern!r}: letters, digits, . _ : / @ - and "
                    "the wildcards * ? [ ], e.g. 'gpt-4o*'"
                )
        if patterns == ("*",):
            patterns = ()
        if self._db.execute("SELECT 1 FROM providers WHERE name = ?", [name]).fetchone():
            raise Conflict(f"a provider named {name!r} exists; remove it first")
        ciphertext = (
            self._master.encrypt(api_key.strip().encode(), context=f"provider:{name}".encode())
            if api_key
            else None
        )
        self._db.execute(
            "INSERT INTO providers "
            "(name, kind, base_url, api_key_ciphertext, models, allow, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [name, kind, url, ciphertext, json.dumps(patterns), json.dumps(sorted(allow)),
             time.time()],
        )  # fmt: skip
        return self.get(name)

    def set_allow(self, name: str, allow: frozenset[str]) -> Provider:
        """Turn exactly these stateful API families on for a provider (the rest off)."""
        provider = self.get(name)
        self._db.execute(
            "UPDATE providers SET allow = ? WHERE id = ?", [json.dumps(sorted(allow)), provider.id]
        )
        return self.get(name)

    def all(self) -> list[Provider]:
        rows = self._db.execute(
            "SELECT id, name, kind, base_url, api_key_ciphertext, models, allow FROM providers "
            "ORDER BY id"
        ).fetchall()
        return [self._provider(row) for row in rows]

    def get(self, name: str) -> Provider:
        row = self._db.execute(
            "SELECT id, name, kind, base_url, api_key_ciphertext, models, allow FROM providers "
            "WHERE name = ?",
            [name.strip()],
        ).fetchone()
        if row is None:
            raise NotFound(f"no provider named {name.strip()!r}")
        return self._provider(row)

    def remove(self, name: str) -> Provider:
        provider = self.get(name)
        self._db.execute("DELETE FROM providers WHERE id = ?", [provider.id])
        return provider

    def table(self) -> ProviderTable:
        return ProviderTable(tuple(self.all()))

    def _provider(self, row: tuple[Any, ...]) -> Provider:
        provider_id, name, kind, base_url, ciphertext, models, allow = row
        api_key = None
        if ciphertext is not None:
            api_key = self._master.decrypt(
                bytes(ciphertext), context=f"provider:{name}".encode()
            ).decode()
        return Provider(
            provider_id,
            name,
            kind,
            base_url,
            api_key,
            tuple(json.loads(models)),
            frozenset(json.loads(allow)),
        )


def parse_families(values: list[str]) -> frozenset[str]:
    """Families from ``--allow files,batches`` (``none`` clears); InvalidInput names a bad one."""
    names = {part.strip().lower() for value in values for part in value.split(",")}
    names.discard("")
    if names == {"none"}:
        return frozenset()
    unknown = sorted(names - FAMILIES.keys())
    if unknown:
        raise InvalidInput(
            f"unknown API family {unknown[0]!r}: use one or more of {', '.join(FAMILIES)}, or none"
        )
    return frozenset(names)
