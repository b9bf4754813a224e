"""What an inference request may keep, or read back, at the provider.

Every key routed to a provider shares the operator's account there. A conversation stored at
the provider (``store: true``, and the Responses API stores by default) could be read back by
any other key through the stored-object APIs, and a request that references a stored object
(``previous_response_id``, a ``conversation``, a ``file_id``, ``vector_store_ids``, an
``item_reference``, a code-execution ``container`` id, a stored ``prompt`` or ``audio`` id) makes the model read an object that another key holder, or the operator,
left in that account. So unless the operator turned the family on for the provider, such a
request is refused, and the Responses API is sent ``store: false``.
"""

from __future__ import annotations

from typing import Any

from opulon.providers import Provider

# A key anywhere in a request body that names a stored object, and the family it needs.
_REFERENCE_KEYS: dict[str, str] = {
    "file_id": "files",
    "file_ids": "files",
    "vector_store_ids": "vector_stores",
}
# What must stand in a body for it to hold a reference, as msgspec encodes it: no spaces, and
# no \u escapes but for control characters, so a client's escapes cannot hide a key.
_MARKERS = (b"file_id", b"vector_store_ids", b"item_reference", b"container", b'"prompt":{',
            b'"audio":{')  # fmt: skip
_MAX_DEPTH = 64


def _refused(what: str, family: str) -> str:
    return (
        f"{what} is refused: this gateway keeps no objects at the provider, whose account every "
        f"key shares (the operator can turn on {family!r} for a provider)"
    )


def _references(payload: dict[str, Any]) -> tuple[str, str] | None:
    """The first reference to a stored object in ``payload``: (what, family), or None."""
    stack: list[tuple[Any, int]] = [(payload, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return (f"a body nested over {_MAX_DEPTH} levels deep", "stored")
        if isinstance(value, dict):
            for key, item in value.items():
                family = _REFERENCE_KEYS.get(key)
                if family is not None and item is not None:
                    return (f"{key!r}", family)
                if key == "type" and item == "item_reference":
                    return ("an 'item_reference'", "stored")
                if key == "container" and (
                    isinstance(item, str) or (isinstance(item, dict) and "id" in item)
                ):
                    # The id of a code-execution container made by an earlier request.
                    return ("a 'container' id", "containers")
                if key in ("prompt", "audio") and isinstance(item, dict) and "id" in item:
                    # A stored prompt template, or the audio of an earlier answer.
                    return (f"a stored {key!r} id", "stored")
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value if isinstance(item, dict | list))
    return None


def check_stored_state(
    endpoint: str, payload: dict[str, Any], provider: Provider
) -> tuple[str | None, bool]:
    """Why the request is refused (a message for the key holder, or None), and whether
    ``payload`` was changed.

    For the Responses API, ``store`` is set to false when the client left it out (the API's
    default is to store) and the provider is not allowed stored responses.
    """
    stored_allowed = provider.allows("stored")
    store = payload.get("store")
    if store is not None and not isinstance(store, bool):
        return "'store' must be true or false", False
    if store and not stored_allowed:
        return _refused("'store': true", "stored"), False
    if endpoint != "responses":
        return None, False
    if payload.get("previous_response_id") is not None and not stored_allowed:
        return _refused("'previous_response_id'", "stored"), False
    if payload.get("conversation") is not None and not provider.allows("conversations"):
        return _refused("'conversation'", "conversations"), False
    if store is None and not stored_allowed:
        payload["store"] = False
        return None, True
    return None, False


def check_references(encoded: bytes, payload: dict[str, Any], provider: Provider) -> str | None:
    """Why a request that names stored objects is refused, or None.

    ``encoded`` is msgspec's encoding of ``payload``: the one that goes upstream. Only a body
    holding one of the markers is walked.
    """
    for marker in _MARKERS:
        if marker in encoded:
            found = _references(payload)
            if found is not None and not provider.allows(found[1]):
                return _refused(found[0], found[1])
            return None
    return None
