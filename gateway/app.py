"""``create_app(config)``: the gateway as an aiohttp application (DESIGN §4, §5).

Pure wiring: typed app keys, the two app-wide middlewares, resources born and closed in
``cleanup_ctx`` (one pooled ``ClientSession`` per process, for fetching a JWKS; the store;
then the route table), and :func:`dispatch`, the one aiohttp route. Process concerns (sockets, signals,
workers) live in :mod:`gateway.server`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import cast

import aiohttp
from aiohttp import hdrs, web, web_urldispatcher
from yarl import URL

from middleware import base
from middleware.auth import KeySource, RejectedTokens, VerifiedTokens, claim_header_names, claim_headers
from middleware.base import OUTCOME, Handler, Store, StoreUnavailable
from middleware.problem import Problem, ProblemMiddleware
from middleware.request_id import RequestIdMiddleware

from . import websocket
from .access_log import LineBatcher
from .chain import ChainDeps, build_route_chain, compose
from .config import GatewayConfig, Service
from .hit_lane import HitLane
from .metrics import METRICS, Metrics, refresh_in_background
from .proxy import Forwarder
from .routing import TARGET, RouteTable
from .stores import MemoryStore, open_store
from .upstreams import UpstreamPool

__all__ = (
    "CONFIG",
    "HIT_LANE",
    "KEYS",
    "ROUTES",
    "SESSION",
    "STORE",
    "RouteHolder",
    "build_routes",
    "create_app",
    "dispatch",
)

logger = logging.getLogger(__name__)


class RouteHolder:
    """The live route table; replaced as a whole on reload, so the app key never changes.

    ``config`` is the config the table was built from: after a reload it is newer than
    ``app[CONFIG]`` (the startup config, which an app cannot change once started).
    """

    table: RouteTable | None = None
    config: GatewayConfig | None = None
    keys: KeySource | None = None  # the JWT keys the table verifies with

    def __init__(self) -> None:
        self.pools: dict[str, UpstreamPool] = {}  # by service; kept across reloads while unchanged


CONFIG = web.AppKey("config", GatewayConfig)
SESSION = web.AppKey("session", aiohttp.ClientSession)
ROUTES = web.AppKey("routes", RouteHolder)
KEYS = web.AppKey("keys", KeySource)
STORE = web.AppKey("store", Store)
HIT_LANE = web.AppKey("hit_lane", HitLane)
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def create_app(
    config: GatewayConfig, *, metrics: Metrics | None = None, access_log: LineBatcher | None = None
) -> web.Application:
    """The gateway app for ``config``. ``access_log`` takes the JSON access-log lines (the
    server passes a batched stdout writer); without it they go to the ``gateway.access`` logger."""
    metrics = Metrics() if metrics is None else metrics
    requests = RequestIdMiddleware(
        trusted_proxies=config.trusted_proxies,
        observe=metrics.observe,
        access_sink=access_log,
        errors=ProblemMiddleware().render,
    )
    app = web.Application(
        # request line 8190 bytes (414 beyond), header fields 16 KiB (431), idle keep-alive 75 s (nginx's)
        handler_args={"max_line_size": 8190, "max_field_size": 16 * 1024, "keepalive_timeout": 75.0},
    )
    app[CONFIG] = config
    app[ROUTES] = RouteHolder()
    app[HIT_LANE] = HitLane(app[ROUTES], requests)  # used by the server's connections (GatewayProtocol)
    app[METRICS] = metrics
    metrics.add_source(functools.partial(_state_gauges, app))
    if access_log is not None:
        app.on_cleanup.append(lambda _app: _flushed(access_log))
    app.cleanup_ctx.extend([client_session, store, jwt_keys, route_table, refresh_in_background])  # reverse teardown
    base.install(app)
    websocket.install(app)  # open relays tracked, closed with 1001 on shutdown
    # every path, even one with an encoded newline
    app.router.register_resource(EveryPath(_app_wide(requests)))
    return app


def request_handler(app: web.Application) -> ServerHandler | None:
    """The handler the server gives ``app``'s requests to: its :class:`EveryPath`'s
    (:meth:`EveryPath.handler_for`), or None when ``app`` is not a gateway app."""
    for resource in app.router.resources():
        if isinstance(resource, EveryPath):
            return resource.handler_for(app)
    return None


class EveryPath(web_urldispatcher.AbstractResource):
    """One handler for every path and method: the gateway routes by itself (:class:`RouteTable`),
    so aiohttp's router only has to hand every request over. A resource that matches without a
    regular expression or a match dict does that in a fraction of what ``/{tail:.*}`` costs
    (the router's resolve was about 5% of a proxied request's time)."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self._handler = handler

        async def handle(request: web.Request) -> web.StreamResponse:  # aiohttp's routes want a coroutine function
            return await handler(request)

        self._route = web_urldispatcher.ResourceRoute(hdrs.METH_ANY, handle, self)
        self._nothing: dict[str, str] = {}

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        return URL.build(path="/")

    async def resolve(self, request: web.Request) -> tuple[web_urldispatcher.UrlMappingMatchInfo, set[str]]:
        return web_urldispatcher.UrlMappingMatchInfo(self._nothing, self._route), set()

    def add_prefix(self, prefix: str) -> None:
        # aiohttp calls this when an app is mounted with add_subapp(prefix, app); the gateway
        # owns its whole URL space (DESIGN §4: /api/<service>/...), so that is refused loudly
        raise ValueError(f"the gateway app cannot be mounted under a prefix ({prefix!r}); run it as the root app")

    def get_info(self) -> web_urldispatcher._InfoDict:
        return {"path": "/"}

    def handler_for(self, app: web.Application) -> ServerHandler:
        """The server's request handler for ``app`` (this resource's app), in place of aiohttp's
        ``Application._handle``, which walks the router for every request: each segment of the path
        looked up until this resource, the app's only one, is found at ``/``. That walk and the match
        made per request were about 24k instructions of a proxied request's 428k, measured.

        Every request matches this resource the same way, so one match, frozen, serves them all.
        What ``_handle`` does besides is kept: the match is set on the request (``request.app``,
        ``request.match_info``), and ``Expect: 100-continue`` is answered by aiohttp's handler.
        App middlewares would be skipped: the gateway composes its own (:func:`_app_wide`).
        A target the router could not walk (an authority-form ``CONNECT``) reaches the chain too."""
        if app.middlewares:
            raise ValueError("the gateway app composes its middlewares itself; app.middlewares would be skipped")
        match_info = web_urldispatcher.UrlMappingMatchInfo(self._nothing, self._route)
        match_info.add_app(app)
        match_info.freeze()
        handler = self._handler

        async def expecting(request: web.Request) -> web.StreamResponse:
            response = await match_info.expect_handler(request)
            await request.writer.drain()
            if response is not None:
                return response
            return await handler(request)

        # A plain function handing back the chain's coroutine, not a coroutine of its own: no
        # frame of it on every resume of the request (see dispatch).
        def handle(base_request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            request = cast("web.Request", base_request)  # the app's request factory makes web.Requests
            request._match_info = match_info
            if request.headers.get(hdrs.EXPECT):
                return expecting(request)
            return handler(request)

        return handle

    def raw_match(self, path: str) -> bool:
        return True

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[web_urldispatcher.AbstractRoute]:
        return iter((self._route,))


def _app_wide(requests: RequestIdMiddleware) -> Handler:
    """:func:`dispatch` inside the app-wide middleware, composed here rather than given to
    aiohttp: its middleware machinery (a context manager entered per middleware and request)
    cost about 10k instructions of a plain proxied request's 470k, measured. The request-id
    middleware renders problems itself (``errors=``), so both are one frame. Every request comes
    here, through :meth:`EveryPath.handler_for`: even an authority-form ``CONNECT`` target, which
    the routing then refuses (400) like any target that is not an absolute path."""
    return compose([requests], dispatch)


async def _flushed(lines: LineBatcher) -> None:
    lines.flush()


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session per process: the JWKS fetches. (Proxied requests go out on each
    upstream's own connections, :mod:`gateway.upstream_http`; WebSockets on connections of their own.)"""
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
    """Build every route's chain once."""
    holder = app[ROUTES]
    holder.keys = app.get(KEYS)
    holder.table, holder.pools = build_routes(app, app[CONFIG], keys=holder.keys)
    holder.config = app[CONFIG]
    yield
    for pool in holder.pools.values():
        pool.close()


def build_routes(
    app: web.Application,
    config: GatewayConfig,
    *,
    keys: KeySource | None,
    previous: RouteHolder | None = None,
) -> tuple[RouteTable, dict[str, UpstreamPool]]:
    """Every route's chain for ``config``, on the app's store (at startup, and again
    on each reload). The pool of a service whose upstreams and breaker are unchanged is taken
    from ``previous``, so its breaker state survives a reload; rate-limit budgets live in the store."""
    jwt = config.jwt
    forwarder = Forwarder(
        trusted_proxies=config.trusted_proxies,
        max_body=config.limits.max_body,
        strip_headers=frozenset(claim_header_names(jwt)) if jwt else frozenset(),
        claim_headers=functools.partial(claim_headers, jwt) if jwt else None,
    )
    pools = {name: _pool(name, service, previous) for name, service in config.services.items()}
    on_error = config.store.on_error
    deps = ChainDeps(
        forwarder=forwarder,
        pools=pools,
        jwt=jwt,
        keys=keys,
        verified=VerifiedTokens(jwt.verify_cache) if jwt and jwt.verify_cache > 0 else None,
        rejected=RejectedTokens(jwt.verify_cache) if jwt and jwt.verify_cache > 0 else None,
        store=app[STORE],
        on_error=on_error,
        local_store=MemoryStore(config.store.max_memory) if on_error == "local" else None,
    )
    chains = {route.name: build_route_chain(route, deps) for s in config.services.values() for route in s.routes}
    return RouteTable(config.services, chains), pools


def _pool(name: str, service: Service, previous: RouteHolder | None) -> UpstreamPool:
    if previous is not None and previous.config is not None and name in previous.pools:
        before = previous.config.services.get(name)
        if before is not None and (before.upstreams, before.breaker) == (service.upstreams, service.breaker):
            return previous.pools[name]
    return UpstreamPool(name, service.upstreams, service.breaker)


def _state_gauges(app: web.Application, metrics: Metrics) -> None:
    """The gauges read from live objects: upstream health, open WebSocket relays."""
    holder = app[ROUTES]
    metrics.set_upstream_health(
        (name, upstream.label, pool.healthy(upstream))
        for name, pool in holder.pools.items()
        for upstream in pool.upstreams
    )
    relays = app.get(websocket.OPEN_RELAYS)
    metrics.websockets.set(len(relays) if relays is not None else 0)


def dispatch(request: web.Request) -> Awaitable[web.StreamResponse]:
    """Find the route for the request and hand back its chain's coroutine (or raise a Problem).

    A plain function, not a coroutine: a request waits four or five times (its Redis take, its
    cache lookup, the upstream's answer, its cache write), and every resume passes through every
    coroutine frame between aiohttp's handler and the wait: six pass-through frames more cost a
    full-chain request 6.6% more CPU, measured (bench/README.md, fourteenth session). So
    :meth:`EveryPath.handler_for`'s ``handle``, the upstream pool's ``request`` and the store's
    ``write`` hand back awaitables too, and the route chain runs auth and the rate limit as access
    steps (:class:`gateway.chain.AccessSteps`) rather than nested around the rest."""
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
    return match.handler(request)
