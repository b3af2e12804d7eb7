"""``/api/<service>/<rest>`` → a route, with the path made safe first (DESIGN §4).

The request target is normalised once, on its raw bytes: percent-escapes of unreserved
characters are decoded and the rest upper-cased, empty segments (``//``) merged, ``.`` and
``..`` resolved. A ``..`` that would climb out of ``/api/<service>/`` is a 400, and so is
anything a backend could read as a different path than the one routes were matched on:
control characters, a backslash, an encoded slash or backslash (``%2F``, ``%5C``), an
encoded NUL, CR or LF, or a broken escape. The upstream receives the normalised path and the query
string exactly as the client sent it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import web

from middleware.base import Handler, Recent
from middleware.cache import CacheMiddleware
from middleware.problem import Problem

from .config import Route, Service

if TYPE_CHECKING:
    from .chain import RouteChain

__all__ = ("API_PREFIX", "TARGET", "Match", "RouteTable", "Target", "normalise_path")

API_PREFIX = "api"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%(..)?", re.DOTALL)
_UNSAFE_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")
_FORBIDDEN_ESCAPES = frozenset({"00", "0A", "0D", "2F", "5C"})
_HEX = frozenset("0123456789ABCDEFabcdef")


class PathRejected(ValueError):
    """The raw path cannot be forwarded safely; the message says why (it becomes the 400 detail)."""


def normalise_path(raw: str) -> tuple[list[str], bool]:
    """Split a raw request path into normalised segments; also say whether it ended in ``/``.

    Raises :class:`PathRejected` for anything unsafe. ``..`` is resolved here; a ``..`` that
    climbs above the root is rejected (callers add their own floor, see :meth:`RouteTable.match`).
    """
    if not raw.startswith("/"):
        raise PathRejected("the request target must be an absolute path")
    bad = _UNSAFE_CHAR.search(raw)
    if bad is not None:
        if bad.group() == "\\":
            raise PathRejected("backslashes are not allowed in the path")
        raise PathRejected("control characters are not allowed in the path")
    if "%" in raw:
        raw = _ESCAPE.sub(_normalise_escape, raw)
    segments: list[str] = []
    parts = raw.split("/")
    for part in parts[1:]:
        if part in ("", "."):
            continue
        if part == "..":
            if not segments:
                raise PathRejected("the path climbs above the root")
            segments.pop()
            continue
        segments.append(part)
    trailing = parts[-1] in ("", ".", "..")
    return segments, trailing


def _normalise_escape(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is None or not (digits[0] in _HEX and digits[1] in _HEX):
        raise PathRejected("invalid percent-encoding in the path")
    digits = digits.upper()
    if digits in _FORBIDDEN_ESCAPES:
        raise PathRejected(f"%{digits} is not allowed in the path")
    char = chr(int(digits, 16))
    return char if char in _UNRESERVED else f"%{digits}"


class Target(NamedTuple):
    """Where a matched request goes: its path below the service, and the raw query (None: no '?').

    Named tuples, this and :class:`Match`: immutable like a frozen dataclass, and made for every
    new query string in about half the time."""

    rest: str
    query: str | None


TARGET = web.RequestKey("target", Target)


class Match(NamedTuple):
    route: Route
    handler: Handler
    target: Target
    lone_cache: CacheMiddleware | None = None  # see gateway.chain.RouteChain


class RouteTable:
    """The services of one config, each with its routes in match order (first match wins)."""

    def __init__(self, services: Mapping[str, Service], chains: Mapping[str, RouteChain]) -> None:
        self._services = {name: service.routes for name, service in services.items()}
        self._chains = chains  # route name -> built chain
        # whether the hit lane can answer for any route of this table (gateway.hit_lane)
        self.lone_caches = any(chain.lone_cache is not None for chain in chains.values())
        self._recent: Recent[tuple[str, str], Match | None] = Recent()  # (method, raw target) -> its match
        self._recent_paths: Recent[tuple[str, str], Match | None] = Recent()  # (method, path) -> a match without query

    def match(self, method: str, raw_target: str) -> Match | None:
        """The route for a raw request target (path and query), or None when no service claims it.

        Raises :class:`Problem` 400 when the path is unsafe or leaves ``/api/<service>/``.
        The answers for recent targets are remembered (a pure function of the target, and a
        table is replaced, not changed, on reload), and for recent paths whatever their query
        (an API sees many queries on one path); rejected targets are not.
        """
        key = (method, raw_target)
        try:
            return self._recent[key]
        except KeyError:
            pass
        path, question, query = raw_target.partition("?")
        if not question:
            found = self._match(method, path)
        else:
            path_key = (method, path)
            try:
                found = self._recent_paths[path_key]
            except KeyError:
                found = self._match(method, path)
                self._recent_paths.keep(path_key, found, len(path))
            if found is not None:
                found = Match(found.route, found.handler, Target(found.target.rest, query), found.lone_cache)
        self._recent.keep(key, found, len(raw_target))
        return found

    def _match(self, method: str, path: str) -> Match | None:
        """The match for ``path`` (no query)."""
        try:
            segments, trailing = normalise_path(path)
        except PathRejected as exc:
            raise Problem(400, str(exc)) from None
        if ("." in path or "%" in path) and _climbs_out(path):
            raise Problem(400, "the path leaves /api/<service>/")
        if len(segments) < 2 or segments[0] != API_PREFIX:
            return None
        routes = self._services.get(segments[1])
        if routes is None:
            return None
        rest = "/" + "/".join(segments[2:]) if len(segments) > 2 else ""
        if trailing:
            rest += "/"
        target = Target(rest, None)
        for route in routes:
            if route.matches(rest or "/", method):
                chain = self._chains[route.name]
                return Match(route, chain.handler, target, chain.lone_cache)
        return None  # unreachable: the service's catch-all matches everything


def _climbs_out(raw_path: str) -> bool:
    """True when resolving the dot segments of ``raw_path`` ever goes above ``/api/<service>``."""
    depth = 0
    for part in _ESCAPE.sub(lambda m: "." if (m.group(1) or "").upper() == "2E" else m.group(0), raw_path).split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 2:
                return True
        else:
            depth += 1
    return False
