"""The load generator: chat requests at fixed concurrency levels, one record per request.

One aiohttp ``ClientSession`` per run, with a connection pool as large as the largest
level. A level runs ``concurrency`` workers that take the next request until the count (or
the duration) is used up; with a rate, sends also wait for seeded Poisson arrival times.
Stream chunks are parsed as they arrive to time each one; the last chunk's ``usage``
(``stream_options.include_usage``) gives the token counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from bench.metrics import LevelSummary, summarize
from bench.records import RequestRecord
from bench.workload import Schedule, Workload, arrival_gaps_s, prompt

_DATA = b"data:"
_ERROR_TEXT_CHARS = 300


@dataclass(frozen=True)
class Target:
    """Where requests go: an OpenAI root URL (``…/v1``) and the key to send, if any."""

    base_url: str
    api_key: str | None = None


@dataclass(frozen=True)
class Progress:
    """A level's state, for a live progress line."""

    concurrency: int
    done: int
    total: int | None
    errors: int
    elapsed_s: float


@dataclass
class LevelResult:
    """One level: its records (warm-up dropped) and one summary per model."""

    concurrency: int
    records: list[RequestRecord]
    summaries: list[LevelSummary] = field(default_factory=list)


ProgressFn = Callable[[Progress], None]


def _body(workload: Workload, index: int) -> bytes:
    request: dict[str, object] = {
        "model": workload.model_for(index),
        "messages": [
            {"role": "user", "content": prompt(workload.seed, index, workload.prompt_tokens)}
        ],
        "max_tokens": workload.max_tokens,
        "temperature": workload.temperature,
        "stream": workload.stream,
    }
    if workload.stream:
        request["stream_options"] = {"include_usage": True}
    return json.dumps(request).encode()


def _take_usage(record: RequestRecord, event: dict[str, object]) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        prompt_tokens, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt_tokens, int):
            record.prompt_tokens = prompt_tokens
        if isinstance(completion, int):
            record.output_tokens = completion


def _has_text(event: dict[str, object]) -> bool:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return bool(text)


async def _read_stream(
    response: aiohttp.ClientResponse, record: RequestRecord, start: float
) -> None:
    done = False
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(_DATA):
            continue
        data = line[len(_DATA) :].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if not isinstance(event, dict):
            continue
        if "error" in event:
            record.error = f"in-band error: {json.dumps(event['error'])[:_ERROR_TEXT_CHARS]}"
            return
        if _has_text(event):
            now = time.perf_counter() - start
            if record.first_token_s is None:
                record.first_token_s = now
            record.chunk_s.append(now)
        _take_usage(record, event)
    if not done:
        record.error = "the stream ended without data: [DONE]"


async def one_request(
    session: aiohttp.ClientSession,
    target: Target,
    workload: Workload,
    index: int,
    concurrency: int,
    start: float,
    timeout_s: float,
) -> RequestRecord:
    """Send request ``index`` and record its times; failures become the record's error."""
    headers = {"Content-Type": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    body = _body(workload, index)
    record = RequestRecord(
        concurrency=concurrency,
        model=workload.model_for(index),
        index=index,
        sent_s=time.perf_counter() - start,
    )
    url = target.base_url.rstrip("/") + "/chat/completions"
    for attempt in (1, 2):
        try:
            async with session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                record.status = response.status
                if response.status != 200:
                    text = (await response.text(errors="replace"))[:_ERROR_TEXT_CHARS]
                    record.error = f"HTTP {response.status}: {text}"
                elif workload.stream:
                    await _read_stream(response, record, start)
                else:
                    answer = await response.json(content_type=None)
                    record.first_token_s = time.perf_counter() - start
                    if isinstance(answer, dict):
                        _take_usage(record, answer)
        except aiohttp.ClientOSError as exc:
            # A pooled connection the engine had closed while idle (llama-server's
            # keep-alive ends after a few seconds): the request never reached it, so it is
            # sent once more, as HTTP clients do; a second failure is the engine's.
            if attempt == 1 and record.status is None:
                continue
            record.error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_CHARS]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            # ValueError: a body that is not JSON. All of these are the engine's failures.
            record.error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_CHARS]
        break
    record.end_s = time.perf_counter() - start
    return record


async def run_level(
    session: aiohttp.ClientSession,
    target: Target,
    workload: Workload,
    schedule: Schedule,
    concurrency: int,
    on_progress: ProgressFn | None = None,
) -> LevelResult:
    """Run one concurrency level to its count or duration; summaries per model."""
    total = schedule.requests_for(concurrency)
    warmup = schedule.warmup
    start = time.perf_counter()
    deadline = start + schedule.duration_s if schedule.duration_s is not None else None
    send_at: list[float] | None = None
    if schedule.rate_per_s is not None:
        gaps = arrival_gaps_s(workload.seed, schedule.rate_per_s, (total or 100_000) + warmup)
        send_at, at = [], 0.0
        for gap in gaps:
            at += gap
            send_at.append(at)
    records: list[RequestRecord] = []
    next_index = 0
    errors = 0

    def report() -> None:
        if on_progress is not None:
            elapsed = time.perf_counter() - start
            on_progress(Progress(concurrency, len(records), total, errors, elapsed))

    async def worker() -> None:
        nonlocal next_index, errors
        while True:
            index = next_index
            if total is not None and index >= total + warmup:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            next_index += 1
            if send_at is not None and index < len(send_at):
                delay = start + send_at[index] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            record = await one_request(
                session, target, workload, index, concurrency, start, schedule.timeout_s
            )
            if index >= warmup:
                records.append(record)
                errors += 0 if record.ok else 1
                report()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    records.sort(key=lambda r: r.index)
    result = LevelResult(concurrency, records)
    for model in workload.models:
        mine = [r for r in records if r.model == model]
        result.summaries.append(summarize(mine, model=model, concurrency=concurrency))
    return result


async def sweep(
    target: Target,
    workload: Workload,
    schedule: Schedule,
    on_progress: ProgressFn | None = None,
) -> list[LevelResult]:
    """Every level of ``schedule``, one after the other, on one connection pool."""
    connector = aiohttp.TCPConnector(limit=max(schedule.concurrency), force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        return [
            await run_level(session, target, workload, schedule, level, on_progress)
            for level in schedule.concurrency
        ]
