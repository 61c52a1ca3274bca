"""`mt tunnel` through a jump host that is the only way in (tests/netns.py): both engines.

The laptop is this process; the jump host is a real sshd in its own network namespace;
the login node is a real sshd, the real `mt gateway` and (for the end-to-end test) the real
Gemma engine in another namespace that only the jump host reaches. The ssh config names
the hosts and nothing else: the key and the known_hosts file come from `--identity` and
`--known-hosts`, so a tunnel that works proves both reached the jump hop too.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mtcli import GEMMA, gemma_models_yaml, mt, running_gateway
from netns import JumpNetwork, NetnsError, available
from realparts import missing_part
from sshd import SSHServer
from tunnelkit import get, open_tunnel, run_tunnel

from hpc.ownerkey import owner_key_path

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180), pytest.mark.usefixtures("no_agent")]

ENGINES = ["openssh", "paramiko"]


@dataclass
class Site:
    net: JumpNetwork
    jump: SSHServer
    login: SSHServer
    key: Path  # logs in on both hosts
    known: Path  # both host keys
    config: Path  # `Host login` and `Host bastion`: names, addresses, ports only
    gateway_port: int  # `mt gateway` on the login node's own 127.0.0.1
    mt_home: Path

    def flags(self, known: Path | None = None) -> list[str]:
        return ["--jump", "bastion", "--identity", str(self.key),
                "--known-hosts", str(known or self.known)]  # fmt: skip


@pytest.fixture(scope="module")
def site(sshd: SSHServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The network, both sshd and the gateway (``sshd`` first: it skips or fails alike)."""
    reason = available()
    if reason is not None:
        missing_part("ssh", reason)
    root = tmp_path_factory.mktemp("jump-site")
    try:
        net = JumpNetwork.create()
    except NetnsError as exc:
        pytest.fail(f"could not build the test network: {exc}")
    servers: list[SSHServer] = []
    try:
        jump = SSHServer.start(root / "jump", address=net.jump_ip, netns=net.jump_ns)
        servers.append(jump)
        login = SSHServer.start(root / "login", address=net.login_ip, netns=net.login_ns)
        servers.append(login)
        with (jump.root / "authorized_keys").open("a") as keys:
            keys.write((login.root / "client_key.pub").read_text())  # one key, both hops
        known = root / "known_hosts"
        known.write_text(jump.known_hosts_line() + login.known_hosts_line())
        config = root / "ssh_config"
        config.write_text(
            f"Host login\n    HostName {net.login_ip}\n    Port {login.port}\n"
            f"    User {login.user}\n"
            f"Host bastion\n    HostName {net.jump_ip}\n    Port {jump.port}\n"
            f"    User {jump.user}\n"
            "Host *\n    GlobalKnownHostsFile /dev/null\n"
        )
        mt_home = root / "login-mt-home"
        with contextlib.ExitStack() as stack:
            with pytest.MonkeyPatch.context() as env:  # the gateway's own environment
                env.setenv("MT_HOME", str(mt_home))
                url = stack.enter_context(running_gateway(prefix=net.inside(net.login_ns, [])))
            port = int(url.rsplit(":", 1)[1])
            yield Site(net, jump, login, login.client_key, known, config, port, mt_home)
    finally:
        for server in servers:
            server.stop()
        net.close()


def test_only_the_jump_host_reaches_the_login_node(site: Site) -> None:
    with pytest.raises(OSError):
        socket.create_connection((site.net.login_ip, site.login.port), timeout=5).close()
    socket.create_connection((site.net.jump_ip, site.jump.port), timeout=5).close()


def _state(local_port: int) -> tuple[str, int]:
    """The tunnel's state and reconnect count, as `mt tunnel status --json` reports them."""
    listed = json.loads(mt("tunnel", "status", "--json").stdout)
    (record,) = [r for r in listed if r["local_port"] == local_port]
    return record["state"], record["reconnects"]


def _wait_for(what: str, ok: object, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ENGINES)
def test_openai_client_streams_laptop_jump_login_gateway_engine(
    engine: str, site: Site, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    monkeypatch.setenv("MT_HOME", str(site.mt_home))  # the login node's registry
    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    on_login = site.net.inside(site.net.login_ns, [])
    job = json.loads(mt("submit", GEMMA, "--wait", "--json", prefix=on_login).stdout)["key"]
    try:
        monkeypatch.setenv("MT_HOME", str(tmp_path / "laptop-mt-home"))
        jumps, logins = site.jump.logins(), site.login.logins()
        owner_key = ("--owner-key", str(owner_key_path(site.mt_home)))  # the login node's
        with open_tunnel(
            engine, site.config, site.gateway_port, *site.flags(), *owner_key
        ) as tunnel:
            assert (site.jump.logins(), site.login.logins()) == (jumps + 1, logins + 1)
            models = f"{tunnel.url}/v1/models"
            key = tunnel.env()["OPENAI_API_KEY"]  # read over the tunnel's SSH connection
            _wait_for("the gateway to list Gemma", lambda: GEMMA in get(models, key=key)[1], 30)
            client = openai.OpenAI(
                base_url=tunnel.env()["OPENAI_BASE_URL"], api_key=key, max_retries=0
            )
            stream = client.chat.completions.create(
                model=GEMMA,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24,
                temperature=0,
                stream=True,
            )
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            assert len([p for p in pieces if p]) > 1, pieces  # streamed in several chunks
            assert "".join(pieces).strip()
    finally:
        monkeypatch.setenv("MT_HOME", str(site.mt_home))
        mt("cancel", job, "--json", prefix=on_login)


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_jump_host_key_is_refused_with_its_fingerprint(
    engine: str, site: Site, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(site.login.known_hosts_line())  # the login node's key only
    before = site.jump.logins()
    done = run_tunnel(engine, site.config, site.gateway_port, *site.flags(known))
    assert done.returncode == 1, done.stderr
    assert "is not a known host" in done.stderr, done.stderr
    assert site.jump.host_fingerprint() in done.stderr
    assert "Traceback" not in done.stderr
    assert known.read_text() == site.login.known_hosts_line()
    assert site.jump.logins() == before


@pytest.mark.parametrize("engine", ENGINES)
def test_silent_link_drop_is_noticed_fails_fast_and_reconnects(engine: str, site: Site) -> None:
    with open_tunnel(engine, site.config, site.gateway_port, *site.flags()) as tunnel:
        assert get(f"{tunnel.url}/healthz")[0] == 200
        assert _state(tunnel.local_port) == ("up", 0)
        site.net.cut()  # packets vanish: no reset, no error, the TCP connection stays open
        try:
            # --keepalive 1: three unanswered keepalives and the tunnel knows.
            _wait_for("the tunnel to notice", lambda: _state(tunnel.local_port)[0] == "down", 30)
            # Sampled across the backoff and into a reconnect attempt (which waits on the
            # dead link): every request is answered 503 at once, none hangs or is refused.
            for _ in range(20):
                status, body = get(f"{tunnel.url}/v1/models", timeout_s=10)
                assert status == 503, body
                assert "the SSH tunnel to login is down" in json.loads(body)["error"]["message"]
                time.sleep(0.25)
        finally:
            site.net.restore()
        _wait_for("the tunnel to be back", lambda: _state(tunnel.local_port) == ("up", 1), 90)
        assert get(f"{tunnel.url}/healthz")[0] == 200
