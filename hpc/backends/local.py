"""The local backend: the job wrapper as a detached process on this machine.

The embedded default, for a laptop, a workstation or the demo. A job is a wrapper process
in its own session, its log a file under ``$MT_HOME/logs``, and its pid (with its start
time, so a recycled pid is not mistaken for it) in ``$MT_HOME/jobs/<key>.pid``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError

from hpc.backends.base import Capabilities, JobHandle, JobRequest, JobStatus, Submitted
from hpc.errors import BackendError, EngineError
from hpc.job.plan import STOP_MARGIN_S, JobPlan, PoolPlan, write_plan
from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree, wait_gone
from hpc.liveness import alive, create_time, judged_here, this_host
from hpc.llamacppserver import server_for, server_for_pool
from hpc.privatefile import make_private_dir
from hpc.registry import record_key
from hpc.site import Site
from hpc.spec import ModelSpec, PoolSpec


class LocalBackend:
    """Runs each job as ``python -m hpc.job.wrapper`` in a new session on this machine."""

    name = "local"
    capabilities = Capabilities(scripts=False, pools=True, cleans_up=False)

    def __init__(self, site: Site, *, stop_timeout_s: float = 30.0) -> None:
        self.site = site
        self.stop_timeout_s = stop_timeout_s

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        jobs = self.site.jobs_dir
        return jobs / f"{key}.json", jobs / f"{key}.pid", self.site.log_dir / f"{key}.log"

    def submit(self, spec: ModelSpec, request: JobRequest) -> Submitted:
        """Write the plan, then start the wrapper detached."""
        if spec.resources.nodes > 1:
            raise EngineError(
                f"{spec.name}: resources.nodes={spec.resources.nodes}: the local backend runs "
                "a model on this one machine",
                hint="submit it with --backend slurm (vLLM over the job's nodes), or set "
                "resources.nodes: 1",
            )
        plan = JobPlan(
            spec=spec,
            backend=self.name,
            job_id=request.nonce,
            nonce=request.nonce,
            registry_dir=self.site.registry_dir,
            engine_host=self.site.config.engine_host or "127.0.0.1",
            started_by=request.started_by,
            drain_s=spec.drain_s,
            staging=self.site.config.staging.for_weights(spec.weights),
            llamacpp=server_for((spec,), self.site.config.llamacpp.server, os.environ),
        )
        return self._launch(plan, "hpc.job.wrapper")

    def submit_pool(
        self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...], request: JobRequest
    ) -> Submitted:
        """Start a swap pool (``python -m hpc.job.swappool``) detached, like a model's job."""
        plan = PoolPlan(
            pool=pool,
            catalogue=catalogue,
            backend=self.name,
            job_id=request.nonce,
            nonce=request.nonce,
            registry_dir=self.site.registry_dir,
            engine_host=self.site.config.engine_host or "127.0.0.1",
            drain_s=pool.drain_s,
            llamacpp=server_for_pool(pool, catalogue, self.site.config.llamacpp.server, os.environ),
        )
        return self._launch(plan, "hpc.job.swappool")

    def render_script(self, spec: ModelSpec) -> str:
        """Local jobs are processes, not scripts (``capabilities.scripts`` is False)."""
        raise BackendError("the local backend has no job script to show")

    def render_pool_script(self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...]) -> str:
        """Local jobs are processes, not scripts (``capabilities.scripts`` is False)."""
        raise BackendError("the local backend has no job script to show")

    def _launch(self, plan: JobPlan | PoolPlan, module: str) -> Submitted:
        job_id = plan.nonce  # a local job's id is its nonce: known before it starts
        key = record_key(self.name, job_id)
        plan_path, pid_path, log_path = self._paths(key)
        try:
            for directory in (self.site.jobs_dir, self.site.log_dir):
                make_private_dir(directory)  # a new MT_HOME too: 0700
            write_plan(plan, plan_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                plan_path.unlink()
            raise BackendError(
                f"cannot write the job plan {plan_path}: {exc.strerror}",
                hint="free space in $MT_HOME (or point MT_HOME elsewhere); nothing was started",
            ) from exc
        argv = [sys.executable, "-m", module, "--plan", str(plan_path)]
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            finally:
                os.close(log_fd)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                plan_path.unlink()
            raise BackendError(
                f"cannot start the job wrapper: {exc.strerror}",
                argv=argv,
                hint="is ModelTainer installed in this Python environment?",
            ) from exc
        started = create_time(proc.pid) or time.time()
        # The host too: a pid means nothing on another login node that shares $HOME.
        pid_path.write_text(f"{proc.pid} {started} {this_host()}\n", encoding="utf-8")
        return Submitted(JobHandle(self.name, job_id, plan.nonce), log_path=str(log_path))

    def _pid(self, job_id: str) -> tuple[int, float] | None:
        """The wrapper's pid and start time, if it was started on this host."""
        found = self._pid_file(job_id)
        return found[:2] if found is not None and judged_here(found[2]) else None

    def _pid_file(self, job_id: str) -> tuple[int, float, str] | None:
        """pid, start time and host from the job's pid file (older files name no host:
        this one)."""
        _, pid_path, _ = self._paths(record_key(self.name, job_id))
        try:
            fields = pid_path.read_text(encoding="utf-8").split()
            host = fields[2] if len(fields) > 2 else this_host()
            return int(fields[0]), float(fields[1]), host
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _elsewhere(self, job_id: str) -> str | None:
        """The other host the job runs on, if it is not this one."""
        found = self._pid_file(job_id)
        return found[2] if found is not None and not judged_here(found[2]) else None

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """Running while the wrapper process lives; ``done`` once it has exited."""
        out: dict[str, JobStatus] = {}
        for handle in handles:
            host = self._elsewhere(handle.job_id)
            if host is not None:
                # Only the host that runs it can tell: say so instead of deciding "gone".
                out[handle.job_id] = JobStatus("unknown", f"runs on {host}")
                continue
            pid = self._pid(handle.job_id)
            if pid is None:
                out[handle.job_id] = JobStatus("missing", "no pid file on this machine")
            elif alive(*pid):
                out[handle.job_id] = JobStatus("running")
            else:
                out[handle.job_id] = JobStatus("done", "the job wrapper has exited")
        return out

    def cancel(self, handle: JobHandle) -> None:
        """TERM the wrapper (it drains and marks the record gone); force it if it hangs."""
        host = self._elsewhere(handle.job_id)
        if host is not None:
            raise BackendError(
                f"local job {handle.job_id} runs on {host}, not on this host",
                hint=f"cancel it there: `mt --host {host} cancel {handle.job_id}`",
            )
        pid = self._pid(handle.job_id)
        if pid is not None and alive(*pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid[0], signal.SIGTERM)
            if not wait_gone(pid[0], self._stop_wait_s(handle.job_id)):
                stop_tree(pid[0], grace_s=2.0)
        # A wrapper killed with -9 cannot stop its engine: do it here (the service then
        # finishes its record).
        if handle.engine_pid is not None and alive(handle.engine_pid):
            stop_tree(handle.engine_pid, grace_s=5.0, sig=ENGINE_STOP_SIGNAL)

    def _stop_wait_s(self, job_id: str) -> float:
        """How long a TERMed wrapper may take: its drain, its engine's stop, a margin."""
        plan_path, _, _ = self._paths(record_key(self.name, job_id))
        try:
            text = plan_path.read_text(encoding="utf-8")
        except OSError:
            return self.stop_timeout_s
        for kind in (JobPlan, PoolPlan):
            with contextlib.suppress(ValidationError):
                plan = kind.model_validate_json(text)
                needed = plan.drain_s + plan.stop_grace_s + STOP_MARGIN_S
                return max(self.stop_timeout_s, needed)
        return self.stop_timeout_s

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        """Lines of the job's log file; with ``follow``, until the wrapper has exited."""
        _, _, log_path = self._paths(record_key(self.name, handle.job_id))
        try:
            f = log_path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError as exc:
            raise BackendError(f"no log file {log_path}", hint="was the job started here?") from exc
        with f:
            while True:
                line = f.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                pid = self._pid(handle.job_id)
                if not follow or pid is None or not alive(*pid):
                    rest = f.read()
                    yield from rest.splitlines()
                    return
                time.sleep(0.2)
