"""The job's front (hpc.job.front) and the gateway pinning it (hpc.tlspin), in one process.

Real parts: the front on a real TCP port with TLS, ``bench.fakeengine`` (the wire format of
vLLM / llama.cpp) on a Unix socket in a real 0700 directory behind it, the real gateway in
front, and impostors that are real TLS or TCP servers logging every byte they receive.
Cross-user reach (a second Unix user) is in tests/test_crossuser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from test_gateway_proxy import CHAT, JOB_KEY, add_record, chat, gateway

from bench.fakeengine import FakeUpstream, Knobs
from hpc import tlspin
from hpc.job.front import Front, RoutePolicy, bind_node_port
from hpc.job.jobdir import JobDir
from hpc.job.tlscert import make_cert

pytestmark = pytest.mark.timeout(60)

ENGINE_KEY = "mtj-the-engines-own-key"
PROMPT_MARK = "prompt-that-must-not-leak"


@contextlib.asynccontextmanager
async def front_and_engine(
    tmp_path: Path, knobs: Knobs | None = None, exposed: tuple[str, ...] = ()
) -> AsyncIterator[tuple[Front, str, FakeUpstream]]:
    """A front on 127.0.0.1 with the fake engine behind it; yields (front, its sha, engine)."""
    home = JobDir()
    try:
        async with FakeUpstream(knobs, uds=str(home.socket_path())) as engine:
            cert = make_cert(home.path, "test job")
            front = Front(
                bind_node_port("127.0.0.1"),
                home.socket_path(),
                key=JOB_KEY,
                engine_key=ENGINE_KEY,
                tls=cert.server_context(),
                policy=RoutePolicy(exposed),
                quiet_paths=frozenset({"/health"}),
            )
            await asyncio.to_thread(front.start)
            try:
                yield front, cert.sha256, engine
            finally:
                await asyncio.to_thread(front.stop)
    finally:
        home.remove()


def _request(
    port: int, sha: str, method: str, path: str, headers: dict[str, str], body: bytes | None
) -> tuple[int, bytes]:
    conn = tlspin.connection(f"https://127.0.0.1:{port}", sha, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# Engine routes a second user must never reach without the key (vLLM's and llama-server's).
ROUTES = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/invocations"),
    ("POST", "/tokenize"),
    ("GET", "/load"),
    ("POST", "/sleep"),
    ("GET", "/version"),
    ("GET", "/openapi.json"),
    ("GET", "/slots"),
    ("HEAD", "/health"),
    ("GET", "/../../etc/passwd"),
    ("POST", "/v2/models/m/infer"),
]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": JOB_KEY}])
async def test_every_route_without_the_jobs_key_is_401_and_never_reaches_the_engine(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    async with front_and_engine(tmp_path) as (front, sha, engine):
        for method, path in ROUTES:
            status, _ = await asyncio.to_thread(
                _request,
                front.port,
                sha,
                method,
                path,
                headers,
                b"{}" if method == "POST" else None,
            )
            assert status == 401, (method, path)
        assert engine.seen.requests == 0
        assert engine.seen.probe_authorization == []


async def test_with_the_key_only_the_engines_client_routes_pass_unless_exposed(
    tmp_path: Path,
) -> None:
    key = {"Authorization": f"Bearer {JOB_KEY}"}
    async with front_and_engine(tmp_path) as (front, sha, _engine):
        for method, path in [("POST", "/invocations"), ("GET", "/load"), ("POST", "/sleep")]:
            status, body = await asyncio.to_thread(
                _request, front.port, sha, method, path, key, b"{}"
            )
            assert status == 403, (path, body)
            assert json.loads(body)["error"]["code"] == "route_not_exposed"
        status, _ = await asyncio.to_thread(
            _request, front.port, sha, "POST", "/v1/load_lora_adapter", key, b"{}"
        )
        assert status == 403
        status, body = await asyncio.to_thread(
            _request, front.port, sha, "GET", "/v1/models", key, None
        )
        assert status == 200, body
    async with front_and_engine(tmp_path, exposed=("/invocations",)) as (front, sha, _engine):
        # Exposed: the front passes it (the fake engine has no such route: its 404 comes back).
        status, _ = await asyncio.to_thread(
            _request, front.port, sha, "POST", "/invocations", key, b"{}"
        )
        assert status == 404


def test_route_policy() -> None:
    policy = RoutePolicy()
    assert policy.allows("POST", "/v1/chat/completions")
    assert policy.allows("POST", "/v1/messages")
    assert policy.allows("GET", "/health") and policy.allows("HEAD", "/health")
    assert not policy.allows("POST", "/health")
    assert not policy.allows("POST", "/invocations")
    assert not policy.allows("POST", "/v1/load_lora_adapter")
    assert not policy.allows("POST", "/slots/0")  # llama-server's slot save/restore
    assert RoutePolicy(("/v2/*",)).allows("POST", "/v2/models/m/infer")


async def test_the_engine_gets_its_own_key_never_the_jobs(tmp_path: Path) -> None:
    async with front_and_engine(tmp_path) as (front, sha, engine):
        url = f"https://127.0.0.1:{front.port}/v1"
        add_record(tmp_path / "registry", "m", url, tls_sha256=sha)
        async with (
            gateway(tmp_path) as gateway_url,
            aiohttp.ClientSession() as client,
            client.post(gateway_url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 200
            data = await resp.read()
        assert b"[DONE]" in data
        assert engine.seen.authorization
        assert set(engine.seen.authorization) == {f"Bearer {ENGINE_KEY}"}


async def test_a_stream_is_relayed_piece_by_piece_and_counted_in_flight(tmp_path: Path) -> None:
    knobs = Knobs(tokens=20, tokens_per_s=40)
    async with front_and_engine(tmp_path, knobs) as (front, sha, _engine):
        assert front.count() == 0
        conn = tlspin.connection(f"https://127.0.0.1:{front.port}", sha, timeout=10)
        body = json.dumps(chat("m", stream=True))
        headers = {"Authorization": f"Bearer {JOB_KEY}", "Content-Type": "application/json"}
        await asyncio.to_thread(conn.request, "POST", CHAT, body, headers)
        response = await asyncio.to_thread(conn.getresponse)
        first = await asyncio.to_thread(response.readline)
        assert first.startswith(b"data: ")  # the first event came before the answer ended
        assert front.count() == 1
        rest = await asyncio.to_thread(response.read)
        assert rest.rstrip().endswith(b"data: [DONE]")
        conn.close()
        for _ in range(50):
            if front.count() == 0:
                break
            await asyncio.sleep(0.02)
        assert front.count() == 0
        # The health path is quiet: a probe is never a request in flight.
        status, _ = await asyncio.to_thread(
            _request,
            front.port,
            sha,
            "GET",
            "/health",
            {"Authorization": f"Bearer {JOB_KEY}"},
            None,
        )
        assert status == 200 and front.count() == 0


async def test_an_engine_that_breaks_off_breaks_the_answer_off_too(tmp_path: Path) -> None:
    """Never a clean end for a cut answer: the client must see a broken body."""
    async with front_and_engine(tmp_path, Knobs(tokens=50, cut_after=3)) as (front, sha, _e):
        conn = tlspin.connection(f"https://127.0.0.1:{front.port}", sha, timeout=10)
        body = json.dumps(chat("m", stream=True))
        headers = {"Authorization": f"Bearer {JOB_KEY}", "Content-Type": "application/json"}
        await asyncio.to_thread(conn.request, "POST", CHAT, body, headers)
        response = await asyncio.to_thread(conn.getresponse)
        with pytest.raises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            await asyncio.to_thread(response.read)
        conn.close()


# -- impostors --------------------------------------------------------------------------


class Impostor:
    """A port squatter: listens where a job's record points and logs every byte it gets.

    ``tls=True``: it speaks TLS with a certificate of its own (what a squatter who wants
    the plaintext would do), so what it logs is what a client sent after the handshake.
    """

    def __init__(self, tmp_path: Path, *, tls: bool) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received = bytearray()
        self.connections = 0
        self._context: ssl.SSLContext | None = None
        if tls:
            self._context = make_cert(tmp_path, "impostor").server_context()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            if self._context is not None:
                conn = self._context.wrap_socket(conn, server_side=True)
            conn.settimeout(5)
            while data := conn.recv(65536):
                self.received += data
                if self._context is not None:  # answer like an engine, to tempt the client
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=[True, False], ids=["tls-impostor", "tcp-impostor"])
def impostor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Impostor]:
    squatter = Impostor(tmp_path, tls=request.param)
    yield squatter
    squatter.close()


async def test_the_gateway_sends_an_impostor_neither_key_nor_prompt(
    tmp_path: Path, impostor: Impostor
) -> None:
    # The record names the job's certificate; the port is the impostor's.
    real = make_cert(tmp_path, "the job")
    add_record(
        tmp_path / "registry",
        "m",
        f"https://127.0.0.1:{impostor.port}/v1",
        tls_sha256=real.sha256,
    )
    body = chat("m", stream=True)
    body["messages"][0]["content"] = PROMPT_MARK
    async with (
        gateway(tmp_path, health_interval_s=0.2) as url,
        aiohttp.ClientSession() as client,
    ):
        for _ in range(3):
            async with client.post(url + CHAT, json=body) as resp:
                assert resp.status in (502, 503), await resp.text()
        await asyncio.sleep(0.6)  # a few health probes too
    assert impostor.connections > 0  # it was asked to shake hands, and nothing more
    assert JOB_KEY.encode() not in impostor.received
    assert PROMPT_MARK.encode() not in impostor.received
    if impostor._context is not None:
        assert impostor.received == b""  # not one byte after the handshake
    else:
        assert b"Authorization" not in impostor.received and b"POST" not in impostor.received


async def test_the_first_answer_is_timed_once_from_arrival_to_the_engines_first_bytes(
    tmp_path: Path,
) -> None:
    """The "first token" start-up phase (hpc.phases): a GET, a probe or a refused POST does
    not count; the first generating POST does, from its arrival, once."""
    knobs = Knobs(tokens=5, ttft_s=0.3)
    async with front_and_engine(tmp_path, knobs) as (front, sha, engine):
        auth = {"Authorization": f"Bearer {JOB_KEY}", "Content-Type": "application/json"}
        for method, path in (("GET", "/v1/models"), ("GET", "/health")):
            await asyncio.to_thread(_request, front.port, sha, method, path, auth, None)
        engine.knobs = Knobs(status=400)
        status, _ = await asyncio.to_thread(
            _request, front.port, sha, "POST", CHAT, auth, json.dumps(chat("m")).encode()
        )
        assert status == 400
        assert front.first_token_s is None
        engine.knobs = knobs
        for _ in range(2):
            status, _ = await asyncio.to_thread(
                _request, front.port, sha, "POST", CHAT, auth, json.dumps(chat("m")).encode()
            )
            assert status == 200
            first = front.first_token_s
            assert first is not None and first >= 0.3  # the engine's own wait, at least
        assert front.first_token_s == first  # the second answer changed nothing
