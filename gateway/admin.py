"""The admin listener (DESIGN §8): its own port, loopback by default, never the public one.

``/healthz`` (the process answers), ``/readyz`` (config loaded, store answering, upstreams
in rotation; degraded states named), ``/metrics`` (Prometheus text), ``/config`` (the live
config with secrets redacted, its version and the last reload), ``POST /reload``,
``POST /cache/purge``, ``/explain``, and the live dashboard at ``/`` fed by ``/events``
(server-sent events, see :mod:`gateway.dashboard`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import importlib
import inspect
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from yarl import URL

from middleware.base import StoreUnavailable

from . import __version__, dashboard
from .app import ROUTES, STORE
from .explain import explain, parse_header
from .metrics import CONTENT_TYPE, METRICS
from .reload import RELOADER

__all__ = ("GATEWAY", "STATE", "AdminState", "create_admin_app", "redact")

READY_TIMEOUT = 1.0  # seconds the store gets to answer a /readyz ping
_SECRET = re.compile(r"secret|password|passwd|token|private|credential", re.IGNORECASE)
REDACTED = "***"


class AdminState:
    """Process state the admin listener reports: set by the server."""

    draining: bool = False


GATEWAY = web.AppKey("gateway", web.Application)
STATE = web.AppKey("admin_state", AdminState)


def create_admin_app(gateway: web.Application, state: AdminState | None = None) -> web.Application:
    """The admin application for ``gateway`` (served on its own runner and port)."""
    admin = web.Application()
    admin[GATEWAY] = gateway
    admin[STATE] = AdminState() if state is None else state
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/config", config)
    admin.router.add_post("/reload", reload)
    admin.router.add_post("/cache/purge", purge)
    admin.router.add_get("/explain", explain_endpoint)
    dashboard.install(admin, gateway)
    return admin


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=2, default=str))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    """200 when serving (``ready`` or ``degraded``, with what is degraded), 503 when not."""
    gateway = request.app[GATEWAY]
    holder = gateway[ROUTES]
    problems: list[str] = []
    checks: dict[str, Any] = {"config": "loaded" if holder.table is not None else "not loaded"}
    if holder.table is None or holder.config is None:
        return _json({"status": "not ready", "checks": checks, "degraded": ["config not loaded"]}, status=503)
    if request.app[STATE].draining:
        return _json({"status": "not ready", "checks": checks, "degraded": ["draining: shutting down"]}, status=503)
    store_config = holder.config.store
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await gateway[STORE].ping()
        checks["store"] = "ok"
    except (StoreUnavailable, TimeoutError) as exc:
        checks["store"] = f"unreachable: {exc or 'timeout'}"
        problems.append(f"store unreachable (rate limiting on_error: {store_config.on_error})")
    upstreams: dict[str, dict[str, bool]] = {}
    for name, pool in holder.pools.items():
        upstreams[name] = {u.label: pool.healthy(u) for u in pool.upstreams}
        if not any(upstreams[name].values()):
            problems.append(f"service {name}: no healthy upstream")
    checks["upstreams"] = upstreams
    reloader = gateway.get(RELOADER)
    if reloader is not None and reloader.status.last_result == "failure":
        checks["last_reload"] = "failed: still serving the previous config (see /config)"
    return _json({"status": "degraded" if problems else "ready", "checks": checks, "degraded": problems})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY][METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def config(request: web.Request) -> web.Response:
    """The live config (secrets redacted), its version, and the last reload with its errors."""
    gateway = request.app[GATEWAY]
    holder = gateway[ROUTES]
    reloader = gateway.get(RELOADER)
    body: dict[str, Any] = {"version": None, "reload": None}
    if reloader is not None:
        status = dataclasses.asdict(reloader.status)
        body["version"] = status.pop("version")
        body["reload"] = status
    body["config"] = redact(holder.config)
    return _json(body)


async def reload(request: web.Request) -> web.Response:
    reloader = request.app[GATEWAY].get(RELOADER)
    if reloader is None:
        raise web.HTTPNotImplemented(text="this gateway was not started from a file: nothing to reload")
    ok = await reloader.reload("admin")
    status = dataclasses.asdict(reloader.status)
    return _json({"reloaded": ok, **status}, status=200 if ok else 422)


async def purge(request: web.Request) -> web.Response:
    """``POST /cache/purge?service=S[&prefix=/p][&tag=T]``: drop cached entries; says how many."""
    service = request.query.get("service")
    if not service:
        return _json({"error": "service is required: /cache/purge?service=NAME[&prefix=/path][&tag=TAG]"}, 400)
    holder = request.app[GATEWAY][ROUTES]
    if holder.config is None or service not in holder.config.services:
        return _json({"error": f"no service named {service!r}"}, 404)
    purge_entries = _purge_function()
    if purge_entries is None:
        return _json({"error": "cache purge is not available in this build (middleware.cache.purge missing)"}, 501)
    prefix, tag = request.query.get("prefix"), request.query.get("tag")
    try:
        count = await purge_entries(request.app[GATEWAY][STORE], service=service, prefix=prefix, tag=tag)
    except ValueError as exc:  # prefix and tag together
        return _json({"error": str(exc)}, 400)
    except StoreUnavailable as exc:
        return _json({"error": f"store unavailable: {exc}"}, 503)
    return _json({"service": service, "prefix": prefix, "tag": tag, "purged": count})


def _purge_function() -> Callable[..., Awaitable[int]] | None:
    module = importlib.import_module("middleware.cache")
    function = getattr(module, "purge", None)
    return function if inspect.iscoroutinefunction(function) else None


async def explain_endpoint(request: web.Request) -> web.Response:
    """``/explain?method=GET&path=/api/users/1&header=Authorization:%20Bearer%20…&client=1.2.3.4``"""
    path = request.query.get("path")
    if not path:
        return _json({"error": "path is required: /explain?method=GET&path=/api/<service>/..."}, 400)
    try:
        headers = [parse_header(h) for h in request.query.getall("header", ())]
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    client = request.query.get("client", "127.0.0.1")
    try:
        ipaddress.ip_address(client)
    except ValueError:
        return _json({"error": f"client must be an IP address, got {client!r}"}, 400)
    method = request.query.get("method", "GET")
    return _json(await explain(request.app[GATEWAY], method, path, headers, client=client))


def redact(value: object, key: str = "") -> Any:
    """``value`` as JSON-able data, with anything that looks like a secret replaced by ``***``."""
    if value is None:
        return None
    if isinstance(value, bool | int | float):
        return REDACTED if _SECRET.search(key) else value
    if isinstance(value, str):
        if _SECRET.search(key):
            return REDACTED
        return _redact_url(value) if "://" in value else value
    if isinstance(value, URL):
        return _redact_url(str(value))
    if isinstance(value, enum.Enum):
        return redact(value.value, key)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = (f for f in dataclasses.fields(value) if f.compare)  # compare=False: derived (compiled regexes)
        return {f.name: redact(getattr(value, f.name), f.name) for f in fields}
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(redact(v, key) for v in value)
    if isinstance(value, tuple | list):
        return [redact(v, key) for v in value]
    return str(value)


def _redact_url(text: str) -> str:
    try:
        url = URL(text)
    except ValueError:
        return text
    return str(url.with_password(REDACTED)) if url.password else text
