"""Wall-time handover (``continuity: handover``), the job's side: when, to whom, and once.

A job with a time limit hands its model over to a successor job before the limit:

- **when**: ``lead_s`` before the job's end (``SLURM_JOB_END_TIME``, else the scheduler's
  end time), or at once when the scheduler's warning signal (``--signal=B:USR1@N``) comes
  first (the end time was unknown, or N is larger). ``lead_s`` is the spec's
  ``slurm.handover_lead_s``, else this job's own observed time-to-ready (staging, engine
  load) plus ``slurm.handover_margin_s`` plus the engine's stop allowance (stop grace + 5 s,
  hpc.job.plan): the successor, started then, is ready about ``margin`` before the
  predecessor's drain must end, which leaves that long for its streams to finish (and
  absorbs a successor that queues or loads slower than this job did).
- **once**: the successor's nonce is reserved in this job's record under the record's lock
  (hpc.recordlock) before anything is submitted; a wrapper signalled twice, or a second
  look, finds that nonce and looks the job up by it (``--comment=mt:<nonce>``) instead of
  submitting another. The successor's job id goes into the record too, written only while
  the record is not final: a job `mt cancel` ended meanwhile cancels the successor it just
  submitted instead of recording it.
- **never more than two**: a successor hands over in turn only once its own predecessor's
  record is final, so at most two jobs of the chain exist at any time.

What submits the successor is the scheduler's business (:class:`Successors`: Slurm's in
hpc.slurm.handover); this module only decides and keeps the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hpc.errors import MTError
from hpc.registry import FINAL_STATES, Record, Registry, new_nonce, record_key

# Between the successor's `ready` and the predecessor's `draining`: the gateway re-reads
# the registry every second, so it routes to the successor before it stops routing here.
SWITCH_SETTLE_S = 2.0
# How often the job looks (registry reads), and again after a Slurm command failed.
LOOK_S = 0.5
RETRY_S = 5.0


class Successors(Protocol):
    """What a handover needs from the scheduler (Slurm: hpc.slurm.handover)."""

    backend: str

    def end_time(self, job_id: str) -> float | None:
        """When the job's time limit ends (epoch seconds), None if the scheduler cannot say."""
        ...

    def find(self, nonce: str) -> str | None:
        """The id of the job submitted with ``nonce``, if the scheduler has one."""
        ...

    def submit(self, nonce: str, predecessor: str) -> str:
        """Submit the successor (same spec, a new ``nonce``); returns its job id."""
        ...

    def cancel(self, job_id: str) -> None:
        """Cancel a successor nobody will use (its predecessor was cancelled meanwhile)."""
        ...


def lead_s(ready_s: float, margin_s: float, fixed_s: float | None, stop_s: float) -> float:
    """How long before the end the successor is submitted: ``fixed_s`` if set, else the
    observed time-to-ready, plus the margin (in which the predecessor's streams finish, and
    which absorbs a successor slower to start), plus ``stop_s`` (the engine's stop grace
    and its margin: the drain ends that long before the limit)."""
    return fixed_s if fixed_s is not None else ready_s + margin_s + stop_s


def end_from_env(environ: Mapping[str, str]) -> float | None:
    """``SLURM_JOB_END_TIME`` (epoch seconds; Slurm 23.02 and later), if set."""
    raw = environ.get("SLURM_JOB_END_TIME", "")
    return float(raw) if raw.isdigit() else None


@dataclass
class Handover:
    """One job's handover: decides when it is due, submits the successor once, watches it,
    and tells the job wrapper when to drain (:meth:`step`)."""

    successors: Successors
    registry: Registry
    job_id: str
    lead_s: float
    say: Callable[[str], None]
    end_at: float | None = None  # epoch seconds
    successor: str | None = None
    warned_at: float | None = None  # monotonic: the warning signal came (it starts it)
    over: bool = False  # no successor will come (it failed, or this job was cancelled)
    end_deadline: float | None = None  # monotonic: this job's drain must end by then
    _switch_at: float | None = None  # monotonic: drain then (the successor is ready)
    _next_look: float = 0.0

    def start(
        self,
        ready_s: float,
        margin_s: float,
        fixed_s: float | None,
        stop_s: float,
        environ: Mapping[str, str],
    ) -> float | None:
        """At ``ready``: size the lead (:func:`lead_s`), learn the end, and return when the
        successor is due (None while the end is unknown: the warning signal starts it)."""
        self.lead_s = lead_s(ready_s, margin_s, fixed_s, stop_s)
        try:
            at = self.schedule(environ)
        except MTError as exc:
            self.say(f"handover: cannot learn the job's end time: {exc.message}")
            at = None
        if self.end_at is not None:
            self.end_deadline = time.monotonic() + (self.end_at - time.time()) - stop_s
        return at

    def warn(self) -> None:
        """The time-limit warning came (a signal handler calls this: it only notes it)."""
        if self.warned_at is None:
            self.warned_at = time.monotonic()

    def warning_deadline(self, budget_s: float) -> float | None:
        """Without a known end, the drain must end ``budget_s`` after the warning."""
        if self.end_deadline is None and self.warned_at is not None:
            return self.warned_at + budget_s
        return None

    def step(self, warning_budget_s: float) -> bool:
        """One look (at most every ``LOOK_S``): submit when due, watch the successor; True
        when this job should drain now (its successor is ready and the gateway saw it, or
        its end is near without one: half the warning's budget, or 2 s before the end
        deadline)."""
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_S
        if not self.over and self.successor is None and self.due(warned=self.warned_at is not None):
            try:
                if self.submit() is None:  # this job was ended (mt cancel): no successor
                    self.over = True
            except MTError as exc:  # the nonce is reserved: the next look finds or submits
                self.say(f"handover: cannot submit the successor yet: {exc.message}")
                self._next_look = now + RETRY_S
        state = self.successor_state()
        if state == "ready":
            if self._switch_at is None:
                self.say(f"handover: job {self.successor} is ready; draining soon")
                self._switch_at = now + SWITCH_SETTLE_S
            elif now >= self._switch_at:
                return True
        elif state in FINAL_STATES and not self.over:
            self.say(f"handover: job {self.successor} ended {state} before it was ready")
            self.over = True
        # No successor in time: stop taking requests while those in flight can still finish.
        if self.end_deadline is None:
            return self.warned_at is not None and now >= self.warned_at + warning_budget_s / 2
        return now >= self.end_deadline - SWITCH_SETTLE_S

    def reason(self) -> str:
        """Why this job drains, for its record."""
        if self.successor is not None and self.successor_state() == "ready":
            return f"handed over to job {self.successor}"
        return "time limit near, no successor ready"

    @property
    def key(self) -> str:
        """This job's record key."""
        return record_key(self.successors.backend, self.job_id)

    @property
    def at(self) -> float | None:
        """When the successor is due (epoch seconds), None while the end is unknown."""
        return None if self.end_at is None else self.end_at - self.lead_s

    def schedule(self, environ: Mapping[str, str]) -> float | None:
        """Learn the job's end and return when the handover is due (recorded for `mt status`)."""
        self.end_at = end_from_env(environ) or self.successors.end_time(self.job_id)
        if self.at is None:
            self.say("handover: the job's end time is unknown; waiting for the warning signal")
            return None
        when = time.strftime("%H:%M:%S", time.localtime(self.at))
        self.say(f"handover: successor due at {when} ({self.lead_s:.0f}s before the limit)")
        return self.at

    def due(self, *, warned: bool, now: float | None = None) -> bool:
        """Time to submit: the warning came, or the due time passed; and the predecessor (if
        any) is over, so that the chain never runs three jobs."""
        if self.successor is not None:
            return False
        now = time.time() if now is None else now
        if not warned and (self.at is None or now < self.at):
            return False
        return self._predecessor_over()

    def _predecessor_over(self) -> bool:
        mine = self.registry.read(self.key)
        if mine is None or mine.predecessor is None:
            return True
        before = self.registry.read(record_key(self.successors.backend, mine.predecessor))
        return before is None or before.state in FINAL_STATES

    def submit(self) -> str | None:
        """The successor's job id, submitted now unless it already was (see the module doc);
        None if this job's record is final (cancelled): no successor then."""
        nonce = self._reserve()
        if nonce is None:
            return None
        if self.successor is not None:
            return self.successor
        job_id = self.successors.find(nonce) or self.successors.submit(nonce, self.job_id)
        recorded = self._record(job_id)
        if not recorded:
            self.say(f"handover: job {self.job_id} was ended meanwhile; cancelling job {job_id}")
            self.successors.cancel(job_id)
            return None
        self.successor = job_id
        self.say(f"handover: successor is job {job_id}")
        return job_id

    def _reserve(self) -> str | None:
        """The successor's nonce (reserved now under the lock, or the one reserved before)."""
        reserved: list[str] = []

        def change(current: Record | None) -> Record | None:
            if current is None or current.state in FINAL_STATES:
                return None
            if current.successor is not None:
                self.successor = current.successor
            if current.successor_nonce is not None:
                reserved.append(current.successor_nonce)
                return None
            nonce = new_nonce()
            reserved.append(nonce)
            return current.model_copy(update={"successor_nonce": nonce})

        self.registry.modify(self.key, change)
        return reserved[0] if reserved else None

    def _record(self, job_id: str) -> bool:
        """Write the successor's id into this job's record; False if the record is final."""
        done: list[bool] = []

        def change(current: Record | None) -> Record | None:
            if current is None or current.state in FINAL_STATES:
                return None
            done.append(True)
            return current.model_copy(update={"successor": job_id})

        self.registry.modify(self.key, change)
        return bool(done)

    def successor_state(self) -> str | None:
        """The successor's record state (None: no successor, or no record yet)."""
        if self.successor is None:
            return None
        record = self.registry.read(record_key(self.successors.backend, self.successor))
        return None if record is None else record.state
