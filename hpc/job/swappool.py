"""The swap pool (``python -m hpc.job.swappool --plan FILE|-``): one job, a catalogue of models.

It runs inside the job the way the job wrapper does, but instead of one engine it serves
an OpenAI-compatible endpoint for every model of its catalogue and loads them on request
(hpc.job.slots): a request for a loaded model goes straight to its engine, streamed chunk
by chunk as it arrives; one for another model waits for a slot and its engine's health.

The pool is its job's front (hpc.job.front): TLS on the node's port with a certificate the
record pins, every route of its app (hpc.job.poolapp) behind the per-job key, engines on
Unix sockets only it reaches. The record is published ``ready`` once the pool listens, not
once a model is loaded. In a Kubernetes pod (the plan's ``cluster``, rendered by
hpc.k8s.pool) it serves plain HTTP on the pod's port instead, as the engines there do, with
the key from the pod's Secret and no record: the Deployment's status is the job's state.
TERM, INT, USR1 and USR2 mark it ``draining``, let the requests in flight (which the pool
counts itself) finish within the plan's drain budget, stop every engine's process tree and
mark it ``gone``, as the job wrapper does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from aiohttp import web

from hpc.errors import MTError
from hpc.hosts import advertised_host, is_wildcard
from hpc.job.drain import POLL_S, SETTLE_S
from hpc.job.engines import build_launch
from hpc.job.front import bind_node_port
from hpc.job.jobdir import JobDir
from hpc.job.plan import ClusterServe, PoolPlan
from hpc.job.poolapp import create_app
from hpc.job.record import JobRecord, RecordEnded
from hpc.job.slots import Launcher, Slots
from hpc.job.tlscert import make_cert
from hpc.job.wrapper import STOP_SIGNALS


class SwapPool:
    """Runs the pool for one job and keeps its registry record true."""

    def __init__(
        self,
        plan: PoolPlan,
        environ: Mapping[str, str],
        out: IO[str],
        launcher: Launcher | None = None,
    ) -> None:
        self.plan = plan
        self.environ = environ
        self.out = out
        # The llama.cpp server chosen at submit (hpc.llamacppserver), if the plan names one.
        self.launcher = launcher or functools.partial(build_launch, llamacpp=plan.llamacpp)
        # No record in a Kubernetes pod (plan.cluster): the Deployment's status is its record.
        self.job = (
            JobRecord(
                plan.registry_dir,
                backend=plan.backend,
                job_id=plan.job_id,
                environ=environ,
                say=self._say,
            )
            if plan.registry_dir is not None
            else None
        )
        self.stop_signal: int | None = None
        self._signals: list[tuple[int, float]] = []  # every stop signal, and when (loop time)

    def _say(self, message: str) -> None:
        self.out.write(f"[mt swappool] {message}\n")
        self.out.flush()

    def _stop_event(self) -> asyncio.Event:
        """An event the stop signals set (each one noted for the drain budget)."""
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig, stopped)
        return stopped

    async def serve(self) -> int:
        """Serve until a stop signal; 0 when stopped, 1 when the pool could not start."""
        if self.plan.cluster is not None:
            return await self._serve_in_pod(self.plan.cluster)
        job = self.job
        if job is None:  # the plan's validator rules this out
            raise MTError(
                "the pool plan has neither registry_dir nor cluster",
                hint="give the plan one of them (hpc.job.plan.PoolPlan checks this when it "
                "is read)",
            )
        pool = self.plan.pool
        record = job.claim(
            nonce=self.plan.nonce, model=pool.name, engine="pool", serves=pool.models
        )
        key = record.api_key.get_secret_value()
        stopped = self._stop_event()
        try:
            slots = Slots(self.plan, self.environ, self.out, self.launcher)
            home = JobDir(prefix="mt-pool-")
        except MTError as exc:
            job.set(record, "failed", reason=exc.message)
            return 1
        try:
            # The pool is its job's front: the node's port, TLS with a pinned certificate,
            # the job's key on every path (hpc.job.front says why).
            cert = make_cert(home.path, f"mt pool {pool.name}")
            runner = web.AppRunner(create_app(slots, key), access_log=None)
            await runner.setup()
            host = "" if is_wildcard(self.plan.engine_host) else self.plan.engine_host
            sock = bind_node_port(host)
            port = int(sock.getsockname()[1])
            await web.SockSite(runner, sock, ssl_context=cert.server_context()).start()
            base_url = f"https://{advertised_host(self.plan.engine_host)}:{port}/v1"
            record = job.set(record, "ready", port=port, base_url=base_url, tls_sha256=cert.sha256)
            self._say(f"serving {', '.join(pool.models)} on port {port} ({pool.slots} slots)")
            tending = asyncio.create_task(slots.tend())
            try:
                await stopped.wait()
            finally:
                tending.cancel()
                name = signal.Signals(self.stop_signal).name if self.stop_signal else "stop"
                with contextlib.suppress(RecordEnded):  # ended from outside: stop all the same
                    record = job.set(record, "draining", reason=f"received {name}")
                await self._drain(slots)
                await slots.stop_all()
                await runner.cleanup()
                with contextlib.suppress(RecordEnded):
                    job.set(record, "gone", reason=f"stopped by {name}")
        finally:
            home.remove()
        return 0

    async def _serve_in_pod(self, cluster: ClusterServe) -> int:
        """Kubernetes: plain HTTP on the pod's port, as the engines there serve (the
        NetworkPolicy admits only the gateway; every route but ``/health`` needs the key,
        which the pod's Secret puts in the environment). Readiness is the kubelet's probe of
        ``/health``, the record the Deployment's status (hpc.backends.kubernetes)."""
        pool = self.plan.pool
        key = self.environ.get(cluster.key_env, "")
        if not key:
            self._say(f"{cluster.key_env} is empty: the pool's key comes from its Secret")
            return 1
        stopped = self._stop_event()
        try:
            slots = Slots(self.plan, self.environ, self.out, self.launcher)
        except MTError as exc:
            self._say(f"cannot start: {exc.message}")
            return 1
        runner = web.AppRunner(create_app(slots, key, open_health=True), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "0.0.0.0", cluster.port).start()  # noqa: S104 - the pod's address; the key and a NetworkPolicy guard it
            self._say(f"serving {', '.join(pool.models)} on port {cluster.port} (plain HTTP)")
            tending = asyncio.create_task(slots.tend())
            try:
                await stopped.wait()
            finally:
                tending.cancel()
                await self._drain(slots)
                await slots.stop_all()
        finally:
            await runner.cleanup()
        return 0

    def _on_signal(self, signum: int, stopped: asyncio.Event) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        self._signals.append((signum, asyncio.get_running_loop().time()))
        stopped.set()

    async def _drain(self, slots: Slots) -> None:
        """Until nothing is in flight (after SETTLE_S) or the earliest signal's budget ends."""
        if not self._signals:  # stopped by an error, not a signal: nothing to wait for
            return
        loop = asyncio.get_running_loop()
        started = loop.time()

        def deadline() -> float:
            return min(at + self.plan.drain_budget_s(sig) for sig, at in self._signals)

        while loop.time() < deadline():
            if slots.in_flight() == 0 and loop.time() - started >= SETTLE_S:
                self._say(f"drained after {loop.time() - started:.1f}s: nothing in flight")
                return
            await asyncio.sleep(min(POLL_S, max(0.0, deadline() - loop.time())))
        self._say(f"drain budget spent: {slots.in_flight()} request(s) in flight; stopping")

    def run(self) -> int:
        """Run the pool's event loop until it stops; returns the exit code (0 if its record
        was ended from outside: nobody routes to it any more)."""
        try:
            return asyncio.run(self.serve())
        except RecordEnded as exc:
            self._say(f"stopping: {exc}")
            return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpc.job.swappool``."""
    parser = argparse.ArgumentParser(prog="python -m hpc.job.swappool", description=__doc__)
    parser.add_argument(
        "--plan", required=True, help="the pool plan JSON file, or - to read it from stdin"
    )
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.plan == "-" else Path(args.plan).read_text(encoding="utf-8")
    plan = PoolPlan.model_validate_json(text)
    return SwapPool(plan, os.environ, sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
