"""The fake engine's abort log: which request was abandoned, and in which phase."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs

from bench.fakeengine import Abort

pytestmark = pytest.mark.timeout(30)

CHAT = "/chat/completions"


def body(stream: bool) -> dict[str, object]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    }


@pytest.mark.parametrize(
    ("phase", "knobs", "stream"),
    [
        ("before first byte", Knobs(ttft_s=60), True),
        ("mid-stream", Knobs(tokens=10_000, tokens_per_s=50), True),
        ("non-stream", Knobs(ttft_s=60), False),
    ],
)
async def test_a_client_that_leaves_is_logged_with_its_id_and_phase(
    phase: str, knobs: Knobs, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bench.fakeengine")
    async with FakeUpstream(knobs) as fake, aiohttp.ClientSession() as client:
        headers = {"X-Request-Id": f"gone-{phase}"}
        request = asyncio.ensure_future(
            client.post(fake.base_url + CHAT, json=body(stream), headers=headers)
        )
        if stream:
            resp = await asyncio.wait_for(request, 10)
            if phase == "mid-stream":
                assert b"tok0" in await resp.content.readany()
            resp.close()
        else:
            while fake.seen.requests == 0:
                await asyncio.sleep(0.01)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
        await asyncio.wait_for(fake.seen.cancelled_event.wait(), 5)
    assert fake.seen.aborted == [Abort(f"gone-{phase}", phase)]  # type: ignore[arg-type]
    assert fake.seen.cancelled == 1
    assert f"aborted request_id=gone-{phase} phase={phase}" in caplog.text


async def test_a_deliberate_cut_and_a_finished_answer_are_not_aborts() -> None:
    async with (
        FakeUpstream(Knobs(tokens=5, cut_after=2)) as fake,
        aiohttp.ClientSession() as client,
    ):
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async with client.post(fake.base_url + CHAT, json=body(True)) as resp:
                await resp.read()
        async with client.post(fake.base_url + CHAT, json=body(False)) as resp:
            assert resp.status == 200
    assert fake.seen.aborted == []
    assert fake.seen.completed == 1
