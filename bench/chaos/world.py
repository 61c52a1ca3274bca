"""One soak world: a private ``$MT_HOME`` with its registry on a small tmpfs, the Gemma
model on demand, and a real ``mt gateway`` for one backend on a fixed loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.backends import get_scheduler
from hpc.jobs import handle_of
from hpc.ownerkey import owner_key_path, read_owner_key
from hpc.registry import Record, Registry
from hpc.site import load_site

MODEL = "gemma-3-270m"
REPLICAS = 1  # the model's on_demand.max_replicas: more live jobs than this is a duplicate
LIVE = ("pending", "running")
START_DEADLINE_S = 200  # the model's on_demand.start_deadline_s (a requeue waits ~2 min)
FIRST_TOKEN_S = 90  # the gateway's --first-token-timeout
# A non-streaming request gets no byte while it waits for a cold start, then the answer:
# it may be silent this long before it counts as hung.
PLAIN_SILENCE_S = START_DEADLINE_S + FIRST_TOKEN_S + 30


def free_port() -> int:
    """A loopback port nobody listens on now (kept for every gateway of the world)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class World:
    """Everything of one backend's soak, under ``root``."""

    backend: str
    root: Path
    gguf: Path
    minutes: float
    base_env: dict[str, str]
    port: int = field(default_factory=free_port)
    gateway: subprocess.Popen[str] | None = None
    tmpfs: bool = False
    gateway_starts: int = 0
    tunnel: Any = None  # bench.chaos.tunnel.Tunnel, when the soak runs one
    drop_link: Callable[[], int] | None = None  # kills the tunnel's ssh sessions

    @property
    def home(self) -> Path:
        """The world's ``$MT_HOME``."""
        return self.root / "home"

    def owner_key(self) -> str:
        """The gateway's owner key (made by its first start): what the clients send."""
        return read_owner_key(owner_key_path(self.home))

    @property
    def registry_dir(self) -> Path:
        """The registry: a tmpfs mounted here when run as root (for the disk-full fault)."""
        return self.home / "registry"

    @property
    def gateway_log(self) -> Path:
        """Every gateway's output, appended across restarts."""
        return self.root / "gateway.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment every ``mt`` of this world runs with."""
        return {
            **self.base_env,
            "MT_HOME": str(self.home),
            "MT_MODELS": str(self.root / "models.yaml"),
        }

    def registry(self) -> Registry:
        """The world's registry."""
        return Registry(self.registry_dir)

    def records(self) -> list[Record]:
        """Every record of the world (none if the registry cannot be read just now)."""
        with contextlib.suppress(OSError, RuntimeError):
            return self.registry().records()
        return []

    # -- set-up and tear-down ---------------------------------------------------------------
    def prepare(self) -> None:
        """Write models.yaml; mount the registry's tmpfs when root."""
        self.home.mkdir(mode=0o700, parents=True)
        self.registry_dir.mkdir(mode=0o700)
        spec = {
            "name": MODEL,
            "engine": "llamacpp",
            "weights": {"source": str(self.gguf)},
            "engine_args": ["--ctx-size", "512"],
            "startup_timeout_s": 120,
            "resources": {
                "cpus": 1,
                "mem_gb": 1,
                "time_limit_min": int(self.minutes) + 15,
            },
            # a requeued job comes back (the soak's requeue fault); the local backend has none
            **({"slurm": {"requeue": True}} if self.backend == "slurm" else {}),
            "on_demand": {
                "idle_ttl_s": 10,
                "start_deadline_s": START_DEADLINE_S,
                "max_replicas": REPLICAS,
            },
        }
        (self.root / "models.yaml").write_text(json.dumps({"models": [spec]}), encoding="utf-8")
        if os.geteuid() == 0:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", self.registry_dir],
                check=True,
            )
            self.tmpfs = True

    def unmount(self) -> None:
        """Unmount the registry's tmpfs (its records are gone with it)."""
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.registry_dir)], check=False)
            self.tmpfs = False

    # -- the gateway ---------------------------------------------------------------------------
    def start_gateway(self, timeout_s: float = 60) -> None:
        """Start ``mt gateway`` on the world's port (retrying while the old one lets go)."""
        deadline = time.monotonic() + timeout_s
        while True:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hpc.cli",
                    "gateway",
                    *("--port", str(self.port), "--backend", self.backend),
                    *("--idle-timeout", "20", "--first-token-timeout", str(FIRST_TOKEN_S)),
                    *("--shutdown-grace", "5", "--health-interval", "2"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env,
                start_new_session=True,
            )
            listening = threading.Event()
            threading.Thread(target=self._pump, args=(proc, listening), daemon=True).start()
            while not listening.wait(0.1) and proc.poll() is None:
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            if listening.is_set():
                self.gateway = proc
                self.gateway_starts += 1
                return
            proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.backend} gateway did not start: see {self.gateway_log}")
            time.sleep(1)

    def stop_gateway(self) -> int | None:
        """SIGTERM the gateway and wait for it; its exit code."""
        proc, self.gateway = self.gateway, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def _pump(self, proc: subprocess.Popen[str], listening: threading.Event) -> None:
        for line in proc.stdout or ():
            self._log(line)
            if "listening on" in line:
                listening.set()

    def _log(self, text: str) -> None:
        with self.gateway_log.open("a", encoding="utf-8") as out:
            out.write(text)

    # -- the scheduler's view ----------------------------------------------------------------
    def live_jobs(self) -> list[Record]:
        """Records meant to serve (pending/starting/ready) whose job is queued or running."""
        wanted = [r for r in self.records() if r.state in ("pending", "starting", "ready")]
        if not wanted:
            return []
        site = load_site(None, self.env)
        try:
            status = get_scheduler(self.backend, site).status([handle_of(r) for r in wanted])
        except Exception:  # noqa: BLE001 - a scheduler hiccup is no evidence either way
            return []
        return [r for r in wanted if r.job_id in status and status[r.job_id].state in LIVE]

    def mt(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``mt`` of this world."""
        return subprocess.run(
            [sys.executable, "-m", "hpc.cli", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
