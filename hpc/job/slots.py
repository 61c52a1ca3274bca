"""A swap pool's slots: which model each holds, and loading one in place of another.

Runs in one asyncio loop, so a slot's fields change only between awaits and need no lock.
A load is a task keyed by model name, so every request for a model that is being loaded
awaits the same task (one load, however many requests). Slots are independent: a load in
one slot awaits only its own engine, never another slot's requests.

Eviction picks the least recently used ``ready`` slot, idle ones first; a slot with
requests in flight is marked ``draining`` (no new requests) and stopped only once they have
all finished. A slot whose model has requests about to enter it (they were waiting for its
load) is never the victim, so two models cannot evict each other before either answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Literal

import aiohttp

from hpc.errors import EngineError, MTError, PoolLoadError
from hpc.job.engineproc import LogPump, start_engine
from hpc.job.engines import EngineLaunch, build_launch
from hpc.job.jobdir import JobDir
from hpc.job.plan import PoolPlan
from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree
from hpc.registry import new_api_key
from hpc.spec import ModelSpec

SlotState = Literal["empty", "loading", "ready", "draining"]
_HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=2)

# build_launch's signature: tests may pass another launcher in its place.
Launcher = Callable[..., EngineLaunch]


def split_gpus(environ: Mapping[str, str], slots: int) -> list[tuple[str, ...]]:
    """The allocation's GPUs (CUDA_VISIBLE_DEVICES) split evenly, in order, between slots."""
    visible = environ.get("CUDA_VISIBLE_DEVICES") or environ.get("ROCR_VISIBLE_DEVICES") or ""
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if not devices:
        return [() for _ in range(slots)]
    if len(devices) % slots:
        raise EngineError(
            f"the allocation has {len(devices)} GPUs ({visible}), which cannot be split "
            f"evenly between {slots} slots",
            hint="make resources.gpus of the pool a multiple of its slots",
        )
    per = len(devices) // slots
    return [tuple(devices[i * per : (i + 1) * per]) for i in range(slots)]


@dataclass
class Slot:
    """One GPU set and the model loaded on it (if any)."""

    index: int
    gpus: tuple[str, ...]
    state: SlotState = "empty"
    model: str | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 0
    last_load_s: float | None = None
    last_error: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    pump: LogPump | None = field(default=None, repr=False)
    # The engine's 0700 directory and a client on the Unix socket in it (hpc.job.jobdir):
    # only the pool can reach its engines.
    home: JobDir | None = field(default=None, repr=False)
    session: aiohttp.ClientSession | None = field(default=None, repr=False)
    key: str = field(default="", repr=False)

    def url(self, path: str) -> str:
        """The engine's URL for ``path`` (``/v1/chat/completions``), through ``session``."""
        return "http://engine" + path

    def client(self) -> aiohttp.ClientSession:
        """The session to the loaded engine's socket."""
        if self.session is None:
            raise PoolLoadError(self.model or "?", "the slot's engine is not running")
        return self.session

    def status(self, now: float) -> dict[str, object]:
        """What `GET /pool/status` shows of this slot."""
        idle = self.state == "ready" and self.in_flight == 0
        return {
            "slot": self.index,
            "gpus": ",".join(self.gpus),
            "model": self.model,
            "state": self.state,
            "in_flight": self.in_flight,
            "idle_s": round(now - self.last_used, 1) if idle else 0.0,
            "loads": self.loads,
            "last_load_s": None if self.last_load_s is None else round(self.last_load_s, 2),
            "engine_pid": self.proc.pid if self.proc is not None else None,
            "last_error": self.last_error,
        }


class Slots:
    """The pool's slots and the loads in flight; ``acquire``/``release`` around each request."""

    def __init__(
        self,
        plan: PoolPlan,
        environ: Mapping[str, str],
        out: IO[str],
        launcher: Launcher | None = None,
    ) -> None:
        self.plan = plan
        self.specs = {spec.name: spec for spec in plan.catalogue}
        self.environ = environ
        self.out = out
        # The llama.cpp server chosen at submit (hpc.llamacppserver), if the plan names one.
        self.launcher = launcher or functools.partial(build_launch, llamacpp=plan.llamacpp)
        self.slots = [Slot(i, gpus) for i, gpus in enumerate(split_gpus(environ, plan.pool.slots))]
        self.model_loads: collections.Counter[str] = collections.Counter()
        self._loads: dict[str, asyncio.Task[Slot]] = {}
        self._waiting: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()
        self.stopping = False

    def _say(self, message: str) -> None:
        self.out.write(f"[mt swappool] {message}\n")
        self.out.flush()

    def _notify(self) -> None:
        """Wake everything waiting for a slot to change (a fresh event for the next wait)."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- requests -------------------------------------------------------------------------
    def serving(self, model: str) -> Slot | None:
        """The ready slot holding ``model``, if any."""
        return next((s for s in self.slots if s.model == model and s.state == "ready"), None)

    def loading_slot(self, model: str) -> Slot | None:
        """The slot ``model`` is being loaded into, if a slot has been claimed for it."""
        return next((s for s in self.slots if s.model == model and s.state == "loading"), None)

    async def acquire(self, model: str) -> Slot:
        """A ready slot serving ``model`` with this request counted in; loads it if needed.

        Raises PoolLoadError when the load fails (every request waiting for it gets it).
        """
        while True:
            if self.stopping:
                raise PoolLoadError(model, "the pool is stopping")
            slot = self.serving(model)
            if slot is not None:
                slot.in_flight += 1
                slot.last_used = time.monotonic()
                return slot
            task = self._loads.get(model)
            if task is None:
                task = asyncio.create_task(self._load(model), name=f"load {model}")
                self._loads[model] = task
                task.add_done_callback(self._load_done)
            self._waiting[model] += 1
            try:
                # Shielded: a client that gives up does not cancel the others' load.
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if self.stopping and task.cancelled():  # stop_all cancelled the load
                    raise PoolLoadError(model, "the pool is stopping") from None
                raise
            finally:
                self._waiting[model] -= 1

    def _load_done(self, task: asyncio.Task[Slot]) -> None:
        for model, pending in list(self._loads.items()):
            if pending is task:
                del self._loads[model]
        if not task.cancelled():
            task.exception()  # retrieved here, so a load nobody awaits logs no warning

    def release(self, slot: Slot) -> None:
        """A request on ``slot`` has ended."""
        slot.in_flight -= 1
        slot.last_used = time.monotonic()
        self._notify()

    # -- loading ----------------------------------------------------------------------------
    async def _load(self, model: str) -> Slot:
        spec = self.specs[model]
        asked = time.monotonic()
        slot = await self._claim(model)
        started = time.monotonic()
        self._say(f"slot {slot.index}: loading {model} (slot free after {started - asked:.2f}s)")
        try:
            await self._start(slot, spec)
        except BaseException as exc:
            await self._unload(slot)
            slot.last_error = exc.message if isinstance(exc, MTError) else repr(exc)
            self._say(f"slot {slot.index}: load of {model} failed: {slot.last_error}")
            raise
        slot.state = "ready"
        slot.loads += 1
        slot.last_load_s = time.monotonic() - started
        slot.last_used = time.monotonic()
        slot.last_error = None
        self.model_loads[model] += 1
        self._say(f"slot {slot.index}: {model} ready in {slot.last_load_s:.2f}s")
        self._notify()
        return slot

    async def _claim(self, model: str) -> Slot:
        """A slot for ``model``: an empty one, or the LRU one once its requests are done."""
        while True:
            if self.stopping:
                raise PoolLoadError(model, "the pool is stopping")
            changed = self._changed
            empty = next((s for s in self.slots if s.state == "empty"), None)
            if empty is not None:
                empty.state, empty.model = "loading", model
                self._notify()
                return empty
            victims = [
                s for s in self.slots if s.state == "ready" and not self._waiting[s.model or ""]
            ]
            if victims:
                slot = min(victims, key=lambda s: (s.in_flight > 0, s.last_used))
                self._say(f"slot {slot.index}: evicting {slot.model} for {model}")
                slot.state = "draining"
                self._notify()
                while slot.in_flight:
                    await self._changed.wait()
                await self._unload(slot)
                slot.state, slot.model = "loading", model
                self._notify()
                return slot
            await changed.wait()

    def _slot_environ(self, slot: Slot) -> dict[str, str]:
        env = dict(self.environ)
        if slot.gpus:
            for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
                if name in env or name == "CUDA_VISIBLE_DEVICES":
                    env[name] = ",".join(slot.gpus)
        return env

    def _slot_spec(self, slot: Slot, spec: ModelSpec) -> ModelSpec:
        """The model as this slot runs it: the slot's GPU count, the pool's runtime if set."""
        update: dict[str, object] = {
            "resources": spec.resources.model_copy(update={"gpus": len(slot.gpus)})
        }
        if self.plan.pool.runtime is not None:
            update["runtime"] = self.plan.pool.runtime
        return spec.model_copy(update=update)

    async def _start(self, slot: Slot, spec: ModelSpec) -> None:
        env = self._slot_environ(slot)
        key = new_api_key()  # the engine's own: only this pool ever sends it
        slot.home = JobDir(prefix="mt-slot-")
        listen = slot.home.socket_path()
        launch = self.launcher(self._slot_spec(slot, spec), listen=listen, api_key=key, environ=env)
        self._say(f"slot {slot.index}: starting engine: " + " ".join(launch.argv))
        try:
            slot.proc, slot.pump = start_engine(launch, env, self.out, key)
        except OSError as exc:
            slot.home.remove()
            slot.home = None
            raise PoolLoadError(spec.name, f"cannot start {launch.argv[0]}: {exc}") from exc
        slot.key = key
        slot.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(listen), limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        probe_key = key if launch.health_needs_key else None
        outcome = await self._await_health(slot, slot.url(launch.health_path), probe_key, spec)
        if outcome == "healthy":
            return
        tail = await self._stop_engine(slot)
        reason = (
            "engine exited before it was healthy"
            if outcome == "exited"
            else f"engine not healthy within startup_timeout_s={spec.startup_timeout_s:g}"
        )
        raise PoolLoadError(spec.name, reason, tail)

    async def _await_health(
        self, slot: Slot, url: str, key: str | None, spec: ModelSpec
    ) -> Literal["healthy", "exited", "timeout"]:
        deadline = time.monotonic() + spec.startup_timeout_s
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        interval = 0.05  # as the job wrapper: often at first, then back off to 2 s
        while time.monotonic() < deadline:
            if self.stopping:
                raise PoolLoadError(spec.name, "the pool is stopping")
            if slot.proc is None or slot.proc.poll() is not None:
                return "exited"
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                get = slot.client().get(url, headers=headers, timeout=_HEALTH_TIMEOUT)
                async with get as response:
                    if response.status == 200:
                        return "healthy"
            await asyncio.sleep(interval)
            interval = min(interval * 1.25, 2.0)
        return "timeout"

    async def _stop_engine(self, slot: Slot) -> list[str]:
        """Stop the slot's engine tree (in a thread: it waits out the grace period)."""
        proc, pump, home, session = slot.proc, slot.pump, slot.home, slot.session
        slot.proc = slot.pump = slot.home = slot.session = None
        slot.key = ""
        if session is not None:
            await session.close()
        if proc is None:
            if home is not None:
                home.remove()
            return []
        grace_s = self.plan.stop_grace_s
        await asyncio.to_thread(stop_tree, proc.pid, grace_s=grace_s, sig=ENGINE_STOP_SIGNAL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, 5)
        if home is not None:
            home.remove()
        return await asyncio.to_thread(pump.join) if pump is not None else []

    async def _unload(self, slot: Slot) -> None:
        if slot.proc is not None:
            self._say(f"slot {slot.index}: stopping {slot.model}")
        await self._stop_engine(slot)
        slot.state, slot.model = "empty", None
        self._notify()

    # -- housekeeping -------------------------------------------------------------------------
    async def tend(self, every_s: float = 0.5) -> None:
        """Forever: free slots whose engine died, unload models idle past idle_unload_s."""
        idle_limit = self.plan.pool.idle_unload_s
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for slot in self.slots:
                if slot.state != "ready" or slot.proc is None:
                    continue
                if slot.proc.poll() is not None:
                    slot.last_error = f"engine exited with code {slot.proc.returncode}"
                    self._say(f"slot {slot.index}: {slot.model}: {slot.last_error}")
                    await self._unload(slot)
                elif (
                    idle_limit is not None
                    and slot.in_flight == 0
                    and not self._waiting[slot.model or ""]
                    and now - slot.last_used > idle_limit
                ):
                    self._say(f"slot {slot.index}: {slot.model} idle for {idle_limit:g}s")
                    slot.state = "draining"
                    await self._unload(slot)

    def in_flight(self) -> int:
        """Requests in the pool's engines or waiting for a model's load."""
        return sum(s.in_flight for s in self.slots) + sum(self._waiting.values())

    async def stop_all(self) -> None:
        """Stop every engine (the pool is ending); loads in flight give up."""
        self.stopping = True
        for task in list(self._loads.values()):
            task.cancel()
        for slot in self.slots:
            slot.state = "draining" if slot.state != "empty" else "empty"
        self._notify()
        await asyncio.gather(*(self._unload(s) for s in self.slots if s.proc is not None))

    def status(self) -> dict[str, object]:
        """Slots and catalogue, as `GET /pool/status` returns them."""
        now = time.monotonic()
        loaded = {s.model: s.index for s in self.slots if s.model and s.state == "ready"}
        return {
            "pool": self.plan.pool.name,
            "idle_unload_s": self.plan.pool.idle_unload_s,
            "slots": [slot.status(now) for slot in self.slots],
            "catalogue": [
                {
                    "model": spec.name,
                    "engine": spec.engine,
                    "slot": loaded.get(spec.name),
                    "loads": self.model_loads[spec.name],
                    "loading": spec.name in self._loads,
                }
                for spec in self.plan.catalogue
            ],
        }
