"""The contracts between the gateway and its middlewares (DESIGN §4, §8).

Everything a middleware shares with the rest of the chain is declared here, on the
consumer's side: typed request keys, the per-request :class:`Outcome` that becomes the
access-log line, and :func:`add_response_headers`, the one way for a middleware to put
headers on a response that may be streamed (a proxied body, a cache hit, a problem).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = (
    "CLAIMS",
    "CLIENT_IP",
    "OUTCOME",
    "REQUEST_ID",
    "Handler",
    "IPNetwork",
    "Middleware",
    "Outcome",
    "add_response_headers",
    "install",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in by whoever knows; written once as the access-log line."""

    service: str | None = None
    route: str | None = None
    upstream: str | None = None
    cache: str | None = None
    ratelimit_remaining: int | None = None
    sub: str | None = None
    error: str | None = None
    status: int | None = None  # set when the response's headers are sent; None means nothing sent yet


REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)  # the client's address, honouring trusted_proxies
OUTCOME = web.RequestKey("outcome", Outcome)
CLAIMS = web.RequestKey("claims", dict[str, Any])  # verified JWT claims, when a token was verified
_RESPONSE_HEADERS = web.RequestKey("response_headers", dict[str, str])


def add_response_headers(request: web.Request, headers: Mapping[str, str]) -> None:
    """Have ``headers`` set on whatever response this request gets, just before it is sent."""
    pending = request.get(_RESPONSE_HEADERS)
    if pending is None:
        request[_RESPONSE_HEADERS] = dict(headers)
    else:
        pending.update(headers)


async def _apply_response_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    pending = request.get(_RESPONSE_HEADERS)
    if pending:
        response.headers.update(pending)
    outcome = request.get(OUTCOME)
    if outcome is not None:
        outcome.status = response.status


def install(app: web.Application) -> None:
    """Register the hook that applies :func:`add_response_headers` (call once per app)."""
    app.on_response_prepare.append(_apply_response_headers)
