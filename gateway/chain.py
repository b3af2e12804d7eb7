"""The per-route chain, outer to inner, written once (DESIGN §4).

App-wide, outside every chain: request id + access log, then problem rendering
(:func:`gateway.app.create_app`). Per route, built once when the config is loaded:

    JWT auth → rate limit → cache → endpoint (the proxy, or the WebSocket relay)

Auth runs before the cache so a protected response is never served to an unauthenticated
client, and before rate limiting so limits can be per subject. A section that is off for a
route adds no middleware at all: nothing in a chain asks "am I enabled here?".

Auth and the rate limit decide whether a request goes on and do nothing once it has (Kong's
*access* phase): the chain runs their ``access`` steps one after the other in one frame
(:class:`AccessSteps`) rather than nesting them around the cache and the proxy, where each
would stay a coroutine frame that every later wait of the request resumes through.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from middleware.auth import AuthMode, JwtAuthMiddleware, JwtSettings, KeySource, RejectedTokens, VerifiedTokens
from middleware.base import Handler, Middleware, Store
from middleware.cache import CacheMiddleware
from middleware.rate_limit import RateLimitMiddleware

from .config import Route
from .proxy import Forwarder, RouteProxy
from .routing import TARGET
from .upstreams import UpstreamPool
from .websocket import WebSocketRelay, upgrades_to

__all__ = ("AccessSteps", "ChainDeps", "RouteChain", "build_route_chain", "compose")

AccessStep = Callable[[web.Request], Awaitable[None]]  # returns when the request may go on, else raises


@dataclass(frozen=True, slots=True)
class ChainDeps:
    """What the chains of one config share: the forwarder (pooled session) and upstream pools."""

    forwarder: Forwarder
    pools: dict[str, UpstreamPool]  # by service name
    jwt: JwtSettings | None
    keys: KeySource | None  # verification keys (static or JWKS), when jwt: is configured
    verified: VerifiedTokens | None  # one verified-token cache for every route of the config (jwt.verify_cache)
    rejected: RejectedTokens | None  # and one of the tokens that failed for good
    store: Store  # rate-limit budgets and cache entries (memory or Redis)
    on_error: str  # store.on_error: allow | deny | local
    local_store: Store | None  # the in-process fallback when on_error is local


def compose(middlewares: Sequence[Middleware], endpoint: Handler) -> Handler:
    """Wrap ``endpoint`` so that ``middlewares[0]`` runs first (aiohttp's own composition)."""
    handler = endpoint
    for middleware in reversed(middlewares):
        handler = functools.partial(middleware, handler=handler)  # type: ignore[call-arg]
    return handler


class AccessSteps:
    """``steps`` awaited in order, then ``handler``: the same as the middlewares nested around
    ``handler``, for middlewares that only decide (a step raises to refuse), with one frame
    left on the request's later waits instead of one per middleware."""

    __slots__ = ("_handler", "_steps")

    def __init__(self, steps: Sequence[AccessStep], handler: Handler) -> None:
        self._steps = tuple(steps)
        self._handler = handler

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        for step in self._steps:
            await step(request)
        return await self._handler(request)


@dataclass(frozen=True, slots=True)
class RouteChain:
    """A route's built chain, and its cache when that is the whole chain before the proxy on a
    store read without awaiting: then a fresh hit is the cache's answer alone, and the gateway's
    hit lane may give it without running the chain (:mod:`gateway.hit_lane`)."""

    handler: Handler
    lone_cache: CacheMiddleware | None = None


def build_route_chain(route: Route, deps: ChainDeps) -> RouteChain:
    """The route's endpoint behind its middlewares, in the fixed order: auth's and the rate
    limit's access steps, then the cache around the endpoint."""
    endpoint: Handler = RouteProxy(deps.forwarder, route, deps.pools[route.service])
    if route.websocket is not None:
        leeway = deps.jwt.leeway if deps.jwt else 0.0
        relay = WebSocketRelay(deps.forwarder, route, deps.pools[route.service], leeway=leeway)
        endpoint = upgrades_to(relay, endpoint)
    steps: list[AccessStep] = []  # auth, then the rate limit: see AccessSteps
    if route.auth.mode is not AuthMode.NONE:
        if deps.jwt is None or deps.keys is None:  # config.py refuses this; never serve a protected route open
            raise RuntimeError(f"route {route.name} uses auth but there is no jwt: section")
        auth = JwtAuthMiddleware(
            route.auth,
            settings=deps.jwt,
            keys=deps.keys,
            websocket=route.websocket is not None,
            verified=deps.verified,
            rejected=deps.rejected,
        )
        steps.append(auth.access)
    if route.rate_limit is not None:
        limit = RateLimitMiddleware(
            route.rate_limit, store=deps.store, scope=route.name, on_error=deps.on_error, fallback=deps.local_store
        )
        steps.append(limit.access)
    handler, cache = endpoint, None
    if route.cache is not None:
        cache = CacheMiddleware(route.cache, store=deps.store, scope=route.service, target=_target)
        handler = compose([cache], endpoint)
    alone = cache is not None and not steps and route.websocket is None and cache.answers_now
    return RouteChain(AccessSteps(steps, handler) if steps else handler, cache if alone else None)


def _target(request: web.Request) -> tuple[str, str | None]:
    """The cache's view of a request: its normalised path below the service, and the raw query."""
    target = request[TARGET]
    return target.rest or "/", target.query
