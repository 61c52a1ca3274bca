"""The Ray cluster of a multi-node vLLM job, run by the job wrapper on the job's first node.

:meth:`RayCluster.start` starts the Ray head here (bound to this node's address, on a port
the OS picked) and one job step with a Ray worker on each other node
(hpc.job.multinode.RayLayout says the commands); :meth:`RayCluster.wait_joined` asks
``ray status`` until every node is listed, so vLLM starts only on a whole cluster;
:meth:`RayCluster.stop` ends the workers' step and the head.

The token (``RAY_AUTH_TOKEN``, with ``RAY_AUTH_MODE=token``) is made here, per job, and
travels only in environments: the head's, ``srun``'s (which hands it to the worker step:
``--export=ALL`` is srun's default), vLLM's. Other users see none of it in ``ps``. The head
runs with TERM blocked like the engine (hpc.job.proctree): Slurm's TERM on scancel does not
pull the cluster from under a vLLM that is draining; Slurm still signals the workers' step.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Literal

from hpc.job.multinode import RayLayout, active_nodes
from hpc.job.proctree import ENGINE_STOP_SIGNAL, die_with_parent, stop_tree, term_blocked

_STATUS_TIMEOUT_S = 30.0
Joined = Literal["joined", "stopped", "exited", "timeout"]


def node_address() -> str:
    """This node's address as other nodes reach it (its hostname, resolved)."""
    return socket.gethostbyname(socket.gethostname())


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (the OS's pick; Ray binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


class RayCluster:
    """The head here and the workers' step on the other nodes of this job."""

    def __init__(
        self,
        layout: RayLayout,
        environ: Mapping[str, str],
        say: Callable[[str], None],
        stop_grace_s: float = 10.0,
        *,
        address: str | None = None,
    ) -> None:
        self.layout = layout
        self.address = address or node_address()
        self.port = 0  # set by start()
        self._environ = environ
        self._say = say
        self._stop_grace_s = stop_grace_s
        self._token = secrets.token_urlsafe(32)
        self._head: subprocess.Popen[bytes] | None = None
        self._workers: subprocess.Popen[bytes] | None = None
        self.joined = 0

    def env(self) -> dict[str, str]:
        """What the Ray processes and vLLM add to their environment (in Apptainer's form too)."""
        env = RayLayout.env(self.address, self.port, self._token)
        if self.layout.runtime.kind == "apptainer":
            env.update({f"APPTAINERENV_{k}": v for k, v in list(env.items())})
        return env

    def _spawn(self, argv: list[str], *, block_term: bool) -> subprocess.Popen[bytes]:
        stop = ENGINE_STOP_SIGNAL if block_term else signal.SIGTERM
        blocked = term_blocked() if block_term else contextlib.nullcontext()
        with blocked:
            return subprocess.Popen(
                argv,
                env={**self._environ, **self.env()},
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(stop),  # noqa: PLW1509 - prctl only
            )

    def start(self) -> None:
        """Start the head, then the workers' step (OSError: a command is missing)."""
        self.port = free_port(self.address)
        head = self.layout.head_argv(self.address, self.port)
        self._say("ray head: " + " ".join(head))
        self._head = self._spawn(head, block_term=True)
        workers = self.layout.workers_step_argv(self.address, self.port)
        self._say("ray workers: " + " ".join(workers))
        # srun forwards TERM to its tasks: that is how stop() ends the step.
        self._workers = self._spawn(workers, block_term=False)

    def _count(self) -> int:
        argv = self.layout.status_argv(self.address, self.port)
        try:
            done = subprocess.run(
                argv,
                env={**self._environ, **self.env()},
                capture_output=True,
                text=True,
                timeout=_STATUS_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return 0  # the head may not answer yet: ask again
        return active_nodes(done.stdout) if done.returncode == 0 else 0

    def exited(self) -> str | None:
        """Which part of the cluster has ended, with its exit code, or None."""
        for name, proc in (("ray head", self._head), ("ray workers' step", self._workers)):
            if proc is not None and proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def wait_joined(self, deadline: float, stopped: Callable[[], bool]) -> Joined:
        """Until ``ray status`` lists every node: 'joined', or 'stopped', 'exited', 'timeout'."""
        interval = 0.2
        while time.monotonic() < deadline:
            if stopped():
                return "stopped"
            if self.exited() is not None:
                self.joined = self._count()  # who is left, for the reason (0 without a head)
                return "exited"
            count = self._count()
            if count != self.joined:
                self.joined = count
                self._say(f"ray: {count} of {self.layout.nodes} nodes joined")
            if count >= self.layout.nodes:
                return "joined"
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 1.5, 2.0)
        return "timeout"

    def join(self, deadline: float, stopped: Callable[[], bool]) -> tuple[Joined, str]:
        """Start Ray on every node and wait until all joined: the outcome, and what to log
        (for any outcome but 'joined', the reason the record keeps)."""
        nodes = self.layout.nodes
        if not self._environ.get("SLURM_JOB_ID"):
            # srun outside an allocation would ask Slurm for a new one: never that.
            return "exited", "a multi-node job runs inside a Slurm allocation (no SLURM_JOB_ID)"
        try:
            self.start()
        except OSError as exc:
            return "exited", f"cannot start Ray: {exc.strerror}: {exc.filename}"
        outcome = self.wait_joined(deadline, stopped)
        joined = f"{self.joined} of {nodes} nodes joined"
        if outcome == "joined":
            return outcome, f"ray: all {nodes} nodes joined; starting the engine"
        if outcome == "stopped":
            return outcome, f"stopped while the nodes joined Ray ({joined})"
        if outcome == "exited":
            return outcome, f"{self.exited()} ({joined})"
        return outcome, f"not every node joined Ray within startup_timeout_s ({joined})"

    def stop(self) -> None:
        """End the workers' step (TERM to srun, which forwards it), then the head."""
        if self._workers is not None and self._workers.poll() is None:
            stop_tree(self._workers.pid, grace_s=self._stop_grace_s, sig=signal.SIGTERM)
        if self._head is not None and self._head.poll() is None:
            stop_tree(self._head.pid, grace_s=self._stop_grace_s, sig=ENGINE_STOP_SIGNAL)
        for proc in (self._workers, self._head):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
