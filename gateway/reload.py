"""Hot reload: watch the registry, ``models.yaml``, ``keys.yaml`` and the owner key by ``stat()``
(and, with ``--discover kubernetes``, the engines the Kubernetes API lists: gateway.k8sdiscovery,
asked every ``discover_interval_s``, not at every reload).

Requests never touch the filesystem: they read the ``Snapshot`` in ``Live``, which the
reload task replaces whole. Every ``reload_interval_s`` the task stats the sources (in
a worker thread, so a slow NFS server never blocks the event loop) and rebuilds what
changed. An mtime that is very recent, or ten seconds without a rebuild, also triggers one:
an mtime has coarse granularity, and NFS attribute caches lag, so a second write can hide
behind the first.

A bad ``models.yaml``, ``keys.yaml`` or owner key is logged once (file:line: field) and the
last good version stays in use: a typo never drops every route, and never turns auth off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.k8sdiscovery import KubeDiscovery, parse_discover
from gateway.keys import KeyStore, load_key_store
from gateway.logs import LOGGER_NAME, fields
from gateway.routes import RouteTable, build_routes
from hpc.configfile import load_models
from hpc.errors import ConfigError, MTError, RegistryError
from hpc.permissions import InsecurePermissionsError
from hpc.registry import Record, Registry
from hpc.spec import ModelsFile

log = logging.getLogger(f"{LOGGER_NAME}.reload")

FULL_RELOAD_EVERY_S = 10.0
# A source changed this recently may change again within the same mtime tick, unseen.
_RACY_WINDOW_NS = 2_000_000_000

Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode), None if missing
CleanupContext = Callable[[web.Application], AsyncIterator[None]]


@dataclass(frozen=True)
class Snapshot:
    """What requests read: the route table, the key store when auth is on, and the
    models.yaml it was built from (the on-demand controller reads its specs)."""

    routes: RouteTable
    keys: KeyStore | None
    models: ModelsFile | None = None


@dataclass
class Live:
    """The current snapshot; replaced whole, never changed in place."""

    snapshot: Snapshot


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _racy(sig: Signature, now_ns: int) -> bool:
    return sig is not None and sig[0] >= now_ns - _RACY_WINDOW_NS


@dataclass
class Reloader:
    """Loads the sources and rebuilds the snapshot when one of them changes."""

    config: GatewayConfig
    env: Mapping[str, str]
    _models: ModelsFile | None = field(default=None, init=False)
    _keys: KeyStore | None = field(default=None, init=False)
    _routes: RouteTable | None = field(default=None, init=False)
    _sigs: dict[str, Signature] = field(default_factory=dict, init=False)
    _racy_sources: set[str] = field(default_factory=set, init=False)
    _errors: dict[str, str] = field(default_factory=dict, init=False)
    _warned: set[str] = field(default_factory=set, init=False)
    _last_full: float = field(default_factory=time.monotonic, init=False)
    _discovery: KubeDiscovery | None = field(default=None, init=False)
    _discovered: list[Record] = field(default_factory=list, init=False)
    _discovery_error: str | None = field(default=None, init=False)
    _discovered_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.config.discover is not None:
            self._discovery = KubeDiscovery(parse_discover(self.config.discover))

    def load_initial(self, now: float | None = None) -> Snapshot:
        """The first snapshot; a bad models.yaml or keys.yaml raises ConfigError, an
        unusable owner key MTError. ``now``: a ``time.monotonic()`` reading, as for poll."""
        now_ns = time.time_ns()
        monotonic = time.monotonic() if now is None else now
        sigs = self._stat_all()
        if self.config.models_file is not None:
            self._models = load_models(self.config.models_file)
        self._keys = load_key_store(self.config.keys_file, self.config.owner_key_file)
        self._discover(monotonic)
        self._routes = self._build_routes()
        self._remember(sigs, now_ns)
        return Snapshot(routes=self._routes, keys=self._keys, models=self._models)

    def poll(self, now: float | None = None) -> Snapshot | None:
        """A new snapshot if a source changed (or a full reload is due), else None.

        Blocking (stat, and reads when something changed): run it in a worker thread.
        ``now`` is a ``time.monotonic()`` reading (tests pass their own).
        """
        now_ns = time.time_ns()
        monotonic = time.monotonic() if now is None else now
        sigs = self._stat_all()
        full = monotonic - self._last_full >= FULL_RELOAD_EVERY_S
        changed = {name for name, sig in sigs.items() if full or self._stale(name, sig)}
        discover = self._discovery_due(monotonic)
        if not changed and not discover:
            return None
        if "models" in changed and self.config.models_file is not None:
            try:
                self._models = load_models(self.config.models_file)
                self._accepted("models")
            except ConfigError as exc:
                self._rejected("models", exc)
        if changed & {"keys", "owner"}:
            try:
                self._keys = load_key_store(self.config.keys_file, self.config.owner_key_file)
                self._accepted("keys")
            except MTError as exc:  # ConfigError included
                self._rejected("keys", exc)
        if discover and self._discover(monotonic):
            changed.add("discovered")
        if self._routes is None or changed & {"registry", "models", "discovered"}:
            try:
                self._routes = self._build_routes()
            except (RegistryError, InsecurePermissionsError) as exc:
                # A record others can read (hpc.permissions) is refused like an unreadable one.
                log.error(
                    "registry unreadable; keeping the last routes",
                    extra=fields(path=str(exc.path), error=exc.message),
                )
                return None
        self._remember(sigs, now_ns)
        if full:
            self._last_full = monotonic
        return Snapshot(routes=self._routes, keys=self._keys, models=self._models)

    def _stale(self, name: str, sig: Signature) -> bool:
        if name not in self._sigs or self._sigs[name] != sig:
            return True
        return name in self._racy_sources

    def _stat_all(self) -> dict[str, Signature]:
        sigs = {"registry": _signature(self.config.registry_dir)}
        if self.config.models_file is not None:
            sigs["models"] = _signature(self.config.models_file)
        if self.config.keys_file is not None:
            sigs["keys"] = _signature(self.config.keys_file)
        if self.config.owner_key_file is not None:
            sigs["owner"] = _signature(self.config.owner_key_file)
        return sigs

    def _remember(self, sigs: dict[str, Signature], now_ns: int) -> None:
        self._sigs = dict(sigs)
        self._racy_sources = {name for name, sig in sigs.items() if _racy(sig, now_ns)}

    def _build_routes(self) -> RouteTable:
        records = [*Registry(self.config.registry_dir).records(), *self._discovered]
        routes = build_routes(records, self._models, self.env)
        for warning in routes.warnings:
            if warning not in self._warned:
                self._warned.add(warning)
                log.warning(warning)
        return routes

    def _discovery_due(self, now: float) -> bool:
        """True when the API is to be asked again (every ``discover_interval_s``; a failed
        call waits as long: an API server in trouble gets no more calls than a healthy one)."""
        if self._discovery is None:
            return False
        last = self._discovered_at
        return last is None or now - last >= self.config.discover_interval_s

    def _discover(self, now: float) -> bool:
        if self._discovery is None:
            return False
        self._discovered_at = now
        return self._discover_with(self._discovery)

    def _discover_with(self, discovery: KubeDiscovery) -> bool:
        """Ask the Kubernetes API for its engines; True if they changed. A failed call
        keeps the last good list (one warning per new error, one info when it recovers)."""
        try:
            found = discovery.records()
        except MTError as exc:
            if self._discovery_error != exc.message:
                self._discovery_error = exc.message
                log.warning(
                    "kubernetes discovery failed; keeping the last routes",
                    extra=fields(error=exc.message, hint=exc.hint or ""),
                )
            return False
        if self._discovery_error is not None:
            self._discovery_error = None
            log.info("kubernetes discovery recovered")
        before = [(r.key, r.base_url, r.api_key) for r in self._discovered]
        after = [(r.key, r.base_url, r.api_key) for r in found]
        self._discovered = found
        return before != after

    def _accepted(self, source: str) -> None:
        if self._errors.pop(source, None) is not None:
            log.info("config accepted", extra=fields(file=str(self._path(source))))

    def _rejected(self, source: str, exc: MTError) -> None:
        # Logged when the problem changes, not on every full reload of the same bad file.
        if self._errors.get(source) == exc.message:
            return
        self._errors[source] = exc.message
        if isinstance(exc, ConfigError):
            where = fields(file=str(exc.path), issues=[str(issue) for issue in exc.issues])
        else:  # the owner key: its message names the file, never what it holds
            where = fields(file=str(self.config.owner_key_file))
        log.error(f"config rejected, keeping the last good one: {exc.message}", extra=where)

    def _path(self, source: str) -> Path | None:
        if source == "models":
            return self.config.models_file
        return self.config.keys_file or self.config.owner_key_file


async def run_reloader(reloader: Reloader, live: Live, interval_s: float) -> None:
    """Poll forever, swapping in each new snapshot; cancelled when the app stops."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            snapshot = await asyncio.to_thread(reloader.poll)
        except Exception:
            # A bug in one round must not stop reloading for good, leaving the routes
            # frozen; the traceback goes to the log and the last snapshot stays.
            log.exception("reload failed; keeping the last snapshot")
            continue
        if snapshot is not None:
            live.snapshot = snapshot


def reload_context(
    config: GatewayConfig, env: Mapping[str, str], live_key: web.AppKey[Live]
) -> CleanupContext:
    """A ``cleanup_ctx`` entry: load the first snapshot (or fail startup), then keep reloading."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        reloader = Reloader(config=config, env=env)
        snapshot = await asyncio.to_thread(reloader.load_initial)
        app[live_key] = Live(snapshot)
        task = asyncio.create_task(
            run_reloader(reloader, app[live_key], config.reload_interval_s),
            name="mt-gateway-reload",
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
