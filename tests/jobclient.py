"""Clients straight to a job's front (no gateway), its certificate pinned as its record says.

Tests that talk to a job directly use these, the way the gateway does: the real ``openai``
client over ``httpx`` with ``hpc.tlspin``'s pinned context, or ``http.client``.
"""

from __future__ import annotations

from typing import Any

from hpc import tlspin
from hpc.registry import Record


def pinned_openai(base_url: str, pin: str, api_key: str, **options: Any) -> Any:
    """An ``openai.OpenAI`` client for a job's ``base_url`` whose certificate is ``pin``."""
    import openai

    http_client = openai.DefaultHttpxClient(verify=tlspin.pinned_context(pin))
    options.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=base_url, api_key=api_key, http_client=http_client, **options)


def job_openai(record: Record, api_key: str | None = None, **options: Any) -> Any:
    """An ``openai.OpenAI`` client for the job of ``record`` (its own key unless given)."""
    assert record.base_url is not None and record.tls_sha256 is not None, record
    key = api_key if api_key is not None else record.api_key.get_secret_value()
    return pinned_openai(record.base_url, record.tls_sha256, key, **options)


def job_get(record: Record, path: str, key: str | None) -> tuple[int, bytes]:
    """``GET path`` from the job's front with ``key`` (None: no Authorization header)."""
    assert record.base_url is not None
    conn = tlspin.connection(record.base_url, record.tls_sha256, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
