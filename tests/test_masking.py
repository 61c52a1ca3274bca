"""hpc.masking: a key is masked in every form a log line can carry it, and nothing else is.

The forms are built here with the standard library's own encoders, independently of how
hpc.masking finds them; the property tests then check that nothing of the key can be
decoded from what is left.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc.masking import MASK, Mask, base64_cores, mask
from hpc.registry import new_api_key

KEY = "mtj-Zq3x_9Yk-LpV0aBcDeFgHiJkLmNoPqRsTuVwXyZ01234"

_B64 = (base64.b64encode, base64.urlsafe_b64encode)


def _forms(key: str) -> list[str]:
    raw = key.encode()
    every = "".join(f"%{b:02X}" for b in raw)
    forms = [key, urllib.parse.quote(key, safe=""), every, every.lower()]
    forms.append(every.replace("%", "%25"))  # encoded twice
    forms.append("".join(f"%{b:02x}" if i % 2 else chr(b) for i, b in enumerate(raw)))
    for encode in _B64:
        for data in (raw, b"Bearer " + raw, b"user:" + raw, b"u:" + raw, b":" + raw):
            text = encode(data).decode()
            forms += [text, text.rstrip("=")]
    return forms


@pytest.mark.parametrize("form", range(len(_forms(KEY))))
def test_every_form_of_the_key_is_masked(form: int) -> None:
    text = _forms(KEY)[form]
    line = f"GET /x?k={text} HTTP/1.1 200"
    masked = mask(line, KEY)
    assert MASK in masked
    assert not _decodable(masked, KEY)
    assert masked.startswith("GET /x?k=") and masked.endswith(" HTTP/1.1 200")


def test_ordinary_text_and_an_empty_secret_are_left_alone() -> None:
    line = "llama server listening at http://0.0.0.0:8123 (slots 4) mtj- QmVhcmVy"
    assert mask(line, KEY) == line
    assert mask("anything at all", "") == "anything at all"
    assert Mask("")("***") == "***"


def test_a_short_secret_masks_its_plain_and_percent_forms_only() -> None:
    # base64 of a 4-byte secret is too short to tell apart from ordinary text.
    assert base64_cores("abcd") == set()
    assert mask("x abcd %61%62%63%64 y", "abcd") == f"x {MASK} {MASK} y"


def test_the_cores_are_what_base64_of_the_key_shows_at_each_offset() -> None:
    cores = base64_cores(KEY)
    for prefix in (b"", b"x", b"xy", b"xyz", b"Bearer "):
        for encode in _B64:
            encoded = encode(prefix + KEY.encode()).decode()
            assert any(core in encoded for core in cores), (prefix, encoded)


_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    key=st.one_of(
        st.builds(new_api_key),
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=16),
    ),
    before=st.binary(max_size=8),
    after=st.binary(max_size=8),
    urlsafe=st.booleans(),
    padded=st.booleans(),
)
def test_base64_of_the_key_amid_anything_is_not_decodable_after_masking(
    key: str, before: bytes, after: bytes, urlsafe: bool, padded: bool
) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    text = encode(before + key.encode() + after).decode()
    if not padded:
        text = text.rstrip("=")
    masked = mask(f"auth {text} end", key)
    assert MASK in masked
    assert not _decodable(masked, key)


@settings(max_examples=200, deadline=None)
@given(
    key=st.builds(new_api_key),
    encoded=st.lists(st.integers(min_value=0, max_value=2), min_size=60, max_size=60),
    before=_TEXT,
    after=_TEXT,
)
def test_the_key_with_any_of_its_characters_percent_encoded_is_masked(
    key: str, encoded: list[int], before: str, after: str
) -> None:
    # Each character plain (0), %XX (1) or %xx (2), as different clients and proxies write.
    chars = [
        c if how == 0 else (f"%{ord(c):02X}" if how == 1 else f"%{ord(c):02x}")
        for c, how in zip(key, encoded, strict=False)
    ]
    masked = mask(before + "".join(chars) + after, key)
    assert MASK in masked
    assert key not in urllib.parse.unquote(masked)


@settings(max_examples=200, deadline=None)
@given(key=st.builds(new_api_key), text=_TEXT)
def test_text_without_the_key_is_unchanged(key: str, text: str) -> None:
    assert mask(text, key) == text


def _decodable(text: str, key: str) -> bool:
    """Whether ``key``, or 12 bytes of it, can be read from ``text`` by any decoding."""
    pieces = [urllib.parse.unquote(urllib.parse.unquote(text))]
    for found in re.findall(r"[A-Za-z0-9+/_=-]{4,}", text):
        run = found.replace("-", "+").replace("_", "/").rstrip("=")
        for start in range(4):  # whatever the alignment of what is left
            chunk = run[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            try:
                pieces.append(base64.b64decode(chunk).decode("latin-1"))
            except (binascii.Error, ValueError):
                continue
    raw = key.encode().decode("latin-1")
    windows = {raw[i : i + 12] for i in range(max(1, len(raw) - 11))}
    return any(w in piece for piece in pieces for w in windows)
