"""The job's own TLS certificate: made at start, pinned by its SHA-256 in the record.

An EC P-256 key and a self-signed certificate, written 0600 into the job's 0700 directory
(hpc.job.jobdir) for the front's ``ssl.SSLContext``; the private key never leaves the node.
Clients trust it only by its digest (hpc.tlspin), so the names in it are for people
reading it, not for verification.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hpc.privatefile import write_private
from hpc.tlspin import cert_sha256

VALID_DAYS = 366  # longer than any job's time limit


@dataclass(frozen=True)
class JobCert:
    """The files of a job's certificate and the digest the record carries."""

    cert_path: Path
    key_path: Path
    sha256: str

    def server_context(self) -> ssl.SSLContext:
        """The front's server context: TLS 1.2+, this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def make_cert(directory: Path, common_name: str) -> JobCert:
    """A new key pair and self-signed certificate for ``common_name`` in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "mt-job")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .sign(key, hashes.SHA256())
    )
    key_path = directory / "front.key"
    cert_path = directory / "front.crt"
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return JobCert(cert_path, key_path, cert_sha256(cert.public_bytes(serialization.Encoding.DER)))
