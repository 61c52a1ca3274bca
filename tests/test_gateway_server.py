"""Starting the gateway: bind rules, ephemeral ports, and the blocking ``run`` entry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.config import GatewayConfig
from gateway.keys import create_key
from gateway.server import check_bind, is_loopback, start
from hpc.errors import MTError

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "10.1.2.3", "login01", ""])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "login01.cluster"])
async def test_non_loopback_bind_without_keys_is_refused(tmp_path: Path, host: str) -> None:
    config = GatewayConfig(host=host, port=0, registry_dir=tmp_path / "registry")
    with pytest.raises(MTError, match="without API keys") as caught:
        await start(config)
    assert caught.value.hint == "pass --keys FILE or bind 127.0.0.1"


def test_non_loopback_bind_with_keys_is_allowed(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    create_key(keys, "alice")
    check_bind(GatewayConfig(host="0.0.0.0", registry_dir=tmp_path, keys_file=keys))


async def test_port_zero_binds_an_ephemeral_port(tmp_path: Path) -> None:
    runner, port = await start(GatewayConfig(port=0, registry_dir=tmp_path / "registry"))
    try:
        assert port > 0
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "models": 0, "replicas": {}}
    finally:
        await runner.cleanup()


async def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = GatewayConfig(port=port, registry_dir=tmp_path / "registry")
        with pytest.raises(MTError, match=f"cannot listen on 127.0.0.1:{port}") as caught:
            await start(config)
    assert caught.value.hint is not None
    assert "--port" in caught.value.hint


def test_run_prints_the_listening_line_and_stops_on_sigterm(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gateway.config import GatewayConfig\n"
        "from gateway.server import run\n"
        "run(GatewayConfig(port=0, registry_dir=Path(sys.argv[1])))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "registry")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("mt gateway listening on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    # The log on stderr is JSON lines, and says where it listens.
    assert '"msg": "mt gateway listening on http://127.0.0.1:' in stderr


@pytest.mark.parametrize("grace_s", [10.0, 0.3])
async def test_sigterm_stops_accepting_and_drains_streams_within_the_grace(
    tmp_path: Path, grace_s: float
) -> None:
    from fake_upstream import FakeUpstream, Knobs
    from test_gateway_proxy import CHAT, add_record, chat

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gateway.config import GatewayConfig\n"
        "from gateway.server import run\n"
        "run(GatewayConfig(port=0, registry_dir=Path(sys.argv[1]), "
        "shutdown_grace_s=float(sys.argv[2])))\n"
    )
    # A 1.5 s stream: it outlives a 0.3 s grace, not a 10 s one.
    async with FakeUpstream(Knobs(tokens=15, tokens_per_s=10)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            str(tmp_path / "registry"),
            str(grace_s),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
            port = int(line.rsplit(":", 1)[1])
            url = f"http://127.0.0.1:{port}"
            async with (
                aiohttp.ClientSession() as client,
                client.post(url + CHAT, json=chat("m", stream=True)) as resp,
            ):
                assert b"tok0" in await resp.content.readany()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection("127.0.0.1", port)
                data = b""
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    async for chunk in resp.content.iter_any():
                        data += chunk
            _, stderr = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, stderr
    if grace_s > 1.5:
        assert data.endswith(b"data: [DONE]\n\n")
        assert fake.seen.completed == 1
    else:
        # Past the grace the stream is ended with an in-band error event, no [DONE].
        assert b"[DONE]" not in data
        last = [e for e in data.split(b"\n\n") if e][-1]
        error = json.loads(last[len(b"data: ") :])["error"]
        assert error["code"] == "gateway_shutting_down"
        assert error["type"] == "server_error"
        assert fake.seen.completed == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_a_request_still_waiting_when_the_grace_ends_gets_503_shutting_down(
    tmp_path: Path, stream: bool
) -> None:
    from fake_upstream import FakeUpstream, Knobs
    from test_gateway_proxy import CHAT, add_record, assert_openai_error, chat

    from gateway.server import drain

    # The engine "prefills" for a minute: nothing has reached the client when the 0.3 s
    # grace ends, so the request can still be answered with a plain, retryable 503.
    async with FakeUpstream(Knobs(ttft_s=60)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        runner, port = await start(GatewayConfig(port=0, registry_dir=tmp_path / "registry"))
        try:
            async with aiohttp.ClientSession() as client:
                request = asyncio.ensure_future(
                    client.post(f"http://127.0.0.1:{port}{CHAT}", json=chat("m", stream=stream))
                )
                while fake.seen.requests == 0:
                    await asyncio.sleep(0.01)
                await drain(runner, 0.3)
                async with await request as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"]
                    assert_openai_error(await resp.json(), "gateway_shutting_down")
        finally:
            await runner.cleanup()
        await asyncio.wait_for(fake.seen.cancelled_event.wait(), 10)
    assert fake.seen.completed == 0
