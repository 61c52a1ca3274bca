"""Keeping one tunnel up for `mt tunnel`: in this process, in a detached one, and stopping it.

The library side of `mt tunnel open/close`: it opens the engine, checks /healthz through it,
reads the owner key over it (tunnels.access) into ``access`` and, if asked, an env file, keeps
the state file (tunnels.state) in step with the engine, starts a detached `mt tunnel`
and waits for its record, and stops a tunnel by its process id. It never prints or exits:
news goes to the caller's ``events``, failures are raised as MTError. A detached tunnel
that cannot come up says why in its record (state ``failed``), not in its log.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil

from hpc.errors import MTError
from hpc.privatefile import make_private_dir
from tunnels.access import Access, read_access, read_env_file, write_env_file
from tunnels.base import Events, TunnelSpec
from tunnels.engines import make_engine
from tunnels.health import check_healthz
from tunnels.state import TunnelFailure, TunnelRecord, TunnelStates

BACKGROUND_WAIT_S = 330.0  # the detached first login may wait for a 2FA code
_WATCH_S = 0.25
_STOP_WAIT_S = 10


def own_pid() -> int:
    """This process's id, as the state file records it."""
    return psutil.Process().pid


class HeldTunnel:
    """One tunnel held by this process; its record lives in ``states`` until :meth:`close`.

    ``detached``: this process was started by :func:`start_background`, so a failure to come
    up is left in the record for that command to report.
    """

    def __init__(
        self,
        spec: TunnelSpec,
        engine: str,
        states: TunnelStates,
        events: Events,
        *,
        detached: bool = False,
    ) -> None:
        self.spec = spec
        self.engine_name = engine
        self.states = states
        self.detached = detached
        self.engine = make_engine(engine, spec, events)
        self.record: TunnelRecord | None = None
        self.access = Access(base_url=f"{spec.url}/v1")
        self.key_problem: MTError | None = None  # why ``access`` has no key

    def open(self, *, check: bool, env_file: Path | None = None) -> TunnelRecord:
        """Connect, check /healthz through the tunnel (if ``check``), read the owner key
        (into ``env_file`` too, if given, before the record says ``up``), write the record."""
        try:
            return self._open(check, env_file)
        except MTError as exc:
            if self.detached:
                self.states.write(
                    self._record("failed", TunnelFailure(message=exc.message, hint=exc.hint))
                )
            raise

    def _open(self, check: bool, env_file: Path | None) -> TunnelRecord:
        self.engine.open()
        try:
            if check:
                check_healthz(self.spec)
            self.access, self.key_problem = read_access(self.engine, self.spec)
            if env_file is not None:
                write_env_file(env_file, self.access)
        except BaseException:
            self.engine.close()
            raise
        problem = self.key_problem
        notice = (
            None if problem is None else TunnelFailure(message=problem.message, hint=problem.hint)
        )
        self.record = self._record(self.engine.state, notice=notice)
        self.states.write(self.record)
        return self.record

    def _record(
        self,
        state: str,
        failure: TunnelFailure | None = None,
        *,
        notice: TunnelFailure | None = None,
    ) -> TunnelRecord:
        return TunnelRecord(
            local_port=self.spec.local_port,
            remote_port=self.spec.remote_port,
            host=self.spec.host,
            engine=self.engine_name,
            pid=own_pid(),
            url=self.spec.url,
            state=state,
            control_path=str(getattr(self.engine, "control_path", "")) or None,
            failure=failure,
            notice=notice,
        )

    def hold(self, stop: threading.Event) -> None:
        """Keep the record in step with the engine until ``stop``; raises why it failed."""
        if self.record is None:
            raise RuntimeError("hold() before open()")
        record = self.record
        last = (self.engine.state, self.engine.reconnects)
        while not stop.wait(_WATCH_S):
            now = (self.engine.state, self.engine.reconnects)
            if now != last:
                last = now
                self.states.write(record.model_copy(update={"state": now[0], "reconnects": now[1]}))
            if self.engine.state == "failed":
                failure = self.engine.error
                raise failure if failure is not None else MTError("the tunnel failed")

    def close(self) -> None:
        """Stop forwarding and forget the record (if it is still this process's)."""
        self.engine.close()
        self.states.remove(self.spec.local_port, pid=own_pid())


def start_background(argv: list[str], states: TunnelStates, local_port: int) -> TunnelRecord:
    """Start ``argv`` (a detached `mt tunnel open`), return its record once it is up.

    The detached tunnel writes the access (the owner key) to the ``--env-file`` in ``argv``
    before its record says ``up``: see :func:`background_access`.
    """
    make_private_dir(states.directory)  # a new MT_HOME too: 0700
    log = states.directory / f"{local_port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + BACKGROUND_WAIT_S
    while time.monotonic() < deadline:
        exited = proc.poll() is not None  # before reading: a record written before exit is seen
        record = states.read(local_port)
        if record is not None and record.pid == proc.pid:
            if record.state == "up":
                return record.model_copy(update={"log_file": str(log)})
            if record.failure is not None:
                states.remove(local_port, pid=proc.pid)
                raise MTError(record.failure.message, hint=record.failure.hint or f"see {log}")
        if exited:
            raise MTError(f"the background tunnel exited with {proc.returncode}", hint=f"see {log}")
        time.sleep(0.1)
    proc.terminate()
    raise MTError(
        f"the background tunnel was not up within {BACKGROUND_WAIT_S:g}s", hint=f"see {log}"
    )


def background_env_file(states: TunnelStates, local_port: int) -> Path:
    """Where a detached tunnel leaves the access for its starter when no --env-file is given
    (0600 in the 0700 state directory; the starter reads and removes it)."""
    return states.directory / f"{local_port}.env"


def background_access(env_file: Path, *, keep: bool) -> Access:
    """The access a detached tunnel wrote; the file is removed unless ``keep`` (the user's)."""
    try:
        return read_env_file(env_file)
    finally:
        if not keep:
            env_file.unlink(missing_ok=True)


def close_tunnels(states: TunnelStates, local_port: int | None, *, every: bool) -> list[int]:
    """End the tunnel on ``local_port`` (or the only one, or ``every`` one); their ports."""
    records = states.records()
    if local_port is not None:
        records = [r for r in records if r.local_port == local_port]
        if not records:
            raise MTError(f"no tunnel on local port {local_port}", hint="`mt tunnel status`")
    elif not every and len(records) > 1:
        ports = ", ".join(str(r.local_port) for r in records)
        raise MTError(f"several tunnels are open ({ports})", hint="name a port, or use --all")
    closed = []
    for record in records:
        stop_process(record)
        states.remove(record.local_port)
        closed.append(record.local_port)
    return closed


def stop_process(record: TunnelRecord) -> None:
    """SIGTERM the tunnel's process (if it is still `mt tunnel`), then SIGKILL after 10s."""
    try:
        proc = psutil.Process(record.pid)
        if "tunnel" not in proc.cmdline():
            return  # the pid was reused by something else: leave it alone
        proc.terminate()
        proc.wait(timeout=_STOP_WAIT_S)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        return
