"""A streaming completion read in a thread, line by line, with when each line came.

For tests that signal a job while one of its answers streams: they wait for the first token,
act, then look at how the stream ended (whole with ``[DONE]``, or cut).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from hpc import tlspin
from hpc.errors import MTError

# Gemma's end-of-sequence tokens (<eos>, <end_of_turn>): banned, so a stream runs to max_tokens.
NO_EOS = {"1": -100, "106": -100}


@dataclass
class Stream:
    """One streaming completion read line by line in a thread, with when each line came."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    first_token: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def data(self) -> list[str]:
        return [line[len("data: ") :] for _, line in self.lines if line.startswith("data: ")]

    def chunks(self) -> list[dict[str, object]]:
        return [json.loads(d) for d in self.data() if d != "[DONE]"]

    def tokens(self) -> int:
        return sum(1 for c in self.chunks() if c.get("choices"))

    def finish_reason(self) -> object:
        choices = self.chunks()[-1].get("choices")
        return choices[0].get("finish_reason") if isinstance(choices, list) else None

    def ended_at(self) -> float:
        return self.lines[-1][0]


def start_stream(
    url: str, key: str | None, model: str, max_tokens: int, pin: str | None = None
) -> Stream:
    """POST a streaming completion for ``model`` to ``url`` (a gateway's /v1, or a job's:
    then ``pin`` is its record's ``tls_sha256``, checked before anything is sent).

    Gemma's end-of-sequence tokens are banned, so the answer runs to ``max_tokens``.
    """
    stream = Stream()
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"

    def read() -> None:
        conn = tlspin.connection(url, pin, timeout=120)
        try:
            conn.request("POST", urlsplit(url).path + "/completions", json.dumps(body), headers)
            with conn.getresponse() as response:
                stream.status = int(response.status)
                for raw in response:
                    line = raw.decode("utf-8", "replace").strip()
                    if line:
                        stream.lines.append((time.monotonic(), line))
                        if line.startswith("data: {"):
                            stream.first_token.set()
        except (http.client.HTTPException, OSError, ValueError, MTError) as exc:
            stream.error = repr(exc)
        finally:
            conn.close()
            stream.first_token.set()
            stream.done.set()

    threading.Thread(target=read, daemon=True).start()
    return stream


def post_status(url: str, key: str | None, model: str) -> int:
    """The HTTP status of a small non-streaming completion for ``model``."""
    body = {"model": model, "prompt": "Hi", "max_tokens": 2}
    request = urllib.request.Request(  # noqa: S310 - a loopback URL of this test
        url + "/completions", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
