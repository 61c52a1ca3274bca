"""A private two-node Slurm cluster with four fake GPUs, built in a temporary directory.

Tests start it with ``SlurmCluster.start(base_dir)`` and tear it down with ``stop()``.
Everything lives under ``base_dir``: the munge key and its own ``munged`` (own socket),
``slurm.conf`` and ``gres.conf``, state, spool, logs and the fake GPU device
nodes. Nothing is written to ``/etc/slurm`` and the system munge socket is never used;
clients and daemons find the cluster only through ``SLURM_CONF`` (see :attr:`env`).

Layout (see /work/shared/TESTBED.md, "A Slurm cluster with two nodes and four (fake) GPUs"):

* nodes ``gpu1`` and ``gpu2`` are two ``slurmd -N <node>`` on this host, on free ports,
  each with ``Gres=gpu:fake:2`` backed by character devices ``mknod <dir>/nvfakeN c 1 3``;
* partitions ``gpu`` (default) and ``debug`` both hold ``gpu[1-2]``;
* accounting is off (``sacct`` fails), ``proctrack/linuxproc``, ``task/none``,
  ``select/cons_tres`` with ``CR_Core_Memory``.

Every daemon runs in the foreground as a child of the process that called ``start()``
(and by default dies with it, via ``PR_SET_PDEATHSIG``), so ``stop()`` ends them by pid.
Job processes (``slurmstepd`` and what it runs) are found by the ``SLURM_CONF`` of this
cluster in their environment, plus their descendants, and are killed by pid too.

The daemons need root (``SlurmUser=root``, ``mknod``); :func:`SlurmCluster.available`
says why the cluster cannot run here, or ``None``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

NODES: tuple[str, ...] = ("gpu1", "gpu2")
GPUS_PER_NODE = 2
CLUSTER_NAME = "mtest"
REQUIRED_PROGRAMS: tuple[str, ...] = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
    "mknod",
)
# Unix socket paths (munge's, slurmstepd's in the spool) must fit in sun_path (108 bytes).
_MAX_RUN_DIR_LEN = 60
_PR_SET_PDEATHSIG = 1
_START_ATTEMPTS = 3


class SlurmClusterError(RuntimeError):
    """The private cluster could not be built or started."""


class _PortTakenError(SlurmClusterError):
    """A daemon could not bind the free port chosen for it (someone else took it)."""


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 and the wildcard address now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _mem_total_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmClusterError("no MemTotal in /proc/meminfo")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port for c in conns)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _gone(proc: psutil.Process) -> bool:
    """Exited: no such process, or a zombie (its parent, maybe init, reaps it later)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process is gone; the ones still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _gone(p)]
    return alive


def _signal_pids(pids: Sequence[int], sig: signal.Signals) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(sig)
            procs.append(proc)
        except psutil.NoSuchProcess:
            continue
    return procs


def _stop_pids(pids: Sequence[int], grace: float) -> None:
    """SIGTERM each process, wait up to ``grace`` seconds, then SIGKILL what is left."""
    alive = _wait_gone(_signal_pids(pids, signal.SIGTERM), grace)
    _wait_gone(_signal_pids([p.pid for p in alive], signal.SIGKILL), 5)


def _kill_pids(pids: Sequence[int]) -> None:
    """SIGKILL each process and wait (a few seconds at most) until it is gone."""
    _wait_gone(_signal_pids(pids, signal.SIGKILL), 5)


@dataclass
class _Daemon:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class SlurmCluster:
    """A running private cluster; build it with :meth:`start`."""

    root: Path
    """Directory that holds the whole cluster (configs, state, logs, job output)."""
    conf_path: Path
    """The private ``slurm.conf``; ``SLURM_CONF`` points here."""
    nodes: tuple[str, ...]
    """Node names, ``("gpu1", "gpu2")``."""
    partitions: tuple[str, ...]
    """Partition names; the first one is the default."""
    gpus_per_node: int
    cpus_per_node: int
    mem_per_node_mb: int
    ctld_port: int
    node_ports: dict[str, int]
    munge_socket: Path
    work_dir: Path
    """Default working directory of :meth:`run` (``slurm-<id>.out`` files land here)."""
    start_seconds: float = 0.0
    """How long :meth:`start` took until both nodes were idle."""
    _env: dict[str, str] = field(default_factory=dict, repr=False)
    _daemons: list[_Daemon] = field(default_factory=list, repr=False)
    _short_dir: Path | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    # ------------------------------------------------------------------ availability

    @staticmethod
    def available() -> str | None:
        """``None`` if this machine can run the cluster, else the reason it cannot."""
        missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
        if missing:
            return f"programs not found: {', '.join(missing)} (apt-get install slurm-wlm munge)"
        if os.geteuid() != 0:
            return "the private Slurm cluster runs its daemons as root (SlurmUser=root, mknod)"
        try:
            pwd.getpwnam("munge")
        except KeyError:
            return "no 'munge' user to own the munge key (apt-get install munge)"
        return None

    # ------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        base_dir: Path,
        *,
        cpus_per_node: int | None = None,
        mem_per_node_mb: int = 4096,
        min_job_age: int = 5,
        timeout: float = 60.0,
        die_with_parent: bool = True,
    ) -> SlurmCluster:
        """Build a fresh cluster under ``base_dir`` and wait until both nodes are idle.

        ``cpus_per_node`` defaults to ``max(2, nproc)``; the nodes are configured with
        ``SlurmdParameters=config_overrides`` so Slurm trusts slurm.conf over the hardware.
        ``mem_per_node_mb`` is capped below the machine's memory. Raises
        :class:`SlurmClusterError` (with the daemons' log tails) if the cluster does not
        come up within ``timeout`` seconds; nothing is left running in that case.
        """
        reason = cls.available()
        if reason is not None:
            raise SlurmClusterError(reason)
        t0 = time.monotonic()
        for attempt in range(_START_ATTEMPTS):
            try:
                cluster = cls._start_once(
                    base_dir, cpus_per_node, mem_per_node_mb, min_job_age, timeout, die_with_parent
                )
            except _PortTakenError:
                if attempt + 1 == _START_ATTEMPTS:
                    raise
                continue  # another process took a port between choosing and binding it
            cluster.start_seconds = time.monotonic() - t0
            return cluster
        raise AssertionError("unreachable")

    @classmethod
    def _start_once(
        cls,
        base_dir: Path,
        cpus_per_node: int | None,
        mem_per_node_mb: int,
        min_job_age: int,
        timeout: float,
        die_with_parent: bool,
    ) -> SlurmCluster:
        base_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="slurm-", dir=base_dir))
        short_dir: Path | None = None
        run_dir = root / "run"
        if len(str(run_dir)) > _MAX_RUN_DIR_LEN:
            short_dir = Path(tempfile.mkdtemp(prefix="mtslurm-", dir="/tmp"))
            run_dir = short_dir
        run_dir.mkdir(exist_ok=True)

        cpus = cpus_per_node or max(2, os.cpu_count() or 1)
        mem = max(256, min(mem_per_node_mb, int(_mem_total_mb() * 0.9)))
        ctld_port, *ports = _free_ports(1 + len(NODES))
        conf_path = root / "etc" / "slurm.conf"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(conf_path)

        cluster = cls(
            root=root,
            conf_path=conf_path,
            nodes=NODES,
            partitions=("gpu", "debug"),
            gpus_per_node=GPUS_PER_NODE,
            cpus_per_node=cpus,
            mem_per_node_mb=mem,
            ctld_port=ctld_port,
            node_ports=dict(zip(NODES, ports, strict=True)),
            munge_socket=run_dir / "munge.socket",
            work_dir=root / "work",
            _env=env,
            _short_dir=short_dir,
        )
        preexec = _die_with_parent if die_with_parent else None
        try:
            cluster._write_files(run_dir, min_job_age)
            cluster._start_munged(preexec, timeout)
            cluster._start_slurm(preexec, timeout)
        except BaseException as exc:
            cluster.stop()
            if isinstance(exc, SlurmClusterError) and "Address already in use" in str(exc):
                raise _PortTakenError(str(exc)) from exc
            raise
        return cluster

    def _write_files(self, run_dir: Path, min_job_age: int) -> None:
        etc = self.conf_path.parent
        dirs = [etc, self.root / "munge", self.root / "state", self.root / "log"]
        dirs += [self.root / "dev", self.work_dir]
        dirs += [run_dir / f"spool-{node}" for node in self.nodes]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.root, etc, self.root / "munge", run_dir):
            d.chmod(0o755)  # munged refuses group/world-writable directories on its paths

        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        munge_user = pwd.getpwnam("munge")
        os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
        key.chmod(0o400)

        gres_lines = ["AutoDetect=off"]
        for i, node in enumerate(self.nodes):
            first = i * self.gpus_per_node
            for n in range(first, first + self.gpus_per_node):
                dev = self.root / "dev" / f"nvfake{n}"
                subprocess.run(["mknod", str(dev), "c", "1", "3"], check=True, capture_output=True)
            last = first + self.gpus_per_node - 1
            gres_lines.append(
                f"NodeName={node} Name=gpu Type=fake File={self.root}/dev/nvfake[{first}-{last}]"
            )
        (etc / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        # No cgroup.conf: proctrack/linuxproc and task/none use no cgroups.

        host = socket.gethostname().split(".")[0]
        log = self.root / "log"
        spool = run_dir / "spool-%n"
        node_names = f"{self.nodes[0][:-1]}[1-{len(self.nodes)}]"
        lines = [
            f"ClusterName={CLUSTER_NAME}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.node_ports[self.nodes[0]]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none",
            f"MailProg={shutil.which('true') or '/bin/true'}",
            "SwitchType=switch/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "GresTypes=gpu",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmctldPidFile={run_dir / 'slurmctld.pid'}",
            f"SlurmctldLogFile={log / 'slurmctld.log'}",
            f"SlurmdPidFile={run_dir / 'slurmd-%n.pid'}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmdLogFile={log / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"MinJobAge={min_job_age}",
            "KillWait=2",
            "CompleteWait=0",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0",
            f"DefMemPerCPU={self.mem_per_node_mb // self.cpus_per_node}",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 "
                f"Port={self.node_ports[node]} CPUs={self.cpus_per_node} Boards=1 "
                f"SocketsPerBoard=1 CoresPerSocket={self.cpus_per_node} ThreadsPerCore=1 "
                f"RealMemory={self.mem_per_node_mb} Gres=gpu:fake:{self.gpus_per_node} "
                "State=UNKNOWN"
            )
        lines.append(f"PartitionName=gpu Nodes={node_names} Default=YES MaxTime=INFINITE State=UP")
        lines.append(f"PartitionName=debug Nodes={node_names} MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str], preexec: Callable[[], None] | None) -> _Daemon:
        log = self.root / "log" / f"{name}.out"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
                preexec_fn=preexec,  # noqa: PLW1509 - PR_SET_PDEATHSIG only, no locks taken
            )
        daemon = _Daemon(name, popen, log)
        self._daemons.append(daemon)
        return daemon

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for d in self._daemons:
                if d.popen.poll() is not None:
                    raise SlurmClusterError(
                        f"{d.name} exited with {d.popen.returncode} while waiting for "
                        f"{what}\n{self.log_tails()}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                sinfo = self.run(["sinfo", "-N", "-l"], timeout=10)
                raise SlurmClusterError(
                    f"timed out after {timeout:.0f}s waiting for {what}\n"
                    f"sinfo -N -l: {sinfo.stdout}{sinfo.stderr}\n{self.log_tails()}"
                )
            time.sleep(0.1)

    def _start_munged(self, preexec: Callable[[], None] | None, timeout: float) -> None:
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--seed-file={m / 'munged.seed'}",  # in the foreground it logs to stderr
            ],
            preexec,
        )
        self._wait("munged's socket", self.munge_socket.is_socket, timeout)

    def _start_slurm(self, preexec: Callable[[], None] | None, timeout: float) -> None:
        ctld = self._spawn("slurmctld", ["slurmctld", "-D", "-i"], preexec)
        # Wait for slurmctld's own listening socket: clients must not reach someone else's.
        self._wait(
            f"slurmctld listening on port {self.ctld_port}",
            lambda: _listens(ctld.popen.pid, self.ctld_port),
            timeout,
        )
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node], preexec)
        self._wait("both nodes idle in sinfo", self._nodes_idle, timeout)

    def _nodes_idle(self) -> bool:
        try:
            proc = self.run(
                ["sinfo", "-h", "-N", "-p", self.partitions[0], "-o", "%N %t"], timeout=5
            )
        except subprocess.TimeoutExpired:
            return False
        if proc.returncode != 0:
            return False
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.nodes)

    # ------------------------------------------------------------------ use

    @property
    def daemon_pids(self) -> list[int]:
        """Process ids of munged, slurmctld and the two slurmd (children of this process)."""
        return [d.popen.pid for d in self._daemons]

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients: the caller's without ``SLURM_*``, plus ``SLURM_CONF``."""
        return dict(self._env)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster and capture its text output."""
        env = self.env
        if extra_env:
            env.update(extra_env)
        return subprocess.run(
            list(argv),
            env=env,
            cwd=cwd or self.work_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def sbatch(self, *args: str, timeout: float = 30.0) -> int:
        """``sbatch --parsable <args>``; the job id, or :class:`SlurmClusterError`."""
        proc = self.run(["sbatch", "--parsable", *args], timeout=timeout)
        if proc.returncode != 0:
            raise SlurmClusterError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str | None:
        """The job's state per ``scontrol show job``, or ``None`` once it was purged."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=10)
        if proc.returncode != 0:
            return None
        for item in proc.stdout.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return None

    def wait_job(self, job_id: int, timeout: float = 60.0) -> str | None:
        """Wait until the job left PENDING/RUNNING/COMPLETING; its last state (None: purged)."""
        deadline = time.monotonic() + timeout
        active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}
        while True:
            state = self.job_state(job_id)
            if state not in active:
                return state
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} still {state} after {timeout:.0f}s")
            time.sleep(0.2)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job slurmctld still knows (``squeue --json``: finished ones until purged)."""
        proc = self.run(["squeue", "--json"], timeout=30)
        if proc.returncode != 0:
            raise SlurmClusterError(f"squeue --json failed: {proc.stderr.strip()}")
        jobs: list[dict[str, Any]] = json.loads(proc.stdout)["jobs"]
        return jobs

    def cancel_all(self, timeout: float = 30.0) -> None:
        """Cancel every job and wait until none is pending, running or completing."""
        active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}
        ids = [str(j["job_id"]) for j in self.jobs() if j["job_state"] in active]
        if ids:
            self.run(["scancel", *ids], timeout=30)
        deadline = time.monotonic() + timeout
        while any(j["job_state"] in active for j in self.jobs()):
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"jobs still active {timeout:.0f}s after scancel")
            time.sleep(0.2)

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every daemon log (for error messages)."""
        parts = []
        log_dir = self.root / "log"
        for path in sorted(log_dir.glob("*")) if log_dir.is_dir() else []:
            parts.append(f"--- {path.name} ---\n{_tail(path, lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ stop

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster: its daemons, slurmstepd and job processes (by env)."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        found = {d.popen.pid for d in self._daemons if d.popen.poll() is None}
        me = os.getpid()
        for proc in psutil.process_iter():
            if proc.pid == me:
                continue
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.add(proc.pid)
            except OSError:
                continue
        for pid in list(found):
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        found.discard(me)
        return sorted(found)

    def stop(self) -> None:
        """Kill every daemon and job process of this cluster by pid. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        daemons = [d.popen.pid for d in self._daemons]
        # slurmstepd and the jobs it runs are re-parented to init and outlive slurmd: kill
        # them first (SIGKILL: test jobs get no grace), leaving the daemons' own children
        # (slurmscriptd) to their parents; then the daemons; then whatever is left.
        own = set(daemons)
        for pid in daemons:
            with contextlib.suppress(psutil.NoSuchProcess):
                own.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        _kill_pids([p for p in self.leftover_pids() if p not in own])
        _stop_pids([d.popen.pid for d in self._daemons if d.name != "munged"], grace=5)
        _kill_pids([p for p in self.leftover_pids() if p not in daemons])
        _stop_pids([d.popen.pid for d in self._daemons if d.name == "munged"], grace=5)
        for d in self._daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.popen.wait(timeout=5)
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
