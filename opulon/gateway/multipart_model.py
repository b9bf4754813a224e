"""The ``model`` field of a multipart/form-data body (audio and image uploads), read in memory.

The body is parsed whole, with the maintained ``multipart`` parser in strict mode, from the
bytes held in memory: nothing is spooled to disk. A body the gateway and the provider could
read differently is refused: one that does not parse, or that names its model twice.
"""

from __future__ import annotations

import re

from multipart import MultipartError, PushMultipartParser, parse_options_header

_MAX_MODEL_BYTES = 1024
_BOUNDARY_PARAM = re.compile(r"(?:^|;)\s*boundary\s*=", re.IGNORECASE)
_NAME_PARAM = re.compile(r"(?:^|;)\s*name\s*=", re.IGNORECASE)


def _ambiguous(headerlist: list[tuple[str, str]]) -> bool:
    """A part whose name could be read two ways: two dispositions, or two names in one."""
    dispositions = [value for name, value in headerlist if name == "Content-Disposition"]
    return len(dispositions) != 1 or len(_NAME_PARAM.findall(dispositions[0])) != 1


class MultipartRefusal(Exception):
    """The body cannot be read as one form with at most one ``model`` field."""


def form_model(content_type: bytes, body: bytes) -> str | None:
    """The ``model`` form field of ``body``, or None when there is none.

    Raises :class:`MultipartRefusal` with a message for the key holder.
    """
    text = content_type.decode("latin-1")
    kind, options = parse_options_header(text)
    boundary = options.get("boundary")
    if kind != "multipart/form-data" or not boundary:
        raise MultipartRefusal("expected a multipart/form-data body with a boundary")
    if len(_BOUNDARY_PARAM.findall(text)) != 1:
        raise MultipartRefusal("the Content-Type names more than one boundary")
    model: bytes | None = None
    reading_model = False
    field = bytearray()
    try:
        with PushMultipartParser(boundary, content_length=len(body), strict=True) as parser:
            for event in (*parser.parse(body), *parser.parse(b"")):
                if event is None:
                    if reading_model:
                        model, reading_model = bytes(field), False
                elif isinstance(event, bytes | bytearray):
                    if reading_model:
                        field.extend(event)
                        if len(field) > _MAX_MODEL_BYTES:
                            raise MultipartRefusal("the 'model' form field is too long")
                elif _ambiguous(event.headerlist):
                    raise MultipartRefusal("a form part's name is ambiguous")
                elif event.name == "model":
                    if model is not None or event.filename is not None:
                        raise MultipartRefusal("the form names its 'model' more than once")
                    reading_model = True
    except MultipartError:
        raise MultipartRefusal("the multipart body is malformed") from None
    if model is None:
        return None
    try:
        return model.decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartRefusal("the 'model' form field is not UTF-8 text") from None
