"""Another user of the cluster against a job: reach, squatting, impostors (issue 15).

The attacker is a real second Unix user (tests/otheruser.py) with the standard library
only, as any user of a login or compute node could run. The jobs are real: the local
backend and the private Slurm cluster, with real llama.cpp (llama-cpp-python's server on its
Unix socket) behind the job's front.

What each test shows:
- every route the engine serves (its own /openapi.json, plus the routes vLLM and llama.cpp
  leave open) answers the other user 401 on the job's port, with no key or a wrong one;
  plain HTTP gets no answer at all; the engine's own address (a Unix socket in a 0700
  directory) cannot even be connected to; the engine holds no TCP listener;
- while a slow engine loads, the other user cannot take the job's port (the wrapper holds
  it from the start), and the front answers it 401 all the same;
- a record that points at another user's squatter (a port taken after a job ended, or a
  stale record) gets neither the job's key nor the prompt from the gateway;
- the owner's `mt gateway` (no --keys) answers the other user 401, with no key or a
  guessed one, and the owner key's file cannot be read by that user.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from jobclient import job_get
from mtcli import GEMMA, gemma_models_yaml, mt, owner_key, ready_job, running_gateway
from otheruser import PYTHON, OtherUser
from slurmcluster import SlurmCluster
from test_gateway_owner import _PROBE, status_of
from test_gateway_proxy import CHAT, JOB_KEY, add_record, chat, gateway

from hpc.job.jobdir import JobDir
from hpc.job.tlscert import make_cert
from hpc.ownerkey import owner_key_path
from hpc.registry import Record, Registry

pytestmark = pytest.mark.timeout(240)

# Routes vLLM and llama.cpp serve outside /v1, open on the engines themselves (TESTBED.md).
KNOWN_ROUTES = [
    ("GET", "/health"),
    ("GET", "/v1/health"),
    ("GET", "/metrics"),
    ("GET", "/version"),
    ("GET", "/ping"),
    ("GET", "/load"),
    ("GET", "/slots"),
    ("GET", "/props"),
    ("POST", "/invocations"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("POST", "/v1/load_lora_adapter"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
]

# llama-server's own routes besides the OpenAI ones (b11312): the other user gets 401 on each.
LLAMA_SERVER_ROUTES = [
    ("POST", "/completion"),
    ("POST", "/completions"),
    ("POST", "/embedding"),
    ("POST", "/infill"),
    ("POST", "/apply-template"),
    ("GET", "/lora-adapters"),
    ("POST", "/lora-adapters"),
    ("POST", "/slots/0?action=save"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/responses"),
    ("POST", "/rerank"),
]

# The attacker: every route on the job's port without a key and with a wrong one (TLS, no
# verification: it does not care whom it talks to), plain HTTP, and the engine's socket.
REACH = r"""
import json, socket, ssl, sys, http.client
host, port, sock_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
routes = json.loads(sys.argv[4])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
out = {"routes": [], "plain": None, "socket": None}
for method, path in routes:
    for headers in ({}, {"Authorization": "Bearer mtj-guessed"}):
        conn = http.client.HTTPSConnection(host, port, timeout=10, context=ctx)
        try:
            conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
            r = conn.getresponse()
            out["routes"].append([method, path, r.status, r.read(200).decode("latin-1")])
        except Exception as e:
            out["routes"].append([method, path, repr(e), ""])
        finally:
            conn.close()
try:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", "/health")
    out["plain"] = conn.getresponse().status
except Exception as e:
    out["plain"] = repr(e)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sock_path)
    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    out["socket"] = s.recv(100).decode("latin-1")
except Exception as e:
    out["socket"] = repr(e)
print(json.dumps(out))
"""

# The attacker who wants the job's port: bind it (loopback and every address).
SQUAT = r"""
import socket, sys
port = int(sys.argv[1])
for host in ("127.0.0.1", "0.0.0.0"):
    s = socket.socket()
    try:
        s.bind((host, port))
        s.listen(5)
        print("bound", host, flush=True)
    except OSError as e:
        print("refused", host, e.errno, flush=True)
"""

# The impostor: listens on a port of its own and logs, hex-encoded, every byte it receives
# (after a TLS handshake with a certificate of its own when given one).
IMPOSTOR = r"""
import socket, ssl, sys, threading
cert = sys.argv[1] if len(sys.argv) > 1 else ""
server = socket.create_server(("127.0.0.1", 0))
print("port", server.getsockname()[1], flush=True)
ctx = None
if cert:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert + "/front.crt", cert + "/front.key")
def serve(conn):
    try:
        if ctx is not None:
            conn = ctx.wrap_socket(conn, server_side=True)
        print("handshake", flush=True)
        conn.settimeout(5)
        while True:
            data = conn.recv(65536)
            if not data:
                break
            print("got", data.hex(), flush=True)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    except Exception as e:
        print("ended", repr(e), flush=True)
while True:
    conn, _ = server.accept()
    print("connection", flush=True)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def _stored(job: str) -> Record:
    record = Registry(Path(os.environ["MT_HOME"]) / "registry").read(job)
    assert record is not None, job
    return record


def _engine_socket(log: Path) -> str:
    """The engine's Unix socket, as the wrapper's "starting engine" line in the log says."""
    found = re.findall(r"(/\S+/engine\.sock)", log.read_text(encoding="utf-8", errors="replace"))
    assert found, log.read_text(encoding="utf-8", errors="replace")
    return found[0]


def _openapi_routes(record: Record) -> list[tuple[str, str]]:
    """Every (method, path) the engine's own /openapi.json lists, asked as the owner."""
    status, body = job_get(record, "/openapi.json", record.api_key.get_secret_value())
    assert status == 200, body
    routes = []
    for path, methods in json.loads(body)["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        routes += [(m.upper(), concrete) for m in methods if m in ("get", "post", "put", "delete")]
    assert ("POST", "/v1/chat/completions") in routes, routes
    return routes


def engine_listeners(pid: int) -> list[Any]:
    """TCP sockets listening in the engine's process tree on the node's network: what
    another user could connect to. (An engine in its own namespace: :func:`private_ports`.)"""
    found = []
    root = psutil.Process(pid)
    ours = os.readlink("/proc/self/ns/net")
    for proc in [root, *root.children(recursive=True)]:
        if os.readlink(f"/proc/{proc.pid}/ns/net") == ours:
            listening = proc.net_connections(kind="inet")
            found += [c for c in listening if c.status == psutil.CONN_LISTEN]
    return found


def private_ports(pid: int) -> list[int]:
    """TCP ports listening in the network namespace of ``pid`` (hpc.job.netns gave the
    engine one of its own: everything there is the engine's). Empty if it shares ours."""
    if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        return []
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text(encoding="ascii").splitlines()[1:]
        for fields in (line.split() for line in lines):
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def check_reach(
    other: OtherUser,
    record: Record,
    log: Path,
    routes: list[tuple[str, str]] | None = None,
) -> None:
    """The other user against a ready job: 401 everywhere, nothing else (module doc).

    ``routes``: what to try; by default KNOWN_ROUTES and the engine's own: llama-server's
    (LLAMA_SERVER_ROUTES), or those llama-cpp-python's /openapi.json lists."""
    assert record.state == "ready" and record.port is not None and record.engine_pid
    if routes is None:
        argv = psutil.Process(record.engine_pid).cmdline()
        own = LLAMA_SERVER_ROUTES if Path(argv[0]).name == "llama-server" else None
        routes = sorted(set(own or _openapi_routes(record)) | set(KNOWN_ROUTES))
    host = "127.0.0.1"
    result = other.python(REACH, host, str(record.port), _engine_socket(log), json.dumps(routes))
    assert result.rc == 0, result.stderr
    seen = json.loads(result.stdout)
    assert len(seen["routes"]) == 2 * len(routes)
    answered = [r for r in seen["routes"] if r[2] != 401]
    assert answered == [], answered
    assert all("invalid_api_key" in r[3] for r in seen["routes"] if r[0] != "HEAD")
    assert not isinstance(seen["plain"], int), seen["plain"]  # plain HTTP: no answer at all
    assert "PermissionError" in seen["socket"], seen["socket"]
    assert engine_listeners(record.engine_pid) == []  # the engine listens on no TCP port


def test_another_user_reaches_nothing_of_a_local_job(
    other_user: OtherUser, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    with ready_job(GEMMA) as submitted:
        job = str(submitted["key"])
        log = Path(os.environ["MT_HOME"]) / "logs" / f"{job}.log"
        check_reach(other_user, _stored(job), log)


@pytest.mark.slurm
def test_another_user_reaches_nothing_of_a_slurm_job(
    other_user: OtherUser,
    cluster: SlurmCluster,
    gemma_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    out = mt("submit", GEMMA, "--backend", "slurm", "--wait", "--json", "--timeout", "180")
    submitted = json.loads(out.stdout)
    job, job_id = submitted["key"], submitted["job_id"]
    try:
        assert submitted["state"] == "ready", submitted
        [log] = sorted((Path(os.environ["MT_HOME"]) / "logs").glob(f"*-{job_id}.log"))
        check_reach(other_user, _stored(job), log)
    finally:
        mt("cancel", job, check=False)


# -- squatting and impostors ------------------------------------------------------------

_SLOW_SHIM = """#!{python}
# llama-server standing in for a model that takes forever to load (tests/fake_engine.py).
import os, sys
args = sys.argv[1:]
argv = [{python!r}, "-u", {engine!r}, "serve", "--host", args[args.index("--host") + 1]]
os.execv(argv[0], argv + ["--mode", "never"])
"""


@pytest.fixture
def slow_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A llama.cpp model whose (fake) llama-server loads forever; its name."""
    gguf = tmp_path / "slow-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "llama-server"
    engine = str(Path(__file__).with_name("fake_engine.py").resolve())
    shim.write_text(_SLOW_SHIM.format(python=sys.executable, engine=engine), encoding="utf-8")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  - name: slow\n    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gguf))}}}\n    startup_timeout_s: 120\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MT_MODELS", str(models))
    return "slow"


def _wait_for_port(job: str) -> Record:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = _stored(job)
        if record.port is not None and record.state == "starting":
            return record
        time.sleep(0.1)
    raise AssertionError(f"the job never held a port: {_stored(job)!r}")


def test_while_the_engine_loads_another_user_cannot_take_the_jobs_port(
    other_user: OtherUser, slow_model: str
) -> None:
    job = json.loads(mt("submit", slow_model, "--json").stdout)["key"]
    try:
        record = _wait_for_port(job)
        assert record.port is not None
        squat = other_user.python(SQUAT, str(record.port))
        assert squat.rc == 0, squat.stderr
        assert "bound" not in squat.stdout, squat.stdout
        assert squat.stdout.count("refused") == 2, squat.stdout  # EADDRINUSE, both
        # The front answers while the engine loads: 401 to the other user, as ever.
        log = Path(os.environ["MT_HOME"]) / "logs" / f"{job}.log"
        routes = json.dumps([["GET", "/health"], ["POST", "/v1/chat/completions"]])
        result = other_user.python(
            REACH, "127.0.0.1", str(record.port), _engine_socket(log), routes
        )
        seen = json.loads(result.stdout)
        assert [r[2] for r in seen["routes"]] == [401] * 4, seen
        assert _stored(job).state == "starting"  # never ready, never anyone else's address
    finally:
        mt("cancel", job, check=False)


@pytest.fixture(params=["tls", "tcp"])
def impostor_cert(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A directory with the impostor's own certificate ("tls"), readable by the other user;
    "" for an impostor that only listens and logs ("tcp")."""
    if request.param == "tcp":
        yield ""
        return
    folder = Path(tempfile.mkdtemp(prefix="mt-impostor-"))
    make_cert(folder, "impostor")
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    yield str(folder)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


async def test_the_gateway_sends_another_users_impostor_neither_key_nor_prompt(
    other_user: OtherUser, tmp_path: Path, impostor_cert: str
) -> None:
    prompt = "a-prompt-only-the-job-may-read"
    args = (impostor_cert,) if impostor_cert else ()
    with other_user.spawn(IMPOSTOR, *args) as impostor:
        port = int(re.findall(r"port (\d+)", impostor.wait_for("port "))[0])
        # A ready record whose port the impostor holds: the job's certificate is not its.
        job_cert = make_cert(tmp_path, "the job")
        url = f"https://127.0.0.1:{port}/v1"
        add_record(tmp_path / "registry", "m", url, tls_sha256=job_cert.sha256)
        body = chat("m", stream=True)
        body["messages"][0]["content"] = prompt
        async with gateway(tmp_path, health_interval_s=0.2) as gateway_url:
            async with aiohttp.ClientSession() as client:
                for _ in range(3):
                    async with client.post(gateway_url + CHAT, json=body) as resp:
                        assert resp.status in (502, 503), await resp.text()
            await asyncio.sleep(0.6)  # health probes too
        seen = impostor.output()
    assert "connection" in seen  # the gateway did connect, and stopped at the handshake
    received = bytes.fromhex("".join(re.findall(r"got ([0-9a-f]+)", seen)))
    assert JOB_KEY.encode() not in received
    assert prompt.encode() not in received
    if impostor_cert:
        assert received == b"", received  # not one byte after the handshake
    else:
        assert b"POST" not in received and b"Authorization" not in received


def test_the_other_user_cannot_connect_to_a_socket_in_a_private_directory(
    other_user: OtherUser,
) -> None:
    """The premise of the engine's address: a 0700 directory shuts a 0777 socket."""
    home = JobDir()
    try:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(home.socket_path()))
        os.chmod(home.socket_path(), 0o777)  # noqa: S103 - as uvicorn makes it (0666), and worse
        server.listen(1)
        code = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])"
        result = other_user.python(code, str(home.socket_path()))
        assert result.rc != 0 and "PermissionError" in result.stderr, result
        server.close()
    finally:
        home.remove()


def test_the_owners_gateway_answers_another_user_401(other_user: OtherUser) -> None:
    with running_gateway() as url:
        for guess in ("", "mt-" + "A" * 43):  # no key; a key of the right shape
            probe = other_user.run(
                [PYTHON, "-I", "-c", _PROBE, f"{url}/v1/models"], input_text=guess
            )
            assert probe.rc == 0 and probe.stdout.strip() == "401", probe
        key_file = owner_key_path(Path(os.environ["MT_HOME"]))
        code = "import sys\nopen(sys.argv[1]).read()"
        read = other_user.python(code, str(key_file))
        assert read.rc != 0 and "PermissionError" in read.stderr, read
        assert status_of(f"{url}/v1/models", owner_key()) == 200  # the owner, all the same
