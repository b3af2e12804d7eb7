"""``create_app(config)``: the gateway as an aiohttp application (DESIGN §4, §5).

Pure wiring: typed app keys, the two app-wide middlewares, resources born and closed in
``cleanup_ctx`` (one pooled ``ClientSession`` per process, then the route table built on
it), and :func:`dispatch`, the one aiohttp route. Process concerns (sockets, signals,
workers) live in :mod:`gateway.server`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web

from middleware import base
from middleware.auth import KeySource, claim_header_names, claim_headers
from middleware.base import OUTCOME, Store, StoreUnavailable
from middleware.problem import Problem, ProblemMiddleware
from middleware.request_id import RequestIdMiddleware

from . import websocket
from .chain import ChainDeps, build_route_handler
from .config import GatewayConfig
from .proxy import Forwarder
from .routing import TARGET, RouteTable
from .stores import MemoryStore, open_store
from .upstreams import UpstreamPool

__all__ = ("CONFIG", "KEYS", "ROUTES", "SESSION", "STORE", "RouteHolder", "create_app", "dispatch")

logger = logging.getLogger(__name__)


class RouteHolder:
    """The live route table; replaced as a whole on reload, so the app key never changes."""

    table: RouteTable | None = None


CONFIG = web.AppKey("config", GatewayConfig)
SESSION = web.AppKey("session", aiohttp.ClientSession)
ROUTES = web.AppKey("routes", RouteHolder)
KEYS = web.AppKey("keys", KeySource)
STORE = web.AppKey("store", Store)


def create_app(config: GatewayConfig) -> web.Application:
    app = web.Application(
        middlewares=[RequestIdMiddleware(trusted_proxies=config.trusted_proxies), ProblemMiddleware()],
        handler_args={"max_field_size": 16 * 1024},
    )
    app[CONFIG] = config
    app[ROUTES] = RouteHolder()
    app.cleanup_ctx.extend([client_session, store, jwt_keys, route_table])  # torn down in reverse
    base.install(app)
    websocket.install(app)  # open relays tracked, closed with 1001 on shutdown
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session per process, with keep-alive to every upstream."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=10)
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would hand one client's cookies to the next
        auto_decompress=False,  # bytes pass through untouched (§5)
        timeout=aiohttp.ClientTimeout(total=None),  # per-route timeouts are set per request
        skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE),
        trust_env=False,
    ) as session:
        app[SESSION] = session
        yield


async def store(app: web.Application) -> AsyncIterator[None]:
    """The store behind rate limits and the cache: opened once per process, closed at cleanup."""
    config = app[CONFIG].store
    opened = open_store(config)
    try:
        await opened.ping()
    except StoreUnavailable as exc:  # keep serving: store.on_error decides what limits do meanwhile
        logger.warning("store %s is not answering at startup (on_error: %s): %s",
                       config.url.partition("://")[0], config.on_error, exc)  # fmt: skip
    app[STORE] = opened
    try:
        yield
    finally:
        await opened.aclose()


async def jwt_keys(app: web.Application) -> AsyncIterator[None]:
    """The JWT verification keys: a static key, or a JWKS fetched on the shared session."""
    settings = app[CONFIG].jwt
    if settings is None:
        yield
        return
    keys = KeySource(settings, session=app[SESSION])
    await keys.start()
    app[KEYS] = keys
    try:
        yield
    finally:
        await keys.aclose()


async def route_table(app: web.Application) -> AsyncIterator[None]:
    """Build every route's chain once, on the shared session."""
    config = app[CONFIG]
    jwt = config.jwt
    forwarder = Forwarder(
        app[SESSION],
        trusted_proxies=config.trusted_proxies,
        max_body=config.limits.max_body,
        strip_headers=frozenset(claim_header_names(jwt)) if jwt else frozenset(),
        claim_headers=functools.partial(claim_headers, jwt) if jwt else None,
    )
    pools = {name: UpstreamPool(name, service.upstreams, service.breaker) for name, service in config.services.items()}
    on_error = config.store.on_error
    deps = ChainDeps(
        forwarder=forwarder,
        pools=pools,
        jwt=jwt,
        keys=app.get(KEYS),
        store=app[STORE],
        on_error=on_error,
        local_store=MemoryStore(config.store.max_memory) if on_error == "local" else None,
    )
    handlers = {route.name: build_route_handler(route, deps) for s in config.services.values() for route in s.routes}
    app[ROUTES].table = RouteTable(config.services, handlers)
    yield


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Find the route for the request and run its chain."""
    table = request.app[ROUTES].table
    assert table is not None, "route_table runs at startup"
    match = table.match(request.method, request.raw_path)
    if match is None:
        raise Problem(404, f"no service is mapped at {request.path}; services live under /api/<service>/")
    route = match.route
    outcome = request[OUTCOME]
    outcome.service = route.service
    outcome.route = route.name
    if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        if route.websocket is None:
            raise Problem(400, f"{route.service} does not accept WebSocket upgrades")
    request[TARGET] = match.target
    return await match.handler(request)
