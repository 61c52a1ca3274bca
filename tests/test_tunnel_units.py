"""The tunnel's pure parts: the ssh command line, backoff bounds, engine choice."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hpc.errors import ChangedHostKeyError, MTError, SSHAuthError, SSHError
from tunnels.backoff import Backoff, permanent
from tunnels.engine import TunnelSpec, choose
from tunnels.openssh import destination, ssh_argv


def test_ssh_argv_forwards_loopback_only_and_checks_host_keys() -> None:
    spec = TunnelSpec(
        host="alice@login.example.org",
        local_port=8081,
        remote_port=9000,
        jump="bastion",
        identity=Path("/k/id ed25519"),
        known_hosts=Path("/k/known hosts"),
        ssh_config=Path("/k/config"),
    )
    argv = ssh_argv(spec, batch=True, control_path=Path("/tmp/mt-ssh-0/8081-%C"))
    assert argv == [
        "ssh", "-N", "-L", "127.0.0.1:8081:127.0.0.1:9000",
        "-F", "/k/config", "-i", "/k/id ed25519", "-J", "bastion",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
        "-o", "ControlMaster=auto", "-o", "ControlPath=/tmp/mt-ssh-0/8081-%C",
        "-o", "ControlPersist=no", "-o", "ExitOnForwardFailure=yes",
        "-o", "IdentitiesOnly=yes", "-o", "ServerAliveCountMax=3",
        "-o", "ServerAliveInterval=15", "-o", "StrictHostKeyChecking=yes",
        "-o", "UserKnownHostsFile=/k/known hosts",
        "--", "alice@login.example.org",
    ]  # fmt: skip
    accept = ssh_argv(
        TunnelSpec(host="login", accept_new=True), batch=False, control_path=Path("/c")
    )
    assert "StrictHostKeyChecking=accept-new" in accept
    assert "BatchMode=no" in accept
    assert not any(a.startswith(("IdentitiesOnly", "UserKnownHostsFile")) for a in accept)


def test_destination_with_a_port_is_an_ssh_uri() -> None:
    assert destination("login") == "login"
    assert destination("bob@login:2222") == "ssh://bob@login:2222"


def test_backoff_is_bounded_jittered_and_resets() -> None:
    # Seeded: above the cap half the draws are exactly max_s, so an unseeded run could by
    # chance repeat too many values for the "jittered" check below.
    backoff = Backoff(first_s=0.5, max_s=30, jitter=0.5, _rng=random.Random(7))  # noqa: S311
    delays = [backoff.next_s() for _ in range(20)]
    assert 0.25 <= delays[0] <= 0.75
    assert all(0 < d <= 30 for d in delays)
    assert max(delays[10:]) <= 30 and min(delays[10:]) >= 15
    assert len(set(delays)) > 10  # jittered
    backoff.reset()
    assert backoff.next_s() <= 0.75


def test_only_auth_and_host_key_failures_stop_reconnecting() -> None:
    auth = SSHAuthError("no", host="h", port=22, user="u", hint="")
    changed = ChangedHostKeyError(
        "no", host="h", port=22, fingerprint="SHA256:x", known_hosts=Path("k"), line=1, hint=""
    )
    assert permanent(auth) and permanent(changed)
    assert not permanent(SSHError("connection refused", host="h"))


def test_unknown_engine_lists_the_known_ones() -> None:
    with pytest.raises(MTError, match="unknown tunnel engine 'putty'") as caught:
        choose("putty")
    assert "openssh, paramiko" in (caught.value.hint or "")
    assert choose("paramiko") == "paramiko"
