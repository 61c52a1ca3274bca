"""Limits shared by gateway replicas: the rate-limit buckets and the in-flight caps in Redis.

With ``redis_url`` set, every replica keeps a key's token buckets (``ratelimit``) and the
requests in flight (``admission``) in one Redis, so the limits hold for the deployment and
not for each replica. Each step is one Lua script, atomic in Redis, timed by Redis' own
clock (replicas' clocks may differ):

- ``{prefix}:rate:{key}:{kind}:{capacity}``: a bucket (level, when), gone once it is full
  again (the expiry); a changed limit is a new name, so it starts full as ``Limiter``'s do.
- ``{prefix}:inflight:{replica}``: one replica's requests in flight (a field per request,
  its model as value, and counters); ``{prefix}:replicas`` holds the replicas, scored by
  when they expire. A replica refreshes both every ``HEARTBEAT_S`` and rewrites its hash
  from what it really has in flight (a lost ``leave`` is mended there); one that crashed
  stops refreshing, and its requests stop counting after ``REPLICA_TTL_S``.

A Redis that cannot be reached (or answers an error) never stops a request: the replica
falls back to its own ``Limiter`` and ``Admission`` (the limits per replica), logs a warning
once for the outage, and counts it (``mt_gateway_shared_limits_*`` in ``/metrics``); while
down it does not try Redis on the request path, and a background probe every ``PROBE_S``
brings the shared limits back. Requests admitted in one mode leave in the same one.

The URL may carry a password: it is never logged (``redisurl.where`` is the URL without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.admission import Admission
from gateway.logs import LOGGER_NAME, fields
from gateway.ratelimit import KeyBuckets, Limiter, Spender, Verdict, verdict
from gateway.redisscripts import ADMIT, ENTER, LEAVE, RESYNC, SPEND
from gateway.redisurl import where
from gateway.reload import CleanupContext
from hpc.errors import MTError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = logging.getLogger(f"{LOGGER_NAME}.redis")

# One Redis call's limit: past it the replica falls back to its own limits.
TIMEOUT_S = 0.5
HEARTBEAT_S = 5.0  # while Redis answers: refresh this replica's in-flight hash
PROBE_S = 1.0  # while it does not: try again this often
REPLICA_TTL_S = 30.0  # a replica that stops refreshing stops counting after this

_LIMITED = {1: "requests", 2: "tokens"}
_FULL = {1: "gateway", 2: "model"}


class SharedLimits:
    """The limits of every replica of one deployment, in Redis; this replica's own
    ``Limiter`` and ``Admission`` while Redis cannot be reached."""

    def __init__(
        self,
        url: str,
        prefix: str,
        limiter: Limiter,
        admission: Admission,
        max_total: int | None,
        max_per_model: int | None,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        probe_s: float = PROBE_S,
        replica_ttl_s: float = REPLICA_TTL_S,
    ) -> None:
        try:
            import redis.asyncio
            import redis.exceptions
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as exc:
            raise MTError(
                "the gateway's shared limits need the redis package, which is not installed",
                hint="pip install 'modeltainer[redis]', or start the gateway without a Redis URL",
            ) from exc
        try:
            # No retry inside redis-py: a script sent twice would count a request twice;
            # a failed call is the outage's business (fall back, probe).
            self._redis: Redis = redis.asyncio.from_url(
                url,
                socket_timeout=TIMEOUT_S,
                socket_connect_timeout=TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError:
            # Not the parser's message: it may quote the part of the URL it choked on.
            raise MTError(
                f"the Redis URL {where(url)!r} is not one redis can use",
                hint="write it as redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS, "
                "unix:///PATH for a socket)",
            ) from None
        self.where = where(url)
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        self._limiter = limiter
        self._admission = admission
        self._caps = (max_total or 0, max_per_model or 0)
        self._shares_caps = max_total is not None or max_per_model is not None
        self._prefix = prefix
        self._replica = uuid.uuid4().hex
        self._hash = f"{prefix}:inflight:{self._replica}"
        self._replicas = f"{prefix}:replicas"
        self._slots = itertools.count(1)
        self._live: set[int] = set()  # slots held in Redis, or being asked for
        self._leaving: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._admit: AsyncScript = self._redis.register_script(ADMIT)
        self._spend: AsyncScript = self._redis.register_script(SPEND)
        self._enter: AsyncScript = self._redis.register_script(ENTER)
        self._leave: AsyncScript = self._redis.register_script(LEAVE)
        self._resync: AsyncScript = self._redis.register_script(RESYNC)
        self._heartbeat_s = heartbeat_s
        self._probe_s = probe_s
        self._ttl_ms = int(replica_ttl_s * 1000)
        self.up = False
        self.outages = 0
        self._fell = asyncio.Event()  # set when Redis stops answering

    # --- rate limits -----------------------------------------------------------------

    async def admit(
        self, name: str, rpm: int | None, tpm: int | None
    ) -> tuple[Verdict, Spender] | None:
        """The verdict on one request of key ``name`` (one request taken if allowed) and
        where its tokens go; None if the key has no limits."""
        if rpm is None and tpm is None:
            return None
        if self.up:
            keys = (self._bucket(name, "requests", rpm), self._bucket(name, "tokens", tpm))
            try:
                got = await self._admit(keys=keys, args=(rpm or 0, tpm or 0))
            except self._errors as exc:
                self._failed(exc)
            else:
                limited, wait_ms, rl, reset_r, tl, reset_t = (int(v) for v in got)
                shown = []
                if rpm:
                    shown.append(("requests", float(rpm), float(rl), reset_r / 1000))
                if tpm:
                    shown.append(("tokens", float(tpm), float(tl), reset_t / 1000))
                said = verdict(_LIMITED.get(limited), wait_ms / 1000, shown)
                return said, _SharedBuckets(self, name, rpm, tpm)
        buckets = self._limiter.buckets(name, rpm, tpm)
        if buckets is None:  # not reached: one of the limits is set
            return None
        return buckets.admit(), buckets

    def spend(self, name: str, rpm: int | None, tpm: int, count: int) -> None:
        """Charge ``count`` tokens to key ``name``'s shared bucket, in the background (into
        this replica's own if Redis fails)."""

        async def charge() -> None:
            if self.up:
                try:
                    await self._spend(keys=(self._bucket(name, "tokens", tpm),), args=(tpm, count))
                    return
                except self._errors as exc:
                    self._failed(exc)
            own: KeyBuckets | None = self._limiter.buckets(name, rpm, tpm)
            if own is not None:
                own.spend_tokens(count)

        self._background(charge())

    def _bucket(self, name: str, kind: str, capacity: int | None) -> str:
        return f"{self._prefix}:rate:{name}:{kind}:{capacity or 0}"

    # --- in-flight caps --------------------------------------------------------------

    async def enter(self, model: str) -> tuple[str | None, int]:
        """``Admission.enter`` for the deployment: None if admitted, else which cap is full;
        and the slot (0: taken in this replica alone) the request gives back with
        ``leave`` exactly once if admitted."""
        if not (self.up and self._shares_caps):
            return self._admission.enter(model), 0
        await self.settled()  # this replica's own earlier requests are out first
        slot = next(self._slots)
        self._live.add(slot)
        max_total, max_per_model = self._caps
        asked = asyncio.ensure_future(
            self._enter(
                keys=(self._hash, self._replicas),
                args=(
                    self._replica,
                    slot,
                    model,
                    max_total,
                    max_per_model,
                    self._ttl_ms,
                    f"{self._prefix}:inflight:",
                ),
            )
        )
        try:
            full = await asyncio.shield(asked)
        except asyncio.CancelledError:
            # The client left while Redis was asked: give the slot back if it was taken.
            asked.add_done_callback(lambda done: self._abandoned(done, model, slot))
            raise
        except self._errors as exc:
            self._live.discard(slot)
            self._failed(exc)
            return self._admission.enter(model), 0
        if full:
            self._live.discard(slot)
            return _FULL[int(full)], 0
        self._admission.take(model)
        return None, slot

    async def settled(self) -> None:
        """Wait until Redis has heard of every ``leave`` so far (they go in the background)."""
        if self._leaving:
            await asyncio.wait(list(self._leaving))

    def leave(self, model: str, slot: int) -> None:
        """Give back what ``enter`` took; Redis is told in the background."""
        self._admission.leave(model)
        if slot:
            self._live.discard(slot)
            self._give_back(model, slot)

    def _give_back(self, model: str, slot: int) -> None:
        async def leave() -> None:
            try:
                await self._leave(keys=(self._hash,), args=(slot, model))
            except self._errors as exc:
                self._failed(exc)  # the next resync drops the slot

        task = self._background(leave())
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    def _abandoned(self, asked: asyncio.Future[Any], model: str, slot: int) -> None:
        self._live.discard(slot)
        if asked.cancelled() or asked.exception() is not None:
            return  # the next resync drops the slot if it was taken
        if int(asked.result()) == 0:
            self._give_back(model, slot)

    # --- the outage ------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self.outages += 1
        self._fell.set()
        log.warning(
            "Redis unreachable: each replica enforces the rate limits and in-flight caps "
            "alone until it is back",
            extra=fields(redis=self.where, error=f"{type(exc).__name__}: {exc}"[:300]),
        )

    async def _heartbeat(self) -> bool:
        """Rewrite this replica's hash in Redis; True if Redis answered."""
        try:
            await self._resync(
                keys=(self._hash, self._replicas),
                args=(self._replica, self._ttl_ms, *sorted(self._live)),
            )
        except self._errors as exc:
            self._failed(exc)
            return False
        return True

    async def _keep(self) -> None:
        """Refresh while Redis answers; probe while it does not, and come back."""
        while True:
            if self.up:
                self._fell.clear()
                # A request that finds Redis gone wakes this at once, to start probing.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._fell.wait(), self._heartbeat_s)
                if self.up:
                    await self._heartbeat()
                    continue
            await asyncio.sleep(self._probe_s)
            # Connections from before the outage are dead: start afresh.
            await self._redis.connection_pool.disconnect()
            if await self._heartbeat():
                self.up = True
                log.info(
                    "Redis is back: the limits are shared again", extra=fields(redis=self.where)
                )

    async def start(self) -> None:
        """Reach Redis (or start with the limits per replica, and a warning), and keep
        probing it."""
        self.up = True  # so that a failure now counts as an outage, and is logged
        await self._heartbeat()
        self._background(self._keep())

    async def close(self) -> None:
        """Stop probing, take this replica's requests off Redis, close the connections."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self.up:
            with contextlib.suppress(*self._errors):
                await self._redis.delete(self._hash)
                await self._redis.zrem(self._replicas, self._replica)
        await self._redis.aclose()

    def _background(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def render(self) -> str:
        """Its ``/metrics`` lines."""
        return (
            "# HELP mt_gateway_shared_limits_up 1 while the limits are shared through Redis, "
            "0 while this replica enforces its own (Redis unreachable).\n"
            "# TYPE mt_gateway_shared_limits_up gauge\n"
            f"mt_gateway_shared_limits_up {int(self.up)}\n"
            "# HELP mt_gateway_shared_limits_outages_total Times Redis became unreachable.\n"
            "# TYPE mt_gateway_shared_limits_outages_total counter\n"
            f"mt_gateway_shared_limits_outages_total {self.outages}\n"
        )


class _SharedBuckets:
    """A key's buckets in Redis, as the proxy charges a finished request's tokens."""

    __slots__ = ("_name", "_rpm", "_shared", "_tpm")

    def __init__(self, shared: SharedLimits, name: str, rpm: int | None, tpm: int | None) -> None:
        self._shared = shared
        self._name = name
        self._rpm = rpm
        self._tpm = tpm

    def spend_tokens(self, count: int) -> None:
        """Charge ``count`` tokens (in the background)."""
        if self._tpm and count > 0:
            self._shared.spend(self._name, self._rpm, self._tpm, count)


SHARED_LIMITS = web.AppKey("shared_limits", SharedLimits)


def shared_limits_context(shared: SharedLimits) -> CleanupContext:
    """The ``cleanup_ctx`` entry that reaches Redis when the app starts and lets go at the end."""

    async def context(_app: web.Application) -> AsyncIterator[None]:
        await shared.start()
        try:
            yield
        finally:
            await shared.close()

    return context
