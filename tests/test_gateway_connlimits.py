"""Connection-level limits: the header read timeout and the open-file limit at start."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from test_gateway_proxy import CHAT, add_record, chat, gateway

from gateway.fdlimit import needed_fds

pytestmark = pytest.mark.timeout(60)


async def _closed_by_gateway(url: str, head: bytes) -> bytes:
    """Send ``head`` (an incomplete request) and return what the gateway sends before it
    closes the connection (b"" when it closes without answering)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        # Bounded only so a broken gateway fails the test instead of hanging it.
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "head",
    [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"],
    ids=["silent", "headers-never-end"],
)
async def test_a_client_that_never_finishes_its_request_head_is_disconnected(
    tmp_path: Path, head: bytes
) -> None:
    async with gateway(tmp_path, header_timeout_s=0.3) as url:
        assert await _closed_by_gateway(url, head) == b""


async def test_a_client_that_trickles_its_headers_is_disconnected(tmp_path: Path) -> None:
    async with gateway(tmp_path, header_timeout_s=0.3) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for _ in range(200):  # one header line every 50 ms: never a whole head
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            try:
                data = await asyncio.wait_for(reader.read(1), 0.05)
            except asyncio.TimeoutError:
                continue
            closed = data == b""
            break
        writer.close()
    assert closed


async def test_the_header_timeout_never_cuts_a_long_stream(tmp_path: Path) -> None:
    # 30 tokens at 20/s: ~1.5 s of streaming, five times the header timeout.
    async with FakeUpstream(Knobs(tokens=30, tokens_per_s=20)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path, header_timeout_s=0.3) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            data = await resp.read()
    assert resp.status == 200
    assert data.endswith(b"data: [DONE]\n\n")
    assert fake.seen.first_chunk_at is not None and fake.seen.last_chunk_at is not None
    assert fake.seen.last_chunk_at - fake.seen.first_chunk_at > 0.3


def _check_in_child(soft: int, hard: int, max_in_flight: int) -> str:
    """Run the check in a child whose open-file limit is (soft, hard): the real rlimit."""
    code = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        from gateway.fdlimit import ensure_fd_limit
        found = ensure_fd_limit({max_in_flight})
        print(found.before, found.after, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        print(found.warning())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def test_a_short_soft_limit_is_raised_to_what_the_caps_need() -> None:
    needed = needed_fds(500)
    out = _check_in_child(256, needed + 1000, 500).splitlines()
    before, after, actual = map(int, out[0].split())
    assert (before, after, actual) == (256, needed, needed)
    assert out[1] == "None"


def test_a_hard_limit_below_the_need_is_a_warning_naming_numbers_and_fix() -> None:
    needed = needed_fds(1000)
    out = _check_in_child(200, 300, 1000).splitlines()
    assert out[0].split() == ["200", "300", "300"]
    assert f"open-file limit 300 (hard 300) is below the {needed}" in out[1]
    assert f"ulimit -n {needed}" in out[1] and "--max-in-flight" in out[1]


def test_mt_gateway_logs_the_fd_warning_at_start(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))
        from hpc.cli import main
        sys.argv = ["mt", "gateway", "--port", "0", "--max-in-flight", "1000"]
        main()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "MT_HOME": str(tmp_path / "mt")},
    )
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "open-file limit 300 (hard 300)" in err
