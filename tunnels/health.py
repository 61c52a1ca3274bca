"""End-to-end check: the gateway's ``/healthz`` answers through the tunnel."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from tunnels.base import TunnelSpec
from tunnels.errors import TunnelError


def check_healthz(spec: TunnelSpec, timeout_s: float = 10.0) -> None:
    """Wait for ``/healthz`` through the tunnel to answer 200; TunnelError otherwise."""
    url = f"{spec.url}/healthz"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1 only
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise TunnelError(
                f"the tunnel to {spec.host} is open, but {url} did not answer ({last})",
                local_port=spec.local_port,
                hint=f"is `mt gateway` running on {spec.host} on port {spec.remote_port}? "
                "(`--remote-port` names it; `--no-check` skips this check)",
            )
        time.sleep(0.2)
