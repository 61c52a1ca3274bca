"""A site network for tests: the jump host is the only way from the laptop to the login node.

Two Linux network namespaces joined by veth pairs (``ip`` from iproute2; needs root)::

    laptop (this process, the root namespace)
      └─ veth ── jump namespace (sshd on its outer address) ── veth ── login namespace
                                                                      (sshd, gateway, engine)

The root namespace has a route to the jump's outer link only, and namespaces do not
forward packets (``ip_forward`` is 0 in a new namespace), so a connection from the laptop
to the login node's address fails ("Network is unreachable") while the jump host reaches
it on its own link. Inside the login namespace 127.0.0.1 is the login node's own loopback:
the gateway and the engine run there, as they would on a real login node.

``cut()`` takes the jump's outer interface down from inside the jump namespace: the
laptop's side keeps its address and route but loses its carrier, so packets vanish without
a reset or an error (a link that silently stops), until ``restore()``. Names carry the
test process id and a random suffix, so parallel sessions do not collide; ``close()``
deletes both namespaces (and with them every veth).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

IP = "ip"


class NetnsError(RuntimeError):
    """The namespaces could not be made here."""


def _ip(*args: str, netns: str | None = None) -> str:
    argv = [IP, *(["netns", "exec", netns, IP] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """``None`` if namespaces can be made here, else why not."""
    if shutil.which(IP) is None:
        return "`ip` not found (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /29 in 10.0.0.0/8 that no interface here uses yet."""
    used = [
        ipaddress.ip_interface(word).network
        for line in _ip("-4", "-o", "addr").splitlines()
        for word in line.split()[3:4]
    ]
    rng = random.SystemRandom()
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{rng.randrange(64, 250)}.{rng.randrange(256)}.0/29")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("no free /29 in 10.64.0.0/10")


@dataclass
class JumpNetwork:
    """The laptop → jump → login network; build it with :meth:`create`."""

    jump_ns: str
    login_ns: str
    laptop_ip: str  # the root namespace's end of the outer link
    jump_ip: str  # the jump host as the laptop reaches it
    jump_inner_ip: str  # the jump host on the inner link
    login_ip: str  # the login node, reachable from the jump namespace only
    _jump_outer_if: str

    @classmethod
    def create(cls) -> JumpNetwork:
        """Make both namespaces and links; on any failure nothing is left behind."""
        reason = available()
        if reason is not None:
            raise NetnsError(reason)
        tag = f"{os.getpid() % 100000}{random.SystemRandom().randrange(36**2):02x}"
        jump_ns, login_ns = f"mt-jump-{tag}", f"mt-login-{tag}"
        hosts = [str(h) for h in _free_subnet().hosts()]  # .1-.2 and .5-.6: two /30 links
        laptop_ip, jump_ip, jump_inner_ip, login_ip = hosts[0], hosts[1], hosts[4], hosts[5]
        net = cls(jump_ns, login_ns, laptop_ip, jump_ip, jump_inner_ip, login_ip, f"mtjo{tag}")
        try:
            for ns in (jump_ns, login_ns):
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", netns=ns)
            # outer link: laptop (root namespace) <-> jump
            outer_root, outer_jump, inner_jump, inner_login = (
                f"mtlo{tag}",
                f"mtjo{tag}",
                f"mtji{tag}",
                f"mtli{tag}",
            )
            _ip("link", "add", outer_root, "type", "veth", "peer", "name", outer_jump)
            _ip("link", "set", outer_jump, "netns", jump_ns)
            _ip("addr", "add", f"{laptop_ip}/30", "dev", outer_root)
            _ip("link", "set", outer_root, "up")
            _ip("addr", "add", f"{jump_ip}/30", "dev", outer_jump, netns=jump_ns)
            _ip("link", "set", outer_jump, "up", netns=jump_ns)
            # inner link: jump <-> login (no route to it from the root namespace)
            _ip("link", "add", inner_jump, "netns", jump_ns, "type", "veth", "peer", "name",
                inner_login, "netns", login_ns)  # fmt: skip
            _ip("addr", "add", f"{jump_inner_ip}/30", "dev", inner_jump, netns=jump_ns)
            _ip("link", "set", inner_jump, "up", netns=jump_ns)
            _ip("addr", "add", f"{login_ip}/30", "dev", inner_login, netns=login_ns)
            _ip("link", "set", inner_login, "up", netns=login_ns)
        except BaseException:
            net.close()
            raise
        return net

    def inside(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return [IP, "netns", "exec", ns, *argv]

    def cut(self) -> None:
        """The laptop's link to the jump host stops passing packets (no reset, no error)."""
        _ip("link", "set", self._jump_outer_if, "down", netns=self.jump_ns)

    def restore(self) -> None:
        """The laptop's link to the jump host passes packets again."""
        _ip("link", "set", self._jump_outer_if, "up", netns=self.jump_ns)

    def close(self) -> None:
        """Delete both namespaces (their veths go with them); safe to call twice."""
        for ns in (self.jump_ns, self.login_ns):
            with contextlib.suppress(NetnsError):
                _ip("netns", "del", ns)
        with contextlib.suppress(NetnsError):  # the root end, if a namespace never got it
            _ip("link", "del", f"mtlo{self._jump_outer_if[4:]}")
