"""A ``multipart/form-data`` body's ``model`` (and ``stream``) fields, read without copying it.

The audio endpoints take a form (the file, then ``model`` and the options as fields); the
gateway routes them by ``model`` like any other request and forwards the client's bytes
untouched, so only the small fields are looked at: a part is found by its boundary and its
``Content-Disposition`` name, never decoded as a whole. An alias or a fallback changes the
``model`` field's value in place (:meth:`Form.renamed`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A field's name in its part's Content-Disposition header.
_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="([^"]*)"')
_BOUNDARY = re.compile(r'(?i)boundary=(?:"([^"]+)"|([^;\s]+))')
# The form fields the gateway reads, and how many bytes of each at most.
_MAX_FIELD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Form:
    """The fields the gateway routes by, and where the ``model`` value sits in the body."""

    model: str
    stream: bool
    model_at: tuple[int, int]  # its value's first byte and the byte after its last

    def renamed(self, raw: bytes, model: str) -> bytes:
        """``raw`` with the ``model`` field's value replaced."""
        start, end = self.model_at
        return raw[:start] + model.encode("utf-8") + raw[end:]


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or None."""
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    return (found.group(1) or found.group(2)).encode("latin-1")


def read_form(raw: bytes, boundary: bytes) -> Form | None:
    """The ``model`` and ``stream`` fields of a form body, or None without a ``model``."""
    delimiter = b"--" + boundary
    model: str | None = None
    model_at = (0, 0)
    stream = False
    at = raw.find(delimiter)
    while at >= 0:
        head_start = at + len(delimiter)
        if raw[head_start : head_start + 2] == b"--":
            break  # the closing delimiter
        head_end = raw.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            break
        value_start = head_end + 4
        following = raw.find(b"\r\n" + delimiter, value_start)
        if following < 0:
            break
        name = _NAME.search(raw, head_start, head_end)
        if name is not None and following - value_start <= _MAX_FIELD_BYTES:
            value = raw[value_start:following].decode("utf-8", "replace")
            if name.group(1) == b"model":
                model, model_at = value, (value_start, following)
            elif name.group(1) == b"stream":
                stream = value.strip().lower() == "true"
        at = following + 2
    if not model:
        return None
    return Form(model, stream, model_at)
