"""Stand-ins for Ray's ``ray`` command and for multi-node ``vllm serve``: Ray and vLLM across
nodes cannot run here (no GPUs; vLLM's CPU build runs no Ray pipeline over nodes).

Run as ``python fakeray.py ray ARGS`` or ``python fakeray.py vllm ARGS`` (tests put two shims
named ``ray`` and ``vllm`` on the job's PATH). What they keep of the real protocol:

* ``ray start --head --node-ip-address=A --port=P --block``: listens on A:P (TCP) and counts
  itself as a node, like Ray's head (GCS);
* ``ray start --address=A:P --block``: a worker joins the head and stays joined while its
  connection lasts (it blocks in the foreground, like ``--block``);
* ``ray status --address=A:P``: the head answers in the real ``ray status`` text format (an
  ``Active:`` section with one `` 1 node_<id>`` line per live node, then ``Pending:``);
* token authentication as Ray's ``RAY_AUTH_MODE=token``: every request carries
  ``RAY_AUTH_TOKEN`` from the environment and the head refuses a wrong or missing one;
* ``vllm serve … --uds PATH``: connects to ``RAY_ADDRESS`` with the token, records how
  many nodes had joined when it started, then serves the OpenAI API on the socket
  (bench.fakeengine, with ``VLLM_API_KEY`` as its key).

Every process appends one JSON line to ``$FAKE_RAY_LOG``: its role, ``SLURMD_NODENAME``,
``SLURM_NODEID``, ``SLURM_STEP_ID``, ``CUDA_VISIBLE_DEVICES``, hostname, pid and argv, so a
test sees what ran on which node.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import sys
import threading
import uuid
from typing import Any


def _log(role: str, **extra: Any) -> None:
    path = os.environ.get("FAKE_RAY_LOG")
    if not path:
        return
    entry = {
        "role": role,
        "node": os.environ.get("SLURMD_NODENAME"),
        "node_id": os.environ.get("SLURM_NODEID"),  # relative to the job step
        "step": os.environ.get("SLURM_STEP_ID"),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        **extra,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _opt(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _token() -> str:
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return ""
    return os.environ.get("RAY_AUTH_TOKEN", "")


def _status_text(nodes: list[str]) -> str:
    active = "\n".join(f" 1 node_{n}" for n in nodes)
    return (
        "======== Autoscaler status: stand-in ========\n"
        "Node status\n"
        "---------------------------------------------------------------\n"
        f"Active:\n{active}\nPending:\n (no pending nodes)\nRecent failures:\n (no failures)\n"
    )


def _head(args: list[str]) -> int:
    address = _opt(args, "--node-ip-address") or "127.0.0.1"
    port = int(_opt(args, "--port") or "6379")
    token = _token()
    members = {uuid.uuid4().hex: "head"}
    lock = threading.Lock()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            words = self.rfile.readline().decode().split(" ", 2)
            if len(words) < 2 or words[1].strip() != token:
                self.wfile.write(b"DENIED\n")
                return
            if words[0] == "STATUS":
                with lock:
                    self.wfile.write(_status_text(list(members)).encode())
                return
            if words[0] == "JOIN":
                node = uuid.uuid4().hex
                with lock:
                    members[node] = words[2].strip() if len(words) > 2 else ""
                self.wfile.write(b"JOINED\n")
                self.wfile.flush()
                self.rfile.read()  # joined while the worker's connection lasts
                with lock:
                    del members[node]

    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer((address, port), Handler) as server:
        _log("head", address=address, port=port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # INT: how the job wrapper stops the head
            return 0
    return 0


def _ask(address: str, line: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(line.encode() + b"\n")
    return sock


def _worker(args: list[str]) -> int:
    address = _opt(args, "--address") or ""
    sock = _ask(address, f"JOIN {_token()} {os.environ.get('SLURMD_NODENAME', '?')}")
    reply = sock.makefile("rb").readline().decode().strip()
    _log("worker", address=address, reply=reply)
    if reply != "JOINED":
        print(f"fake ray: the head refused this worker: {reply}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    sock.recv(1)  # --block: until the head goes (or TERM ends this process)
    return 0


def _status(args: list[str]) -> int:
    address = _opt(args, "--address") or os.environ.get("RAY_ADDRESS", "")
    try:
        sock = _ask(address, f"STATUS {_token()}")
    except OSError as exc:
        print(f"fake ray: cannot reach {address}: {exc}", file=sys.stderr)
        return 1
    text = sock.makefile("rb").read().decode()
    if text.startswith("DENIED"):
        print("fake ray: unauthenticated", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def ray(args: list[str]) -> int:
    """``ray start --head``, ``ray start --address``, ``ray status``."""
    if args[:1] == ["status"]:
        return _status(args[1:])
    if args[:1] == ["start"] and "--head" in args:
        return _head(args[1:])
    if args[:1] == ["start"]:
        return _worker(args[1:])
    print(f"fake ray: unsupported: {args}", file=sys.stderr)
    return 2


def vllm(args: list[str]) -> int:
    """``vllm serve SOURCE --uds PATH --served-model-name NAME …`` after Ray's nodes joined."""
    address = os.environ.get("RAY_ADDRESS", "")
    text = _ask(address, f"STATUS {_token()}").makefile("rb").read().decode()
    nodes = text.count(" 1 node_")
    _log("vllm", nodes_at_start=nodes)
    uds = args[args.index("--uds") + 1]
    name = args[args.index("--served-model-name") + 1]
    env = {**os.environ, "MT_FAKE_ENGINE_KEY": os.environ.get("VLLM_API_KEY", "")}
    os.execve(  # noqa: S606 - the engine stand-in, as vllm serve would run in place
        sys.executable,
        [sys.executable, "-m", "bench.fakeengine", "--uds", uds, "--model", name],
        env,
    )
    return 1  # not reached


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit(ray(rest) if command == "ray" else vllm(rest[1:] if rest[:1] == ["serve"] else rest))
