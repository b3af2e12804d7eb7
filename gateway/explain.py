"""Explain: how the gateway would handle a request, without handling it (DESIGN §8).

:func:`explain` matches the request against the live route table and runs only what has no
side effect: the route's JWT check (the real middleware, on a request that never reaches
an upstream), the rate-limit key and a read of its budget (the GCRA state is read, never
spent), and the upstream that is next in rotation (the rotation does not move). It backs
the admin ``/explain`` endpoint and ``gateway explain``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from middleware import cache as cache_module
from middleware.auth import AuthMode, JwtAuthMiddleware, token_scopes
from middleware.base import CLAIMS, CLIENT_IP, OUTCOME, Outcome, Store, StoreUnavailable
from middleware.problem import Problem
from middleware.rate_limit import RateLimitMiddleware, client_key
from middleware.request_id import client_address

from .app import ROUTES, STORE, create_app
from .config import GatewayConfig, Route
from .routing import Target
from .upstreams import UpstreamPool

__all__ = ("explain", "explain_offline", "parse_header", "render")


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` → ``("Name", "value")``; ValueError when there is no colon."""
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise ValueError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


async def explain(
    app: web.Application,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    client: str = "127.0.0.1",
) -> dict[str, Any]:
    """A JSON-able account of how ``method target`` (with ``headers``, from ``client``) would go."""
    holder = app[ROUTES]
    config, table = holder.config, holder.table
    assert config is not None and table is not None, "the route table is built at startup"
    method = method.upper()
    result: dict[str, Any] = {"request": {"method": method, "target": target, "client": client}}
    try:
        match = table.match(method, target)
    except Problem as problem:
        result["outcome"] = {"status": problem.status, "detail": problem.detail}
        return result
    if match is None:
        result["outcome"] = {"status": 404, "detail": "no service is mapped at this path"}
        return result
    route = match.route
    result["service"] = route.service
    result["route"] = {"name": route.name, "override": route.pattern.text if route.pattern else None}
    if route.methods is not None:
        result["route"]["methods"] = sorted(route.methods)
    pool = holder.pools[route.service]
    path = match.target.rest + (f"?{match.target.query}" if match.target.query is not None else "")
    result["upstream"] = _upstream(pool, path)

    # A request that goes nowhere: aiohttp's own way to build one without a connection, so the
    # route's real middlewares (auth, the rate-limit and cache keys) can be run on it.
    request = make_mocked_request(method, target, headers=CIMultiDict(headers))
    request[CLIENT_IP] = client_address(client, request.headers.get("X-Forwarded-For"), config.trusted_proxies)
    request[OUTCOME] = Outcome()
    result["auth"] = await _auth(route, config, holder.keys, request)
    if result["auth"].get("status"):
        result["outcome"] = {"status": result["auth"]["status"], "detail": result["auth"]["detail"]}
    if route.rate_limit is not None:
        result["rate_limit"] = await _rate_limit(route, app[STORE], request)
        if "outcome" not in result and result["rate_limit"].get("remaining") == 0:
            result["outcome"] = {"status": 429, "detail": "the budget is spent"}
    else:
        result["rate_limit"] = None
    result["cache"] = _cache(route, method, request.headers, authenticated=CLAIMS in request)
    if result["cache"] is not None and result["cache"]["decision"].startswith(("lookup", "revalidate")):
        result["cache"].update(await _cache_entry(route, app[STORE], request, match.target))
    result.setdefault("outcome", {"status": None, "detail": "forwarded to the upstream"})
    return result


def _upstream(pool: UpstreamPool, path: str) -> dict[str, Any]:
    healthy = [u for u in pool.upstreams if pool.healthy(u)]
    return {
        "url": healthy[0].base + path if healthy else None,  # the first healthy one; rotation may pick another
        "candidates": [{"url": u.base, "healthy": pool.healthy(u)} for u in pool.upstreams],
        "note": None if healthy else "no healthy upstream: the request would get 503",
    }


async def _auth(route: Route, config: GatewayConfig, keys: Any, request: web.Request) -> dict[str, Any]:
    mode = route.auth.mode
    summary: dict[str, Any] = {"mode": mode.value, "scopes_required": sorted(route.auth.scopes)}
    if mode is AuthMode.NONE:
        summary["result"] = "not checked"
        return summary
    if config.jwt is None or keys is None:
        summary["result"] = "misconfigured: no jwt section"
        return summary
    checker = JwtAuthMiddleware(route.auth, settings=config.jwt, keys=keys, websocket=route.websocket is not None)

    async def passed(request: web.Request) -> web.StreamResponse:
        return web.Response()

    try:
        await checker(request, passed)
    except Problem as problem:
        summary.update(result="rejected", status=problem.status, detail=problem.detail)
        return summary
    claims = request.get(CLAIMS)
    if claims is None:
        summary["result"] = "anonymous (no token; auth is optional here)"
    else:
        summary.update(result="verified", sub=claims.get("sub"), scopes=sorted(token_scopes(claims)))
    return summary


async def _rate_limit(route: Route, store: Store, request: web.Request) -> dict[str, Any]:
    limit = route.rate_limit
    assert limit is not None
    limiter = RateLimitMiddleware(limit, store=store, scope=route.name)
    summary: dict[str, Any] = {"limit": limit.requests, "per": limit.per, "key": client_key(request, limit.key)}
    try:
        _, quota = await limiter.peek(request)  # the store's own arithmetic and clock; nothing spent
    except StoreUnavailable as exc:
        summary["remaining"] = None
        summary["note"] = f"store unavailable: {exc}"
        return summary
    summary["remaining"] = quota.remaining + 1 if quota.allowed else 0  # the budget now, before this one
    if not quota.allowed:
        summary["retry_after"] = math.ceil(quota.retry_after)
    return summary


def _cache(route: Route, method: str, headers: Mapping[str, str], *, authenticated: bool) -> dict[str, Any] | None:
    cache = route.cache
    if cache is None:
        return None
    summary: dict[str, Any] = {"ttl": cache.ttl, "shared": cache.shared}
    if route.websocket is not None and headers.get("Upgrade", "").lower() == "websocket":
        summary["decision"] = "bypass: WebSocket upgrade"
    elif method not in ("GET", "HEAD"):
        summary["decision"] = f"bypass: {method} is not cached (a success invalidates the path)"
    elif "Authorization" in headers and not authenticated and not cache.shared:
        summary["decision"] = "bypass: Authorization without a verified token (not shared)"
    elif "no-cache" in headers.get("Cache-Control", ""):
        summary["decision"] = "revalidate: the request says no-cache"
    else:
        summary["decision"] = "lookup" + ("" if cache.shared or not authenticated else " (keyed by subject)")
    return summary


async def _cache_entry(route: Route, store: Store, request: web.Request, target: Target) -> dict[str, Any]:
    """The store key this request maps to and what is stored there, read only.

    Uses the cache middleware's own lookup (generations, Vary, subject), so the key is the
    one a real request would use; ``Host`` is part of it, so pass the one clients send.
    """
    assert route.cache is not None
    checker = cache_module.CacheMiddleware(
        route.cache, store=store, scope=route.service, target=lambda _: (target.rest or "/", target.query)
    )
    try:
        key, entry = await checker.peek(request)
    except StoreUnavailable as exc:
        return {"key": None, "would_hit": None, "note": f"store unavailable: {exc}"}
    found: dict[str, Any] = {"key": key}
    if entry is None:
        found.update(would_hit=False, entry="none stored: a miss (fetched and stored)")
    else:
        age = entry.age_at(time.time())
        fresh = age < entry.fresh
        stale_ok = age - entry.fresh < route.cache.stale_while_revalidate
        found.update(would_hit=fresh or stale_ok, age=math.floor(age), fresh_for=max(0, math.floor(entry.fresh - age)))
        found["entry"] = "fresh: a hit" if fresh else "stale: served while revalidating" if stale_ok else "expired"
    if "Host" not in request.headers:
        found["note"] = "no Host header given: the key includes the Host clients send (-H 'Host: ...')"
    return found


def explain_offline(
    config: GatewayConfig, method: str, target: str, headers: Sequence[tuple[str, str]], *, client: str
) -> dict[str, Any]:
    """:func:`explain` in this process, on routes built from ``config`` (no gateway running):
    a memory store starts empty, so every budget shows full."""

    async def run() -> dict[str, Any]:
        runner = web.AppRunner(create_app(config), handle_signals=False)
        await runner.setup()  # startup only: session, store, keys, routes; nothing listens
        try:
            result = await explain(runner.app, method, target, headers, client=client)
        finally:
            await runner.cleanup()
        if config.store.url.startswith("memory:") and result.get("rate_limit"):
            result["rate_limit"]["note"] = "gateway not running: a memory store's budgets live in its process"
        return result

    return asyncio.run(run())


def render(result: Mapping[str, Any], *, source: str) -> str:
    """The explanation as a few aligned lines for a terminal."""
    request = result["request"]
    lines = [f"{request['method']} {request['target']}  (client {request['client']}; {source})"]

    def add(label: str, text: str) -> None:
        lines.append(f"  {label:<11}{text}")

    if "service" not in result:
        add("outcome", f"{result['outcome']['status']}: {result['outcome']['detail']}")
        return "\n".join(lines)
    route = result["route"]
    add("service", result["service"])
    add("route", route["name"] + (f" (override {route['override']})" if route["override"] else " (service default)"))
    upstream = result["upstream"]
    health = ", ".join(f"{c['url']} {'up' if c['healthy'] else 'DOWN'}" for c in upstream["candidates"])
    add("upstream", f"{upstream['url'] or '-'}   [{health}]")
    auth = result["auth"]
    detail = auth["result"]
    if auth.get("sub") is not None:
        detail += f": sub={auth['sub']} scopes={' '.join(auth.get('scopes', [])) or '-'}"
    if auth.get("detail"):
        detail += f": {auth['status']} {auth['detail']}"
    required = f", needs {' '.join(auth['scopes_required'])}" if auth["scopes_required"] else ""
    add("auth", f"{auth['mode']}{required} -> {detail}")
    limit = result["rate_limit"]
    if limit is None:
        add("rate limit", "off")
    else:
        remaining = "unknown" if limit["remaining"] is None else limit["remaining"]
        note = f"  ({limit['note']})" if limit.get("note") else ""
        add("rate limit", f"{limit['limit']} per {limit['per']:g}s by key {limit['key']}: {remaining} left{note}")
    cache = result["cache"]
    if cache is None:
        add("cache", "off")
    else:
        add("cache", f"ttl {cache['ttl']:g}s{' shared' if cache['shared'] else ''}: {cache['decision']}")
        if cache.get("key"):
            add("", f"key {cache['key']}: {cache['entry']}")
        if cache.get("note"):
            add("", cache["note"])
    outcome = result["outcome"]
    add("outcome", (f"{outcome['status']}: " if outcome["status"] else "") + outcome["detail"])
    return "\n".join(lines)
