"""Hot reload of routes.yaml (DESIGN §8).

A change of the file on disk (polled, so an editor that writes a new file and renames it,
and a Kubernetes config map whose ``..data`` symlink is swapped, are both seen) or SIGHUP
loads and validates the file again. A valid file replaces the route table in one
assignment: a request that already matched finishes on the chain it started with, and
rate-limit budgets live in the store keyed by route name, so they survive. The upstream
pool of a service whose upstreams are unchanged is kept, with its circuit-breaker state.
An invalid file changes nothing: the located errors are logged and shown on ``/config``.

``listen``, ``admin``, ``store``, ``trusted_proxies`` and ``limits.drain_timeout`` are bound
to sockets, connections and the app-wide middleware made at startup: a change to them is
reported (logged, and under ``pending_restart`` on ``/config``) and takes effect on the next
start. The keep-alive connections of upstreams the new config no longer has (or of a
service whose upstream list changed) are closed at the swap: idle ones at once, busy ones
when their response is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from middleware.auth import KeySource

from .app import ROUTES, SESSION, build_routes
from .config import ConfigInvalid, GatewayConfig, load_text
from .metrics import METRICS

__all__ = ("POLL_EVERY", "RELOADER", "Reloader", "config_version", "describe_changes", "install")

logger = logging.getLogger(__name__)

POLL_EVERY = 0.25  # seconds between two looks at the file; a change is applied once two looks agree
_RESTART_ONLY = ("listen", "admin", "store", "trusted_proxies")  # bound to sockets or app-wide middleware


def config_version(data: bytes) -> str:
    """The version shown on /config: the first 12 hex digits of the file's SHA-256."""
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass(slots=True)
class ReloadStatus:
    """What /config shows about the loaded file and the last reload."""

    path: str
    version: str
    loaded_at: float  # epoch seconds when the live config was loaded
    last_attempt_at: float | None = None
    last_result: str | None = None  # success | failure | unchanged
    last_trigger: str | None = None  # file | SIGHUP | admin
    errors: list[str] = field(default_factory=list)  # the routes.yaml:LINE:COL lines of the last failure
    changes: dict[str, list[str]] = field(default_factory=dict)  # added / removed / changed services
    pending_restart: list[str] = field(default_factory=list)  # sections changed that need a restart


def describe_changes(old: GatewayConfig, new: GatewayConfig) -> dict[str, list[str]]:
    """Services added, removed and changed between two configs, by name."""
    return {
        "added": sorted(set(new.services) - set(old.services)),
        "removed": sorted(set(old.services) - set(new.services)),
        "changed": sorted(n for n in set(old.services) & set(new.services) if old.services[n] != new.services[n]),
    }


class Reloader:
    """Loads the config file again on demand (:meth:`reload`) or when it changes (:meth:`watch`)."""

    def __init__(self, app: web.Application, path: Path) -> None:
        self._app = app
        self.path = path
        data = _read(path) or b""
        self.status = ReloadStatus(path=str(path), version=config_version(data), loaded_at=time.time())
        self._lock = asyncio.Lock()
        self._retired: list[KeySource] = []  # JWT key sources replaced by a reload; closed at cleanup
        self._failed_version: str | None = None  # a broken file is reported once, not on every look

    async def reload(self, trigger: str) -> bool:
        """Load the file and swap the routes if it is valid; True when the new config is live."""
        async with self._lock:
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> bool:
        status = self.status
        status.last_attempt_at = time.time()
        status.last_trigger = trigger
        metrics = self._app[METRICS]
        data = _read(self.path)
        try:
            if data is None:
                raise ConfigInvalid([])  # logged below with the reason
            config = load_text(data.decode("utf-8"), filename=str(self.path))
        except (ConfigInvalid, UnicodeDecodeError) as exc:
            errors = [str(e) for e in exc.errors] if isinstance(exc, ConfigInvalid) else []
            status.errors = errors or [f"{self.path}: cannot read the file (missing, unreadable or not UTF-8)"]
            status.last_result = "failure"
            metrics.reloads.labels(result="failure").inc()
            logger.error("config reload (%s) failed; still serving version %s:\n  %s", trigger, status.version,
                         "\n  ".join(status.errors))  # fmt: skip
            return False
        version = config_version(data)
        holder = self._app[ROUTES]
        old = holder.config
        assert old is not None, "the route table is built at startup"
        keys = holder.keys
        if config.jwt != old.jwt:
            keys = await self._new_keys(config)
        try:
            table, pools = build_routes(self._app, config, keys=keys, previous=holder)
        except Exception as exc:  # a config that validates but cannot be served: keep the old one
            status.errors = [f"{self.path}: {exc}"]
            status.last_result = "failure"
            metrics.reloads.labels(result="failure").inc()
            logger.exception("config reload (%s) failed while building routes; still serving %s", trigger, version)
            return False
        if keys is not holder.keys and holder.keys is not None:
            self._retired.append(holder.keys)
        # one step, no await: a request sees either the old table or the new one
        retired = [pool for pool in holder.pools.values() if pool not in pools.values()]
        holder.table, holder.pools, holder.config, holder.keys = table, pools, config, keys
        for pool in retired:  # removed or changed upstreams: in-flight responses finish first
            pool.close()
        changes = describe_changes(old, config)
        restart = [s for s in _RESTART_ONLY if getattr(old, s) != getattr(config, s)]
        if old.limits.drain_timeout != config.limits.drain_timeout:
            restart.append("limits.drain_timeout")
        unchanged = version == status.version
        status.version, status.loaded_at, status.errors = version, time.time(), []
        status.changes, status.pending_restart = changes, restart
        status.last_result = "unchanged" if unchanged else "success"
        metrics.reloads.labels(result="success").inc()
        summary = ", ".join(f"{k} {', '.join(v)}" for k, v in changes.items() if v) or "no service changed"
        logger.info("config reloaded (%s): version %s, %d services; %s", trigger, version, len(config.services),
                    summary)  # fmt: skip
        if restart:
            logger.warning("changes to %s take effect on the next restart", ", ".join(restart))
        return True

    async def _new_keys(self, config: GatewayConfig) -> KeySource | None:
        if config.jwt is None:
            return None
        keys = KeySource(config.jwt, session=self._app[SESSION])
        await keys.start()
        return keys

    async def watch(self, every: float = POLL_EVERY) -> None:
        """Poll the file forever; reload when its content changed and two looks in a row agree
        (so a file caught half-written is not taken for a broken config). A file put back to the
        version being served after a failed reload is loaded again too, so the failure and its
        errors do not stay on ``/config`` (the result is then "unchanged")."""
        seen: str | None = None
        while True:
            await asyncio.sleep(every)
            data = _read(self.path)
            if data is None:
                continue  # between an editor's delete and create; the next look will tell
            version = config_version(data)
            failed = self._last_failed()
            # the served version again after a failure is loaded once more: that clears the failure
            if version == failed or (version == self.status.version and failed is None):
                seen = None
                continue
            if version == seen:
                seen = None
                if not await self.reload("file"):
                    self._failed_version = version
            else:
                seen = version

    def _last_failed(self) -> str | None:
        return self._failed_version if self.status.last_result == "failure" else None

    async def aclose(self) -> None:
        for keys in self._retired:
            await keys.aclose()
        self._retired.clear()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


RELOADER = web.AppKey("reloader", Reloader)


def install(app: web.Application, path: Path, *, watch: bool = True, every: float = POLL_EVERY) -> Reloader:
    """Give ``app`` a :class:`Reloader` for ``path`` (before the app starts); with ``watch``,
    the file is polled while the app runs."""
    reloader = Reloader(app, path)
    app[RELOADER] = reloader

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(reloader.watch(every)) if watch else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reloader.aclose()

    app.cleanup_ctx.append(lifetime)
    return reloader
