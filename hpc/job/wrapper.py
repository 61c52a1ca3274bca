"""The job wrapper (``python -m hpc.job.wrapper --plan FILE``): the code that runs inside every job.

It binds the node's port for the job's TLS front (hpc.job.front: every path needs the job's
key) before anything else, starts the engine on a Unix socket in the job's 0700 directory
as a child in its own process group, waits for the engine's health under the startup
deadline, and only then publishes the record ``ready`` with the front's certificate digest.
TERM, INT, USR1 and USR2 (Slurm's preemption/time-limit warning) mark the record
``draining`` (the gateway sends it nothing new), let the requests in flight finish within
the plan's drain budget (hpc.job.plan, hpc.job.drain), then stop the engine's whole process
tree and mark the record ``gone``. The engine runs with TERM blocked, so Slurm's TERM to
every process of the job does not cut what is being drained. An engine that dies
or never becomes healthy is recorded ``failed`` with the reason and its last log lines.
With ``continuity: handover`` and a scheduler that can submit (``successors``: Slurm's, from
``python -m hpc.slurm.handover``), the warning signal, or the job's end drawing near, makes
it submit a successor first (hpc.job.handover) and drain only once that one is ready.
Engine output is copied to the wrapper's stdout (the job log) with the per-job key masked.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import IO

from hpc.errors import MTError, RegistryError
from hpc.hosts import advertised_host, is_wildcard
from hpc.job.drain import drain
from hpc.job.engineproc import LogPump, await_health, start_engine
from hpc.job.engines import EngineLaunch, build_launch
from hpc.job.front import Front, RoutePolicy, bind_node_port
from hpc.job.handover import Handover, Successors
from hpc.job.jobdir import JobDir
from hpc.job.multinode import RayLayout
from hpc.job.plan import STOP_MARGIN_S, JobPlan, read_plan
from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree
from hpc.job.raycluster import RayCluster
from hpc.job.record import JobRecord, RecordEnded
from hpc.job.staging import stage_spec
from hpc.job.tlscert import make_cert
from hpc.job.udshttp import probe
from hpc.liveness import create_time
from hpc.permissions import InsecurePermissionsError
from hpc.registry import Record, State, new_api_key

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

# build_launch's signature: tests pass another launcher (a fake engine) in its place.
Launcher = Callable[..., EngineLaunch]


class JobWrapper:
    """Runs one engine for one job and keeps its registry record true."""

    def __init__(
        self,
        plan: JobPlan,
        environ: Mapping[str, str],
        out: IO[str],
        launcher: Launcher | None = None,
        successors: Successors | None = None,
    ) -> None:
        self.plan = plan
        self._began = time.monotonic()  # the job's start, near enough: its time-to-ready
        # The llama.cpp server chosen at submit (hpc.llamacppserver), if the plan names one.
        self.launcher = launcher or functools.partial(build_launch, llamacpp=plan.llamacpp)
        self._secret = ""
        self.environ = environ
        self.out = out
        self.job = JobRecord(
            plan.registry_dir,
            backend=plan.backend,
            job_id=plan.job_id,
            environ=environ,
            say=self._say,
        )
        self.registry = self.job.registry
        self.job_id = self.job.job_id
        self.generation = self.job.generation
        self.key = self.job.key
        self.stop_signal: int | None = None
        self._signals: list[tuple[int, float]] = []  # every stop signal, and when it came
        self._proc: subprocess.Popen[bytes] | None = None  # the engine, once started
        self._engine_key = new_api_key()  # the engine's own: never leaves this node
        self._dir: JobDir | None = None
        self._front: Front | None = None
        self._cert_sha256: str | None = None
        self._staging_use: IO[bytes] | None = None  # held while the engine reads the entry
        self._ray: RayCluster | None = None  # a multi-node job's other nodes (hpc.job.multinode)
        # continuity: handover (hpc.job.handover): set only where a scheduler can submit.
        self._handover: Handover | None = None
        if plan.spec.continuity == "handover" and successors is not None:
            self._handover = Handover(successors, self.registry, self.job_id, 0.0, self._say)

    # -- record keeping ---------------------------------------------------------------
    def _say(self, message: str) -> None:
        self.out.write(f"[mt jobwrap] {message}\n")
        self.out.flush()

    def _claim_record(self) -> Record:
        """The backend's pending record, or a new one for a job submitted by hand."""
        spec = self.plan.spec
        return self.job.claim(
            nonce=self.plan.nonce,
            model=spec.name,
            engine=spec.engine,
            started_by=self.plan.started_by,
            predecessor=self.plan.predecessor,
        )

    def _set(self, record: Record, state: State, **fields: object) -> Record:
        return self.job.set(record, state, **fields)

    # -- signals ------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._handover is not None and signum in WARNING_SIGNALS and not self._handover.over:
            # The warning starts the handover; the job drains once the successor is ready, or
            # by the job's end (squeue's, as Slurm may warn early; else the warning's budget).
            self._handover.warn()
            return
        self._signals.append((signum, time.monotonic()))
        if self.stop_signal is None:
            self.stop_signal = signum

    def _drain_deadline(self) -> float:
        """When the drain must end: the earliest any signal (or a handover's end) allows."""
        ends = [at + self.plan.drain_budget_s(sig) for sig, at in self._signals]
        if self._handover is not None:
            warning_end = self._handover.warning_deadline(self._warning_budget_s)
            ends += [end for end in (self._handover.end_deadline, warning_end) if end is not None]
        return min(ends)

    @property
    def _warning_budget_s(self) -> float:
        return self.plan.drain_budget_s(signal.SIGUSR1)

    def _install_signals(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    # -- the engine -----------------------------------------------------------------------
    def _start(self, launch: EngineLaunch) -> tuple[subprocess.Popen[bytes], LogPump]:
        self._say("starting engine: " + " ".join(launch.argv))
        if launch.network_note:
            self._say("engine network: " + launch.network_note)
        self._engine_started = time.monotonic()
        return start_engine(launch, self.environ, self.out, self._engine_key)

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop_tree(proc.pid, grace_s=self.plan.stop_grace_s, sig=ENGINE_STOP_SIGNAL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def run(self) -> int:
        """Serve until stopped; returns the process exit code (0 stopped, 1 failed).

        A registry that cannot be written (a full disk, a read-only remount) ends the job:
        the engine is stopped whatever state its record was left in, since a job nobody can
        find or route must not keep its GPUs, and the wrapper exits non-zero saying why.
        A registry (or record) other users can reach ends it the same way: the job's key
        is not published there (hpc.permissions; the bypass applies here too).
        A record ended from outside (``mt cancel`` or ``mt status`` made it final) or owned
        by a newer run also ends the job: nobody routes to it any more.
        """
        try:
            return self._run()
        except RegistryError as exc:
            self._stop_engine()
            self._say(f"registry write failed: {exc.message} at {exc.path}")
            return 1
        except InsecurePermissionsError as exc:
            # Publishing the job's key where others can read it is worse than no job.
            self._stop_engine()
            self._say(f"not publishing into the registry: {exc.message}; fix: {exc.hint}")
            return 1
        except RecordEnded as exc:
            self._stop_engine()
            self._say(f"stopping: {exc}")
            return 0
        finally:
            self._stop_engine()
            self._close()

    def _stop_engine(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._stop(self._proc)

    def _run(self) -> int:
        self._install_signals()
        # Leftovers of writers killed mid-write (tmp files, lock files): cheap, one listing.
        self.registry.clean_tmp()
        record = self._claim_record()
        self._secret = record.api_key.get_secret_value()
        try:
            spec, phases, self._staging_use = stage_spec(  # weights to the node, if asked
                self.plan, record.phases, self.environ, self._say
            )
            self._dir = JobDir()
            launch = self.launcher(
                spec,
                listen=self._dir.socket_path(),
                api_key=self._engine_key,
                environ=self.environ,
            )
        except MTError as exc:
            self._set(record, "failed", reason=exc.message, port=None)
            self._say(f"failed: {exc.message}")
            return 1
        front = self._open_front(launch, self._dir)
        # The port is the front's from here on: held before the engine starts, never free.
        record = self._set(record, "starting", port=front.port, phases=phases)
        deadline = time.monotonic() + spec.startup_timeout_s
        layout = RayLayout.of(spec)
        if layout is not None:  # first Ray on every node of the job (hpc.job.raycluster)
            self._ray = RayCluster(layout, self.environ, self._say, self.plan.stop_grace_s)
            joined, why = self._ray.join(deadline, lambda: self.stop_signal is not None)
            if joined != "joined":
                state: State = "gone" if joined == "stopped" else "failed"
                self._set(record, state, reason=why)
                self._say(f"{state}: {why}")
                return 0 if joined == "stopped" else 1
            self._say(why)
            launch = replace(launch, env={**launch.env, **self._ray.env()})
        try:
            proc, pump = self._start(launch)
        except OSError as exc:
            reason = f"cannot start {launch.argv[0]}: {exc.strerror}"
            self._set(record, "failed", reason=reason)
            self._say(f"failed: {reason}")
            return 1
        self._proc = proc
        # Recorded at once, not at ready: a model can load for many minutes, and a
        # wrapper killed meanwhile must leave an engine that `mt cancel` can find.
        record = self._set(
            record, "starting", engine_pid=proc.pid, engine_started_at=create_time(proc.pid)
        )
        outcome = self._await_health(proc, launch, max(0.0, deadline - time.monotonic()))
        if outcome == "stopped":
            return self._drain(record, proc)
        if outcome != "healthy":
            self._stop(proc)
            tail = pump.join()
            reason = (
                f"engine exited with code {proc.returncode} before it was healthy"
                if outcome == "exited"
                else f"engine not healthy within startup_timeout_s={spec.startup_timeout_s:g}"
            )
            self._set(record, "failed", reason=reason, log_tail=tail)
            self._say(f"failed: {reason}")
            return 1
        loaded_s = round(time.monotonic() - self._engine_started, 3)
        base_url = f"https://{advertised_host(self.plan.engine_host)}:{front.port}/v1"
        record = self._set(
            record,
            "ready",
            base_url=base_url,
            tls_sha256=self._cert_sha256,
            engine_pid=proc.pid,
            # What the gateway probes from now on (the engine is loaded by now).
            health_path=launch.probe_path or launch.health_path,
            phases=phases.model_copy(update={"engine_start_to_healthy_s": loaded_s}),
        )
        if self._handover is not None:
            record = self._start_handover(self._handover, record)
        while self.stop_signal is None and proc.poll() is None:
            if self._handover is not None and self._handover.step(self._warning_budget_s):
                return self._drain(record, proc, front, why=self._handover.reason())
            record = self._note_first_token(record, front)
            time.sleep(0.2)
        if self.stop_signal is None:
            # scancel signals the engine and this wrapper at once: give our own signal a
            # moment to arrive before calling the engine's exit a failure.
            time.sleep(1.0)
        if self.stop_signal is not None:
            return self._drain(record, proc, front)
        tail = pump.join()
        reason = f"engine exited with code {proc.returncode} while serving"
        self._set(record, "failed", reason=reason, log_tail=tail)
        self._say(f"failed: {reason}")
        return 1

    # -- continuity: handover ----------------------------------------------------------------
    def _start_handover(self, handover: Handover, record: Record) -> Record:
        """Size the lead from this job's time-to-ready, learn its end, record when."""
        slurm = self.plan.spec.slurm
        fixed = float(slurm.handover_lead_s) if slurm.handover_lead_s is not None else None
        at = handover.start(
            time.monotonic() - self._began,
            slurm.handover_margin_s,
            fixed,
            self.plan.stop_grace_s + STOP_MARGIN_S,
            self.environ,
        )
        return record if at is None else self._set(record, "ready", handover_at=at)

    def _open_front(self, launch: EngineLaunch, home: JobDir) -> Front:
        """The job's TLS front on the node's port, started (see hpc.job.front)."""
        cert = make_cert(home.path, f"mt job {self.job_id}")
        self._cert_sha256 = cert.sha256
        host = "" if is_wildcard(self.plan.engine_host) else self.plan.engine_host
        quiet = {launch.health_path, launch.probe_path or launch.health_path}
        front = Front(
            bind_node_port(host),
            home.socket_path(),
            key=self._secret,
            engine_key=self._engine_key,
            tls=cert.server_context(),
            policy=RoutePolicy(self.plan.spec.expose_routes),
            quiet_paths=frozenset(quiet),
        )
        front.start()
        self._front = front
        return front

    def _close(self) -> None:
        """Release the port and remove the job's directory (its socket, keys, certificate)."""
        if self._ray is not None:
            self._ray.stop()  # after the engine (run's finally stopped it): vLLM first
        if self._front is not None:
            self._front.stop()
        if self._dir is not None:
            self._dir.remove()
        if self._staging_use is not None:
            self._staging_use.close()  # the staged entry may be evicted from now on

    def _await_health(
        self, proc: subprocess.Popen[bytes], launch: EngineLaunch, timeout_s: float
    ) -> str:
        """'healthy', 'exited', 'stopped' (a signal came) or 'timeout'."""
        key = self._engine_key if launch.health_needs_key else None
        socket_path = self._dir.socket_path() if self._dir is not None else Path("/nonexistent")
        return await_health(
            proc,
            lambda: probe(socket_path, launch.health_path, key),
            lambda: self.stop_signal is not None,
            timeout_s,
        )

    def _note_first_token(self, record: Record, front: Front) -> Record:
        """The job's first answer time into the record's phases, once (hpc.phases)."""
        phases, first = record.phases, front.first_token_s
        if first is None or phases is None or phases.first_token_s is not None:
            return record
        return self._set(record, "ready", phases=phases.model_copy(update={"first_token_s": first}))

    def _drain(
        self,
        record: Record,
        proc: subprocess.Popen[bytes],
        engine: Front | None = None,
        *,
        why: str | None = None,
    ) -> int:
        """``draining``; requests in flight at the front finish (a serving ``engine`` only);
        stop; ``gone``. ``why``: a handover's reason, instead of the signal's."""
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "stop"
        record = self._set(record, "draining", reason=why or f"received {name}")
        reason = why or f"stopped by {name}"
        handing_over = self._handover is not None and (
            self._handover.end_deadline is not None or self._handover.warned_at is not None
        )
        budget = self._drain_deadline() - time.monotonic() if self._signals or handing_over else 0.0
        if engine is not None and budget > 0:
            self._say(f"draining: requests in flight may finish for {budget:.1f}s")
            drained = drain(proc, engine, self._drain_deadline)
            self._say(drained.log_line())
            if drained.why == "budget" and drained.in_flight != 0:
                left = "?" if drained.in_flight is None else str(drained.in_flight)
                reason += f": drain budget spent after {drained.waited_s:.0f}s, {left} in flight"
        self._stop(proc)
        self._set(record, "gone", reason=reason, engine_pid=None)
        return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpc.job.wrapper``."""
    parser = argparse.ArgumentParser(prog="python -m hpc.job.wrapper", description=__doc__)
    parser.add_argument(
        "--plan", required=True, help="the job plan JSON file, or - to read it from stdin"
    )
    args = parser.parse_args(argv)
    if args.plan == "-":
        plan = JobPlan.model_validate_json(sys.stdin.read())
    else:
        plan = read_plan(Path(args.plan))
    return JobWrapper(plan, os.environ, sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
