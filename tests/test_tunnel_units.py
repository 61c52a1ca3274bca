"""The tunnel's pure parts: the ssh command line, backoff bounds, engine choice."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from mtcli import mt

from hpc.errors import ChangedHostKeyError, MTError, SSHAuthError, SSHError
from tunnels.backoff import Backoff, permanent
from tunnels.base import TunnelSpec
from tunnels.engines import choose
from tunnels.sshcommand import destination, forward_argv, ssh_argv, ssh_config_text


def test_ssh_logs_in_as_a_master_then_forwards_loopback_only() -> None:
    spec = TunnelSpec(host="alice@login:2222", local_port=8081, remote_port=9000, jump="bastion")
    config, control = Path("/s/8081.ssh_config"), Path("/s/8081.ctl")
    assert ssh_argv(spec, config=config, control_path=control) == [
        "ssh", "-F", "/s/8081.ssh_config", "-N", "-J", "bastion",
        "-o", "ControlMaster=yes", "-o", "ControlPath=/s/8081.ctl", "-o", "ControlPersist=no",
        "--", "ssh://alice@login:2222",
    ]  # fmt: skip
    assert forward_argv(spec, config=config, control_path=control) == [
        "ssh", "-F", "/s/8081.ssh_config", "-S", "/s/8081.ctl", "-O", "forward",
        "-L", "127.0.0.1:8081:127.0.0.1:9000", "--", "ssh://alice@login:2222",
    ]  # fmt: skip


def test_ssh_config_checks_every_hop_and_names_the_flags_keys() -> None:
    spec = TunnelSpec(
        host="login",
        jump="bastion",
        identity=Path("/k/id ed25519"),
        known_hosts=Path("/k/known 100%"),
    )
    text = ssh_config_text(spec, batch=True, includes=[Path("/home/a/.ssh/config")])
    assert text == (
        "# Written by `mt tunnel` for this tunnel only; rewritten on every start.\n"
        "Host *\n"
        "    BatchMode yes\n"
        "    ConnectTimeout 15\n"
        "    IdentitiesOnly yes\n"
        '    IdentityFile "/k/id ed25519"\n'
        "    NumberOfPasswordPrompts 1\n"
        "    ServerAliveCountMax 3\n"
        "    ServerAliveInterval 15\n"
        "    StrictHostKeyChecking yes\n"
        '    UserKnownHostsFile "/k/known 100%%"\n'
        'Include "/home/a/.ssh/config"\n'
    )
    accept = ssh_config_text(TunnelSpec(host="login", accept_new=True), batch=False, includes=[])
    assert "    StrictHostKeyChecking accept-new\n" in accept
    assert "    BatchMode no\n" in accept
    assert "IdentityFile" not in accept and "UserKnownHostsFile" not in accept
    with pytest.raises(MTError, match="--identity") as caught:
        ssh_config_text(TunnelSpec(host="login", identity=Path('/k/"x"')), batch=True, includes=[])
    assert caught.value.hint


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


def _words(text: str) -> str:
    """Help text without rich's boxes and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_tunnel_help_names_the_host_shorthand_and_where_its_options_are() -> None:
    shown = _words(mt("tunnel", "--help").stdout)
    assert "Usage: mt tunnel HOST [OPTIONS] | COMMAND [ARGS]..." in shown
    assert "`mt tunnel HOST [OPTIONS]` is `mt tunnel open HOST [OPTIONS]`" in shown
    assert "[user@]host[:port]" in shown
    assert "listed by `mt tunnel open --help`" in shown
    # The shorthand really is `open`: its options are parsed (and checked) by `open`.
    done = mt("tunnel", "login.example", "--local-port", "0", check=False)
    assert done.returncode == 2
    assert "mt tunnel open" in done.stderr and "--local-port" in done.stderr
