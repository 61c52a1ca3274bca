"""An upstream stream that opens with SSE comments (a swap pool loading the model).

A comment is a whole event: it commits the 200, is relayed to the client (SSE clients skip
it), stops the time-to-first-token clock, and ends failover, so an error after it is
in-band. ``FakeUpstream`` speaks the engines' wire format, with comments as a knob.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from test_gateway_failover import WHOLE_STREAM, events_of
from test_gateway_proxy import CHAT, add_record, chat, gateway

pytestmark = pytest.mark.timeout(30)

# Comments for longer than the first-token timeout, each well within the idle timeout.
TIMEOUTS = {"first_token_timeout_s": 0.5, "idle_timeout_s": 10}
SLOW_COMMENTS = Knobs(comments=4, comment_gap_s=0.25)


async def test_comments_first_keep_the_stream_past_the_first_token_timeout(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(SLOW_COMMENTS) as upstream:
        add_record(tmp_path / "registry", "m", upstream.base_url)
        async with (
            gateway(tmp_path, **TIMEOUTS) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 200
            data = await resp.read()
    events = events_of(data)
    assert events[:4] == [b": keep-alive"] * 4  # relayed, before the first data event
    assert [any(part in e for e in events) for part in WHOLE_STREAM] == [True] * 4
    assert b'"error"' not in data
    assert upstream.seen.completed == 1


async def test_an_error_after_a_comment_is_in_band_and_not_retried(tmp_path: Path) -> None:
    bad = Knobs(comments=1, error_after=0)
    async with FakeUpstream(bad) as failing, FakeUpstream() as healthy:
        add_record(tmp_path / "registry", "m", failing.base_url)
        add_record(tmp_path / "registry", "m", healthy.base_url)
        answers = []
        async with gateway(tmp_path, **TIMEOUTS) as url, aiohttp.ClientSession() as client:
            for _ in range(2):  # round robin: one of them meets the failing replica first
                async with client.post(url + CHAT, json=chat("m", stream=True)) as resp:
                    answers.append((resp.status, await resp.read()))
    assert [status for status, _ in answers] == [200, 200]
    cut = [data for _, data in answers if b'"error"' in data]
    whole = [data for _, data in answers if b'"error"' not in data]
    assert len(cut) == 1 and len(whole) == 1
    events = events_of(cut[0])
    assert events[0] == b": keep-alive"
    assert b"upstream_error" in events[-1] and b"fake engine failed" in events[-1]
    assert b"[DONE]" not in cut[0]
    assert [any(part in e for e in events_of(whole[0])) for part in WHOLE_STREAM] == [True] * 4
    # Once the comment was relayed the request was the failing replica's: no second try.
    assert (failing.seen.requests, healthy.seen.requests) == (1, 1)
