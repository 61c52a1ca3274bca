"""Masking a secret in text that is about to be logged, in every form a log line can carry it.

A key reaches a log line plain (``Authorization: Bearer KEY``), percent-encoded (a URL or
a form body: ``key%3D…``, every character or only some, even encoded twice: ``%2541``),
or base64-encoded, standard or URL-safe, padded or not, and usually with something
around it (HTTP Basic carries ``base64("user:" + KEY)``, some clients ``base64("Bearer
KEY")``). What comes before the key shifts its base64 by 0, 1 or 2 bytes, so the key is
found by the three encodings that do not depend on its neighbours: for each shift, the
characters of ``base64(pad + KEY)`` that only the key's bytes determine. Those are
replaced; the one or two characters at either edge, which mix the key's first or last
bits with its neighbours', stay (a few bits of a 256-bit key).

One compiled pattern per secret, built once (``Mask``), applied per line.
"""

from __future__ import annotations

import base64
import re

MASK = "***"
# A base64 core shorter than this could match ordinary text: such a secret is too short
# to be a key, and its plain and percent-encoded forms are still masked.
_MIN_CORE = 8
_SHIFTS = (0, 1, 2)


def _percent_or_plain(secret: str) -> str:
    """A pattern for ``secret`` where each byte is itself or ``%XX`` (``%25XX``: twice)."""
    parts = []
    for char in secret:
        encoded = char.encode()
        hexes = "".join(f"%(?:25)?(?i:{b:02x})" for b in encoded)
        parts.append(f"(?:{re.escape(char)}|{hexes})")
    return "".join(parts)


def base64_cores(secret: str) -> set[str]:
    """The base64 text (standard and URL-safe) that ``secret`` alone determines, at each of
    the three byte offsets it can start at in the encoded data."""
    data = secret.encode()
    cores: set[str] = set()
    for shift in _SHIFTS:
        encoded = base64.b64encode(b"\0" * shift + data).decode()
        bits_before = 8 * shift
        bits_end = 8 * (shift + len(data))
        first = -(-bits_before // 6)  # the first character with no neighbour's bits
        last = bits_end // 6  # one past the last such character
        core = encoded[first:last]
        if len(core) >= _MIN_CORE:
            cores.add(core)
            cores.add(core.translate(str.maketrans("+/", "-_")))
    return cores


class Mask:
    """Replaces every form of one secret in a text with ``***``; an empty secret masks nothing."""

    def __init__(self, secret: str) -> None:
        self._pattern: re.Pattern[str] | None = None
        if secret:
            forms = [_percent_or_plain(secret)]
            forms += [re.escape(core) for core in sorted(base64_cores(secret), key=len)[::-1]]
            self._pattern = re.compile("|".join(forms))

    def __call__(self, text: str) -> str:
        """``text`` with the secret masked."""
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)


def mask(text: str, secret: str) -> str:
    """``text`` with every form of ``secret`` replaced by ``***`` (see the module doc)."""
    return Mask(secret)(text)
