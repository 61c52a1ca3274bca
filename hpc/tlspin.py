"""Pinning a job's TLS certificate: the client proves it reaches the job, not a port squatter.

Each job's front (hpc.job.front) serves TLS with a certificate the job made for itself;
the job writes the SHA-256 of that certificate (DER) into its registry record
(``tls_sha256``). A client that reads the record connects with :func:`pinned_context`:
no CA and no host name (the certificate is self-signed), but the handshake itself fails
unless the server's certificate has that digest, so the check happens before a single
byte of the request (key, prompt) is written. An impostor on the job's port cannot present
such a certificate without the job's private key, which never leaves the job's 0700
directory.

The check lives in the context's socket and object classes (``sslsocket_class``,
``sslobject_class``), so every client that takes an ``ssl.SSLContext`` pins: ``http.client``
and ``urllib``, asyncio (the gateway's own HTTP/1.1 client), aiohttp (the health probes; it
is what aiohttp's ``Fingerprint`` does), httpx and so the ``openai`` client.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import ssl
from typing import Any
from urllib.parse import urlsplit

from hpc.errors import MTError

_HINT = (
    "another process holds the job's port (a port squatter?), or the record is stale: "
    "nothing was sent to it; check `mt status` and the job's log"
)


class PinMismatch(MTError, ssl.SSLCertVerificationError):
    """The server presented another certificate than the one the job's record names.

    An ``ssl.SSLError`` too, so every TLS client reports it as a failed handshake."""

    def __str__(self) -> str:
        return self.message


def cert_sha256(der: bytes) -> str:
    """The lowercase hex SHA-256 of a certificate in DER form (what records hold)."""
    return hashlib.sha256(der).hexdigest()


def check_peer(ssl_object: Any, expected_sha256: str) -> None:
    """Raise :class:`PinMismatch` unless the peer's certificate has ``expected_sha256``.

    ``ssl_object`` is an ``ssl.SSLSocket`` or ``ssl.SSLObject`` after its handshake.
    """
    der = ssl_object.getpeercert(binary_form=True)
    got = cert_sha256(der) if der else ""
    if not hmac.compare_digest(got.encode(), expected_sha256.lower().encode()):
        raise PinMismatch(
            "the server presented a TLS certificate that is not its job's "
            f"(sha256 {got[:16] or 'none'}…, the record says {expected_sha256[:16]}…)",
            hint=_HINT,
        )


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        check_peer(self, self.context.pinned_sha256)  # type: ignore[attr-defined]


class _PinnedObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake is done
        check_peer(self, self.context.pinned_sha256)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=256)
def pinned_context(sha256: str) -> ssl.SSLContext:
    """A client context that completes a handshake only with the certificate ``sha256``.

    TLS 1.2+, no CA or host name check (the pin replaces both). Cached per digest: clients
    that pool connections by context (aiohttp) reuse them.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.pinned_sha256 = sha256.lower()  # type: ignore[attr-defined]
    context.sslsocket_class = _PinnedSocket
    context.sslobject_class = _PinnedObject
    return context


def connection(url: str, sha256: str | None, timeout: float) -> http.client.HTTPConnection:
    """A stdlib connection to ``url``'s host: pinned when the record gives a ``sha256``."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if sha256:
        context = pinned_context(sha256)
        return http.client.HTTPSConnection(
            host, parts.port or 443, timeout=timeout, context=context
        )
    if parts.scheme == "https":
        return http.client.HTTPSConnection(host, parts.port or 443, timeout=timeout)
    return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)
