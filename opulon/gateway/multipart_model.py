"""The ``model`` field of a multipart/form-data body (audio and image uploads), read in memory.

The body is parsed whole, with the maintained ``multipart`` parser in strict mode, from the
bytes held in memory: nothing is spooled to disk. A body the gateway and the provider could
read differently is refused: one that does not parse, or that names its model twice.
"""

from __future__ import annotations

from multipart import MultipartError, PushMultipartParser, parse_options_header

_MAX_MODEL_BYTES = 1024


class MultipartRefusal(Exception):
    """The body cannot be read as one form with at most one ``model`` field."""


def form_model(content_type: bytes, body: bytes) -> str | None:
    """The ``model`` form field of ``body``, or None when there is none.

    Raises :class:`MultipartRefusal` with a message for the key holder.
    """
    kind, options = parse_options_header(content_type.decode("latin-1"))
    boundary = options.get("boundary")
    if kind != "multipart/form-data" or not boundary:
        raise MultipartRefusal("expected a multipart/form-data body with a boundary")
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
