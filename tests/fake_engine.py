"""A fake LLM engine and a job wrapper that runs it, for the job-wrapper tests.

The engine stands for llama.cpp's ``llama-server`` or vLLM's OpenAI server as the job wrapper
sees them: a process that takes ``--host`` on its command line (a path ending in ``.sock``:
a Unix socket, as llama-server does; else ``--port`` too) and its API key from the
environment (as ``VLLM_API_KEY`` does) or from ``--api-key-file`` (llama-server's way),
prints log lines while it loads, and answers ``GET /health`` and ``GET /v1/models`` with 200
only when the request carries ``Authorization: Bearer <key>`` (401 otherwise). It is a
stdlib ``http.server``.

    python tests/fake_engine.py serve --host H --port P --mode MODE
    python tests/fake_engine.py wrap --plan PLAN.json --mode MODE

Modes of the engine:
    healthy      serve at once
    never        print loading lines and sleep forever without listening
    exit         print loading lines and exit with code 3
    grandchild   start a grandchild (its own session, ignores SIGTERM, sleeps), then serve
    stubborn     like never, but ignore SIGTERM and SIGINT (an engine deaf to both)

Every mode prints the key it was given on purpose, in every form a log line can carry it
(``key_lines``): the wrapper must mask them all in its log.

``wrap`` runs the real ``hpc.job.wrapper.JobWrapper`` with a launcher that returns the
``EngineLaunch`` of this fake engine, in place of ``hpc.job.engines.build_launch``.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import os
import signal
import socketserver
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

KEY_ENV = "FAKE_ENGINE_API_KEY"
MODES = ("healthy", "never", "exit", "grandchild", "stubborn")
EXIT_CODE = 3


def _say(line: str) -> None:
    print(line, flush=True)


def _handler(key: str, open_health: bool) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/health", "/v1/models"):
                self._answer(404, {"error": {"message": "not found", "type": "not_found"}})
            elif open_health and self.path == "/health":
                self._answer(200, {"status": "ok"})
            elif self.headers.get("Authorization") != f"Bearer {key}":
                self._answer(401, {"error": {"message": "bad key", "type": "auth"}})
            else:
                self._answer(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            _say("fake engine: request " + format % args)

    return Handler


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[object, tuple[str, int]]:
        conn, _ = super().get_request()
        return conn, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port) address


def key_lines(key: str) -> list[str]:
    """Log lines carrying ``key`` in every form a log line can: plain, base64 (standard and
    URL-safe, padded or not; of ``Bearer KEY`` and of HTTP Basic's ``user:KEY``), and
    percent-encoded (some characters, every character, twice)."""
    raw = key.encode()
    every = "".join(f"%{b:02X}" for b in raw)
    return [
        f"fake engine: api key is {key}",
        f"fake engine: base64 {base64.b64encode(raw).decode()}",
        f"fake engine: header Authorization: Basic {base64.b64encode(b'user:' + raw).decode()}",
        f"fake engine: header Authorization: Basic {base64.b64encode(b'ab:' + raw).decode()}",
        "fake engine: bearer, url-safe, unpadded "
        + base64.urlsafe_b64encode(b"Bearer " + raw).decode().rstrip("="),
        f"fake engine: GET /v1/models?api_key={urllib.parse.quote(key, safe='')}",
        f"fake engine: GET /v1/models?api_key={every}&lower={every.lower()}",
        f"fake engine: GET /v1/models?twice={every.replace('%', '%25')}",
    ]


def _start_grandchild() -> int:
    """A child that leaves our process group and ignores TERM, as a stray worker might."""
    code = (
        "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(3600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    return proc.pid


def serve(host: str, port: int, mode: str, key_file: str | None = None) -> int:
    """Run the fake engine in ``mode``; returns its exit code.

    The key comes from ``key_file`` (as llama-server's ``--api-key-file``: one key a line,
    ``#`` lines are comments; ``/health`` then answers without a key, as llama-server's
    does) if given, else from the environment.
    """
    key = os.environ.get(KEY_ENV, "")
    if key_file is not None:
        with open(key_file, encoding="utf-8") as f:
            key = next(k for k in f.read().splitlines() if k and not k.startswith("#"))
    _say(f"fake engine: starting in mode {mode}")
    for line in key_lines(key):  # on purpose: the wrapper must mask every form of it
        _say(line)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine stop signal
    if mode in ("never", "exit", "stubborn"):
        for i in range(3):
            _say(f"fake engine: loading weights {i + 1}/3")
        if mode == "exit":
            _say("fake engine: out of memory, giving up")
            return EXIT_CODE
        while True:
            time.sleep(1)
    if mode == "grandchild":
        _say(f"fake engine: grandchild pid {_start_grandchild()}")
    # With a key file it stands for llama-server, whose /health needs no key.
    handler = _handler(key, key_file is not None)
    server: socketserver.BaseServer
    if host.endswith(".sock"):
        server = _UnixHTTPServer(host, handler)
    else:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _say(f"fake engine: listening on {host}:{port}")
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


def wrap(plan_path: Path, mode: str) -> int:
    """Run the real job wrapper with this fake engine as its engine."""
    from hpc.job.engines import EngineLaunch
    from hpc.job.plan import read_plan
    from hpc.job.wrapper import JobWrapper
    from hpc.spec import ModelSpec

    def launcher(
        spec: ModelSpec, *, listen: Path, api_key: str, environ: Mapping[str, str]
    ) -> EngineLaunch:
        argv = [sys.executable, "-u", str(Path(__file__).resolve()), "serve"]
        argv += ["--host", str(listen), "--mode", mode]
        return EngineLaunch(
            argv=argv, env={KEY_ENV: api_key}, health_path="/v1/models", health_needs_key=True
        )

    plan = read_plan(plan_path)
    return JobWrapper(plan, os.environ, sys.stdout, launcher=launcher).run()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``serve`` (the engine) or ``wrap`` (the job wrapper around it)."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve")
    serve_p.add_argument("--host", default="127.0.0.1")
    serve_p.add_argument("--port", type=int, default=0)
    serve_p.add_argument("--mode", choices=MODES, default="healthy")
    serve_p.add_argument("--api-key-file", default=None)
    wrap_p = sub.add_parser("wrap")
    wrap_p.add_argument("--plan", type=Path, required=True)
    wrap_p.add_argument("--mode", choices=MODES, default="healthy")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.host, args.port, args.mode, args.api_key_file)
    return wrap(args.plan, args.mode)


if __name__ == "__main__":
    sys.exit(main())
