"""The on-demand controller: submit, adopt, scale out and in, reap; no HTTP here.

Refusals are ``ErrorReply`` values (``refusals``); the waiting requests' side (keep-alives,
503s, in-band errors) is ``wait``. The check-and-start runs on the event loop without
awaiting in between, so the first request of a burst creates the one submit task and every
later one joins it. Backend calls block (sbatch, a Kubernetes API call, squeue), so each
runs in a worker thread; the event loop only waits. A monitor task reads the records of the
gateway's own jobs every ``on_demand_poll_s`` (and asks the scheduler every few seconds:
``observe``), cancels idle jobs, and publishes the state file (``statefile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway.config import GatewayConfig
from gateway.logs import LOGGER_NAME, fields
from gateway.ondemand.jobs import Asker, ModelState, OwnJob, client_of, is_own, started_by
from gateway.ondemand.observe import job_failure, observe
from gateway.ondemand.refusals import (
    failed,
    gateway_at_capacity,
    key_at_limit,
)
from gateway.ondemand.statefile import state_document, write_state
from gateway.routes import Upstream
from hpc.backends import Backend, JobHandle, JobStatus
from hpc.errors import MTError
from hpc.ondemandstate import read_ondemand_state
from hpc.openai import ErrorReply
from hpc.reconcile import ENDED, settle
from hpc.registry import FINAL_STATES, Record, Registry, record_key
from hpc.spec import ModelsFile, ModelSpec
from hpc.specserving import OnDemand

log = logging.getLogger(f"{LOGGER_NAME}.ondemand")

# squeue for the pending reason this often, not at every record read: a busy controller
# must not see a call per poll from every gateway.
SCHEDULER_EVERY_S = 3.0


class OnDemandController:
    """Starts, watches and stops the jobs of on-demand models for one gateway app."""

    def __init__(
        self,
        config: GatewayConfig,
        backend: Backend | None,
        models: Callable[[], ModelsFile | None],
        outstanding: Callable[[str], int] = lambda _source: 0,
    ) -> None:
        """``models`` gives the live models.yaml; ``outstanding`` the requests in flight
        to a replica (the balancer counts them), which says which replica is busy."""
        self.config = config
        self.backend = backend
        self.outstanding = outstanding
        self.state_file = config.state_file()
        self.registry = Registry(config.registry_dir)
        self._models = models
        self._specs_of: ModelsFile | None = None
        self._specs: dict[str, ModelSpec] = {}
        self.states: dict[str, ModelState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._asked_at = 0.0
        self._dirty = True
        self._busy: tuple[tuple[str, int], ...] = ()
        self.closing = False  # the gateway stops: requests still waiting are refused

    def refuse_waiters(self) -> None:
        """The gateway's shutdown grace is over: every request still waiting is refused."""
        self.closing = True
        for state in self.states.values():
            state.notify()

    # -- what the proxy calls -----------------------------------------------------------
    def manages(self, model: str) -> bool:
        """True for a model this gateway may start on demand, or whose job it started."""
        if self.backend is None:
            return False
        state = self.states.get(model)
        return self.spec(model) is not None or (state is not None and bool(state.jobs))

    def spec(self, model: str) -> ModelSpec | None:
        """The model's spec if it is on demand (rebuilt only when models.yaml changed)."""
        models = self._models()
        if models is not self._specs_of:
            self._specs_of = models
            self._specs = {
                spec.name: spec for spec in (models.models if models else ()) if spec.on_demand
            }
        return self._specs.get(model)

    def last_starts(self) -> dict[str, float]:
        """How long each model's last start took (submit to ready), where one is known."""
        return {
            name: state.last_start_s
            for name, state in self.states.items()
            if state.last_start_s is not None
        }

    def enter(self, model: str, asker: Asker) -> ModelState:
        """Count a request for ``model`` in (until ``leave``); its state, to wait on."""
        state = self._state(model)
        state.in_flight += 1
        state.last_request = asker
        self._touch(state)
        return state

    def leave(self, state: ModelState, used: str | None) -> None:
        """Count the request out; ``used`` is the replica that answered it, if one did."""
        state.in_flight -= 1
        job = state.jobs.get(used or "")
        if job is not None:
            job.used_at = time.time()
        self._touch(state)

    def ready(
        self, state: ModelState, candidates: tuple[Upstream, ...], asker: Asker
    ) -> tuple[Upstream, ...]:
        """The model's ready replicas (``candidates`` are the route table's); when there
        are some, one more is started if they carry more than their target."""
        ready = state.ready_with(candidates)
        spec = self.spec(state.name)
        if ready and spec is not None and spec.on_demand is not None:
            self._scale_out(state, spec, spec.on_demand, len(ready), asker)
        return ready

    # -- starting ------------------------------------------------------------------------
    def _state(self, model: str) -> ModelState:
        state = self.states.get(model)
        spec = self.spec(model)
        ttl = spec.on_demand.idle_ttl_s if spec and spec.on_demand else OnDemand().idle_ttl_s
        if state is None:
            state = self.states[model] = ModelState(model, ttl)
        state.idle_ttl_s = ttl  # follows models.yaml's reloads
        return state

    def _touch(self, state: ModelState) -> None:
        state.last_request_at = time.time()
        self._dirty = True

    def start(self, state: ModelState, spec: ModelSpec, asker: Asker) -> ErrorReply | None:
        """Start a job unless one is on its way; else None, or why not (a failure
        remembered, a cap). A waiting request asks again on every change of the model's
        state: a job that ended under it is started again.

        No await between the checks and the task's creation: concurrent requests cannot
        both see "nothing started" on one event loop.
        """
        if state.is_submitting() or state.live():
            return None
        loop = asyncio.get_running_loop()
        if state.failure is not None:
            if loop.time() < state.failure_until:
                return failed(state, loop.time())
            state.failure = None
        refused = self._gateway_limit(state) or self._key_limit(state, asker)
        if refused is not None:
            return refused
        self._start(state, spec, started_by(asker.request_id, state.name, asker.client))
        return None

    def _scale_out(
        self,
        state: ModelState,
        spec: ModelSpec,
        on_demand: OnDemand,
        ready: int,
        asker: Asker,
    ) -> None:
        """Start one more replica if every ready one carries more than its target of
        requests, none is on its way, and the model, the gateway and the key have room.

        A refusal here is silent: the ready replicas still answer; the next request (or
        the monitor's round) asks again.
        """
        live = state.live()
        if state.is_submitting() or any(not job.ready for job in live):
            return  # one start per model at a time
        if len(live) >= on_demand.max_replicas or state.in_flight <= (
            on_demand.target_in_flight * ready
        ):
            return
        if state.failure is not None:
            if asyncio.get_running_loop().time() < state.failure_until:
                return  # a start failed lately: no loop of submits
            state.failure = None
        if self._gateway_limit(state) or self._key_limit(state, asker):
            return
        load = f"{state.in_flight} in flight on {ready} replica{'' if ready == 1 else 's'}"
        self._start(state, spec, started_by(asker.request_id, state.name, asker.client, load))

    def _start(self, state: ModelState, spec: ModelSpec, why: str) -> None:
        task = asyncio.create_task(self._submit(state, spec, why), name=f"mt-on-demand-{spec.name}")
        state.submitting = task
        state.notify()
        self._dirty = True
        log.info("starting on demand", extra=fields(model=state.name, why=why))

    def _gateway_limit(self, state: ModelState) -> ErrorReply | None:
        cap = self.config.max_on_demand_jobs
        running = sum(len(s.live()) + s.is_submitting() for s in self.states.values())
        if cap is not None and running >= cap:
            return gateway_at_capacity(state.name, running, cap, self.config.retry_after_s)
        return None

    def _key_limit(self, state: ModelState, asker: Asker) -> ErrorReply | None:
        limit = asker.max_jobs
        if asker.client is None or limit is None:
            return None
        mine = sum(
            1 for s in self.states.values() for job in s.live() if job.client == asker.client
        )
        if mine < limit:
            return None
        return key_at_limit(state.name, asker.client, mine, limit, self.config.retry_after_s)

    async def _submit(self, state: ModelState, spec: ModelSpec, why: str) -> None:
        backend = self.backend
        if backend is None:  # manages() is False without one: never here
            return
        try:
            job = await asyncio.to_thread(self._submit_blocking, backend, spec, why)
        except (MTError, OSError) as exc:
            message = exc.message if isinstance(exc, MTError) else str(exc)
            hint = exc.hint if isinstance(exc, MTError) and exc.hint else None
            self._fail(
                state, f"submitting its job failed: {message}" + (f" ({hint})" if hint else "")
            )
            return
        state.jobs[job.key] = job
        log.info("submitted on demand", extra=fields(model=state.name, job=job.key))
        state.notify()
        self._dirty = True

    def _submit_blocking(self, backend: Backend, spec: ModelSpec, why: str) -> OwnJob:
        """Submit with ``started_by``: the record says it is the gateway's from the start."""
        handle = backend.submit(spec, started_by=why)
        key = record_key(handle.backend, handle.job_id)
        return OwnJob(key, handle, time.time(), why, client_of(why), self.registry.read(key))

    def _fail(self, state: ModelState, message: str) -> None:
        loop = asyncio.get_running_loop()
        state.failure = message
        state.failed_at = time.time()
        state.failure_until = loop.time() + self.config.on_demand_failure_backoff_s
        log.warning("on-demand start failed", extra=fields(model=state.name, error=message))
        state.notify()
        self._dirty = True

    # -- watching and stopping -----------------------------------------------------------
    async def adopt(self) -> None:
        """Take over the live jobs a previous gateway started on demand (their records say)."""
        records = await asyncio.to_thread(self.registry.records)
        # How long the previous gateway's last starts took: still the best guess of the next.
        previous = await asyncio.to_thread(read_ondemand_state, self.state_file)
        for model, entry in previous.items():
            if entry.last_start_s is not None and self.spec(model) is not None:
                self._state(model).last_start_s = entry.last_start_s
        now = time.time()
        for record in records:
            if record.state in FINAL_STATES or not is_own(record):
                continue
            why = str(record.started_by)
            handle = JobHandle(record.backend, record.job_id, record.nonce)
            state = self._state(record.model)
            state.jobs[record.key] = OwnJob(
                record.key, handle, record.created_at, why, client_of(why), record, used_at=now
            )
            # A full idle period from now: the old gateway's request times are lost.
            state.last_request_at = now
            log.info("adopted on-demand job", extra=fields(model=record.model, job=record.key))

    async def run(self) -> None:
        """Watch the jobs, cancel idle ones, publish the state file; until cancelled."""
        while True:
            await asyncio.sleep(self.config.on_demand_poll_s)
            try:
                await self.tick()
            except Exception:
                # One bad round must not end watching for good (nothing would be stopped).
                log.exception("on-demand round failed")

    async def tick(self) -> None:
        """One round: refresh job records, forget ended jobs, cancel idle ones, publish."""
        jobs = [job for state in self.states.values() for job in state.jobs.values()]
        if jobs and self.backend is not None:
            loop = asyncio.get_running_loop()
            ask = loop.time() - self._asked_at >= SCHEDULER_EVERY_S
            if ask:
                self._asked_at = loop.time()
            seen = await asyncio.to_thread(self._observe, self.backend, jobs, ask)
            for state in list(self.states.values()):
                self._apply(state, seen)
        self._scale_out_all()
        self._reap()
        busy = tuple(
            (key, self.outstanding(key)) for state in self.states.values() for key in state.jobs
        )
        if busy != self._busy:  # requests moved between replicas: the file shows each one's
            self._busy = busy
            self._dirty = True
        if self._dirty:
            self._dirty = False
            await self.publish()

    def _observe(
        self, backend: Backend, jobs: list[OwnJob], ask: bool
    ) -> dict[str, tuple[Record | None, JobStatus | None]]:
        """``observe``, and the records of jobs that ended unfinished finished. Blocking."""
        seen = observe(self.registry, backend, jobs, ask)
        for key, (record, status) in seen.items():
            if status is not None and status.state in ENDED and record is not None:
                # The job ended without finishing its record (killed, never ran):
                # hpc.reconcile.settle ends it, as `mt status` would.
                seen[key] = (settle(self.registry, record, status), status)
        return seen

    def _apply(
        self, state: ModelState, seen: dict[str, tuple[Record | None, JobStatus | None]]
    ) -> None:
        before = (state.phase(), len(state.upstreams()))
        for key, job in list(state.jobs.items()):
            if key not in seen:
                continue
            was_ready = job.served or job.ready
            failed_start, ended = job.observe(*seen[key])
            if job.ready and not was_ready:
                # What a user waits for on a cold start: from submit (queue wait included).
                state.last_start_s = round(max(0.0, time.time() - job.started_at), 1)
                self._dirty = True
            if failed_start and job.record is not None:
                self._fail(state, job_failure(job.record))
            if ended:
                state.retire(key)
                self._dirty = True
                log.info(
                    "on-demand job ended",
                    extra=fields(model=state.name, job=key, state=job.record and job.record.state),
                )
        if (state.phase(), len(state.upstreams())) != before:
            state.notify()
            self._dirty = True

    def _scale_out_all(self) -> None:
        """Scale out for load that stays: requests already in flight arrive no more."""
        for state in self.states.values():
            spec = self.spec(state.name)
            ready = len(state.upstreams()) + state.others
            if spec and spec.on_demand and ready and state.last_request is not None:
                self._scale_out(state, spec, spec.on_demand, ready, state.last_request)

    def _reap(self) -> None:
        """Cancel idle extra replicas one by one, then the last one when the model is idle."""
        if self.backend is None:
            return
        now = time.time()
        for state in self.states.values():
            live = state.live()
            if not live or state.is_submitting():
                continue
            model_idle = not state.in_flight and (
                state.last_request_at is None or now - state.last_request_at >= state.idle_ttl_s
            )
            if len(live) > 1:
                spec = self.spec(state.name)
                target = spec.on_demand.target_in_flight if spec and spec.on_demand else 0
                left = max(len(state.upstreams()) + state.others - 1, 0)
                if target and state.in_flight > target * left:
                    continue  # the others would be over target: it would only start again
                extra = state.idle_extra(live, now, model_idle, self.outstanding)
                if extra is not None:
                    self._stop(self.backend, state, extra, now - extra.used_at)
            elif model_idle:
                self._stop(self.backend, state, live[0], now - (state.last_request_at or now))

    def _stop(self, backend: Backend, state: ModelState, job: OwnJob, idle: float) -> None:
        job.stopping = True
        task = asyncio.create_task(self._cancel(backend, state, job, idle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        state.notify()
        self._dirty = True

    async def _cancel(self, backend: Backend, state: ModelState, job: OwnJob, idle: float) -> None:
        log.info(
            "cancelling idle on-demand job",
            extra=fields(model=state.name, job=job.key, idle_s=round(max(idle, 0.0), 1)),
        )
        try:
            await asyncio.to_thread(backend.cancel, job.handle)
        except MTError as exc:
            log.error(
                "could not cancel on-demand job",
                extra=fields(model=state.name, job=job.key, error=exc.message),
            )
            job.stopping = False  # the next round tries again
            return
        state.retire(job.key)
        state.notify()
        self._dirty = True

    async def close(self) -> None:
        """Stop the submit and cancel tasks (the jobs themselves keep running)."""
        tasks = [s.submitting for s in self.states.values() if s.submitting] + list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the state file ------------------------------------------------------------------
    async def publish(self) -> None:
        """Write the state file: the document taken on the loop, written in a thread."""
        backend = self.backend.name if self.backend is not None else None
        document = state_document(self.states, backend, self.outstanding)
        await asyncio.to_thread(write_state, self.state_file, document)
