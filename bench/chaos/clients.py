"""The soak's clients: each sends requests in a loop and files every outcome in one kind.

Kinds: ``whole`` (200, every chunk, ``[DONE]`` or a complete JSON answer), ``clean_error``
(an OpenAI-shaped error: a status with ``{"error": {...}}``, or a stream's in-band error
event before it closes), ``refused`` (no connection: the gateway was down; nothing was
accepted), ``cut`` (the connection broke before the answer was whole, and the client's
HTTP library says so: an unterminated chunked body, a reset; what a dropped tunnel does to
the streams in it, and what the gateway itself must never do), ``hung`` (no byte for
longer than the hung limit) and ``lost`` (a response that looks complete and is not: a
stream ended properly without ``[DONE]`` or an error, an error body that is not
OpenAI-shaped, a 200 without choices).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from bench.chaos.world import PLAIN_SILENCE_S

KINDS = ("whole", "clean_error", "refused", "cut", "hung", "lost")


@dataclass
class Tally:
    """Outcomes of one world's clients, with a few examples of every kind but ``whole``."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    latest: dict[str, deque[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.monotonic)
    last_whole: float | None = None
    longest_outage_s: float = 0.0  # the longest time with no whole answer (since the start)

    def add(self, kind: str, detail: str = "") -> None:
        """Count one outcome (and keep its detail if it is among the first or last three)."""
        with self.lock:
            self.counts[kind] += 1
            now = time.monotonic()
            since = self.last_whole if self.last_whole is not None else self.started
            self.longest_outage_s = max(self.longest_outage_s, now - since)
            if kind == "whole":
                self.last_whole = now
            if kind != "whole" and detail:
                line = f"{time.strftime('%H:%M:%S')} {detail[:300]}"
                kept = self.examples.setdefault(kind, [])
                if len(kept) < 3:
                    kept.append(line)
                else:
                    self.latest.setdefault(kind, deque(maxlen=3)).append(line)

    def summary(self) -> dict[str, Any]:
        """Counts of every kind (zeros included), the total and the examples."""
        with self.lock:
            out: dict[str, Any] = {kind: self.counts[kind] for kind in KINDS}
            out["sent"] = sum(self.counts.values())
            out["longest_outage_s"] = round(self.longest_outage_s, 1)
            out["examples"] = {k: [*v, *self.latest.get(k, ())] for k, v in self.examples.items()}
            return out


def _body(model: str, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Name three rivers of Europe."}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": stream,
        }
    ).encode()


def _shaped(raw: bytes) -> bool:
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _read_stream(response: http.client.HTTPResponse) -> tuple[str, str]:
    chunks = 0
    while True:
        line = response.readline()
        if not line:
            # readline() hides an unterminated chunked body: its peek swallows the
            # IncompleteRead. Only the terminating chunk leaves ``chunk_left`` None.
            if response.chunked and response.chunk_left is not None:
                return "cut", f"connection closed after {chunks} chunks, mid-body"
            return "lost", f"stream ended after {chunks} chunks without [DONE] or an error"
        text = line.decode("utf-8", "replace").strip()
        if text == "data: [DONE]":
            response.read()
            return ("whole", "") if chunks else ("lost", "[DONE] with no chunk")
        if text.startswith("data: "):
            payload = text[len("data: ") :]
            if _shaped(payload.encode()):
                # After an in-band error the gateway ends the stream; how is not counted.
                with contextlib.suppress(http.client.HTTPException, OSError):
                    response.read()
                return "clean_error", f"in-band: {json.loads(payload)['error']['message']}"
            try:
                json.loads(payload)
            except ValueError:
                return "lost", f"a chunk that is not JSON: {payload[:80]}"
            chunks += 1


def one_request(
    host: str, port: int, model: str, stream: bool, hung_s: float, key: str | None = None
) -> tuple[str, str]:
    """Send one chat request; its kind and a detail for the report. A stream is hung after
    ``hung_s`` without a byte (a cold start sends it comments); a non-streaming request
    after ``PLAIN_SILENCE_S`` (it waits for a cold start in silence). ``key``: the
    gateway's owner key, sent as a bearer token."""
    hung_s = hung_s if stream else max(hung_s, PLAIN_SILENCE_S)
    conn = http.client.HTTPConnection(host, port, timeout=hung_s)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return "refused", "connection refused"
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=_body(model, stream),
                headers={"Content-Type": "application/json"}
                | ({"Authorization": f"Bearer {key}"} if key else {}),
            )
            response = conn.getresponse()
            if response.status != 200:
                raw = response.read()
                if _shaped(raw):
                    message = json.loads(raw)["error"]["message"]
                    return "clean_error", f"{response.status}: {message}"
                return "lost", f"{response.status} not OpenAI-shaped: {raw[:120]!r}"
            if stream:
                return _read_stream(response)
            answer = json.loads(response.read())
            if answer.get("choices"):
                return "whole", ""
            return "lost", f"200 without choices: {str(answer)[:120]}"
        except TimeoutError:
            return "hung", f"no byte for {hung_s:.0f} s (stream={stream})"
        except (ConnectionError, http.client.HTTPException) as exc:
            return "cut", f"{type(exc).__name__}: {exc} (stream={stream})"
        except ValueError as exc:
            return "lost", f"{type(exc).__name__}: {exc} (stream={stream})"
    finally:
        conn.close()


def client_loop(
    host: str,
    port: int,
    model: str,
    tally: Tally,
    stop: threading.Event,
    hung_s: float,
    seed: int,
    key: str | None = None,
) -> None:
    """Requests until ``stop``: three in four streaming, a short random pause between."""
    rng = random.Random(seed)  # noqa: S311 - pacing, not secrets
    while not stop.is_set():
        stream = rng.random() < 0.75
        kind, detail = one_request(host, port, model, stream, hung_s, key)
        tally.add(kind, detail)
        stop.wait(1.0 if kind == "refused" else rng.uniform(0.0, 0.5))
