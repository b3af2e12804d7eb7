"""routes.yaml → a frozen :class:`GatewayConfig` (DESIGN §3).

The only module that knows the shape of the whole file. It layers ``defaults`` → service →
per-path route, hands each middleware its own section to parse, and collects every error
as a :class:`LocatedError` (``routes.yaml:LINE:COL: dotted.path: message``).

Layering rule: for each key a route can set (``auth``, ``scopes``, ``rate_limit``, ``cache``,
``timeout``, ``connect_timeout``, ``retries``) the most specific layer that sets it wins,
as a whole: a route's ``cache: {ttl: 5m}`` replaces the service's ``cache:`` section
rather than merging into it (Kong's plugin-per-route behaviour).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from yarl import URL

from middleware.auth import AuthMode, AuthPolicy, JwtSettings
from middleware.base import IPNetwork
from middleware.cache import CacheConfig
from middleware.rate_limit import RateLimitConfig
from middleware.schema import ConfigError, Section

from .websocket import WebSocketConfig
from .yamlsource import LocatedError, Source, YamlError, parse_yaml

__all__ = (
    "AdminConfig",
    "BreakerConfig",
    "ConfigInvalid",
    "GatewayConfig",
    "Limits",
    "Listen",
    "PathPattern",
    "Route",
    "Service",
    "StoreConfig",
    "load_file",
    "load_text",
)

ROUTE_KEYS = ("auth", "scopes", "rate_limit", "cache", "timeout", "connect_timeout", "retries")
SERVICE_KEYS = ("upstreams", "websocket", "routes", "circuit_breaker")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
T = TypeVar("T")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class ConfigInvalid(Exception):
    """The file does not load; ``errors`` are the located problems, in file order."""

    def __init__(self, errors: Sequence[LocatedError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = tuple(errors)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"  # loopback by default: never on the public listener
    port: int = 9901
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "memory://"  # memory:// | redis://… | rediss://… | redis+cluster://h1:p1,h2:p2
    on_error: str = "allow"  # allow | deny | local: rate limiting when the store is unreachable
    timeout: float = 0.05  # seconds per store call before it counts as unreachable
    max_memory: int = 64 * 1024 * 1024  # bytes the memory store may hold (LRU beyond)


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int = 10 * 1024 * 1024  # bytes of request body; more is a 413
    header_timeout: float = 10.0  # seconds a client may take to send its request headers


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 3  # consecutive connection failures that take an upstream out
    cooldown: float = 10.0  # seconds it stays out before it is tried again


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A per-path route pattern, relative to the service: ``/public/*`` matches everything below
    ``/public/``; a ``*`` elsewhere matches within one segment; anything else is exact."""

    text: str
    regex: re.Pattern[str] = field(compare=False)

    @classmethod
    def compile(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise ValueError("must start with /")
        parts = text.split("*")
        body = "[^/]*".join(re.escape(p) for p in parts)
        if text.endswith("/*"):
            body = "[^/]*".join(re.escape(p) for p in parts[:-1]) + ".*"
        return cls(text, re.compile(f"^{body}$"))

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Everything needed to handle a request that matched: bound once at load."""

    service: str
    name: str  # "users" for the service itself, "users/routes/0" for its first override
    pattern: PathPattern | None  # None: the service's catch-all
    methods: frozenset[str] | None  # None: any method
    upstreams: tuple[URL, ...]
    websocket: WebSocketConfig | None
    timeout: float  # seconds to wait for the upstream's response headers, and between body reads
    connect_timeout: float  # seconds to open a connection to an upstream
    retries: int  # extra attempts on another upstream after a connection error (idempotent methods)
    auth: AuthPolicy
    rate_limit: RateLimitConfig | None
    cache: CacheConfig | None

    def matches(self, rest: str, method: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern is None or self.pattern.matches(rest)


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    name: str
    upstreams: tuple[URL, ...]
    breaker: BreakerConfig
    routes: tuple[Route, ...]  # overrides in file order, then the service's catch-all last


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    source: str  # the file it came from ("<text>" for strings)
    listen: Listen = Listen()
    admin: AdminConfig = AdminConfig()
    store: StoreConfig = StoreConfig()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    limits: Limits = Limits()
    jwt: JwtSettings | None = None
    services: Mapping[str, Service] = field(default_factory=dict)


def load_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load and validate a routes.yaml; raise :class:`ConfigInvalid` with every error found."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigInvalid([LocatedError(str(path), 1, 1, "", f"cannot read: {exc}")]) from None
    return load_text(text, filename=str(path), env=env)


def load_text(text: str, *, filename: str = "routes.yaml", env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load a routes.yaml document from a string (what tests use)."""
    try:
        source = parse_yaml(text, filename=filename, env=os.environ if env is None else env)
    except YamlError as exc:
        raise ConfigInvalid([exc.error]) from None
    return _Loader(source).load()


class _Loader:
    def __init__(self, source: Source) -> None:
        self._source = source
        self._errors: list[ConfigError] = []

    def load(self) -> GatewayConfig:
        data = self._source.data
        if not isinstance(data, dict):
            raise ConfigInvalid([self._source.locate(ConfigError("", "expected a mapping at the top of the file"))])
        top = Section.single("", data, path="")
        listen = self._guard(lambda: _listen(_sub(top, "listen")), Listen())
        admin = self._guard(lambda: _admin(_sub(top, "admin")), AdminConfig())
        store = self._guard(lambda: _store(_sub(top, "store")), StoreConfig())
        limits = self._guard(lambda: _limits(_sub(top, "limits")), Limits())
        no_networks: tuple[IPNetwork, ...] = ()
        trusted = self._guard(lambda: _networks(top, "trusted_proxies"), no_networks)
        jwt = None
        if top.has("jwt") and top.raw("jwt") is not None:
            jwt = self._guard(lambda: JwtSettings.parse(_sub(top, "jwt")), None)
        defaults = top.raw("defaults", {})
        services_raw = top.raw("services", None)
        self._guard(top.done, None)
        if not isinstance(defaults, dict):
            self._errors.append(ConfigError("defaults", "expected a mapping"))
            defaults = {}
        services: dict[str, Service] = {}
        self._guard(lambda: self._check_defaults(defaults), None)
        if services_raw is None:
            self._errors.append(ConfigError("services", "required key is missing: at least one service"))
        elif not isinstance(services_raw, dict):
            self._errors.append(ConfigError("services", "expected a mapping of service name to service"))
        else:
            for name, raw in services_raw.items():
                try:
                    services[name] = self._service(name, raw, defaults)
                except ConfigError as exc:
                    self._errors.append(exc)
        if (
            jwt is None
            and any(r.auth.mode is not AuthMode.NONE for s in services.values() for r in s.routes)
            and not self._errors
        ):
            self._errors.append(
                ConfigError("jwt", "routes use auth (the default is `auth: required`) but no jwt: section is set")
            )
        if self._errors:
            located = {str(e): e for e in (self._source.locate(error) for error in self._errors)}
            raise ConfigInvalid(sorted(located.values(), key=lambda e: (e.line, e.column)))
        return GatewayConfig(
            source=self._source.filename,
            listen=listen,
            admin=admin,
            store=store,
            trusted_proxies=trusted,
            limits=limits,
            jwt=jwt,
            services=services,
        )

    def _guard(self, build: Callable[[], T], fallback: T) -> T:
        try:
            return build()
        except ConfigError as exc:
            self._errors.append(exc)
            return fallback

    def _check_defaults(self, defaults: dict[str, object]) -> None:
        section = Section.layered("defaults", [("defaults", defaults)])
        _route_settings(section, "defaults")
        section.done()

    def _service(self, name: str, raw: object, defaults: dict[str, object]) -> Service:
        path = f"services.{name}"
        if not _SERVICE_NAME.match(name):
            raise ConfigError(path, "service names are letters, digits, '_', '.', '-' (they appear in URLs)")
        if not isinstance(raw, dict):
            raise ConfigError(path, "expected a mapping with at least `upstreams:`")
        own = Section.single(path, {k: v for k, v in raw.items() if k in SERVICE_KEYS}, path=path)
        upstreams = _upstreams(own)
        websocket = WebSocketConfig.parse(own.child("websocket"))
        breaker = _breaker(own.child("circuit_breaker")) if own.has("circuit_breaker") else BreakerConfig()
        overrides = own.raw("routes", [])
        if not isinstance(overrides, list):
            raise own.error("routes", "expected a list of {path: ..., ...} overrides")
        service_layer = {k: v for k, v in raw.items() if k not in SERVICE_KEYS}
        common = {"service": name, "upstreams": upstreams, "websocket": websocket}
        routes = []
        for index, override in enumerate(overrides):
            route_path = f"{path}.routes.{index}"
            if not isinstance(override, dict):
                raise ConfigError(route_path, "expected a mapping with `path:`")
            section = Section.layered("route", [("defaults", defaults), (path, service_layer), (route_path, override)])
            try:
                pattern = PathPattern.compile(section.text("path"))
            except ValueError as exc:
                raise section.error("path", str(exc)) from None
            methods = _methods(section)
            routes.append(
                Route(name=f"{name}/routes/{index}", pattern=pattern, methods=methods,
                      **common, **_route_settings(section, route_path))  # type: ignore[arg-type]
            )  # fmt: skip
            section.done()
        section = Section.layered("route", [("defaults", defaults), (path, service_layer)])
        routes.append(
            Route(name=name, pattern=None, methods=None, **common, **_route_settings(section, path))  # type: ignore[arg-type]
        )
        section.done()
        return Service(name=name, upstreams=upstreams, breaker=breaker, routes=tuple(routes))


def _sub(top: Section, key: str) -> Section:
    """A top-level section; absent or null means all defaults."""
    raw = top.raw(key, None)
    return Section.single(key, {} if raw is None else raw, path=key)


def _route_settings(section: Section, path: str) -> dict[str, object]:
    return {
        "timeout": section.duration("timeout", 30.0, positive=True),
        "connect_timeout": section.duration("connect_timeout", 2.0, positive=True),
        "retries": section.integer("retries", 1, maximum=10),
        "auth": AuthPolicy.parse(section),
        "rate_limit": RateLimitConfig.parse(section.child("rate_limit")),
        "cache": CacheConfig.parse(section.child("cache")),
    }


def _methods(section: Section) -> frozenset[str] | None:
    if not section.has("methods"):
        section.raw("methods", None)
        return None
    methods = {m.upper() for m in section.text_list("methods")}
    unknown = methods - _METHODS
    if unknown:
        raise section.error("methods", f"unknown method {sorted(unknown)[0]}")
    if "GET" in methods:
        methods.add("HEAD")
    return frozenset(methods)


def _upstreams(section: Section) -> tuple[URL, ...]:
    raw = section.text_list("upstreams")
    if not raw:
        raise section.error("upstreams", "at least one upstream is needed")
    urls = []
    for index, text in enumerate(raw):
        where = f"{section.path_of('upstreams')}.{index}"
        try:
            url = URL(text)
        except ValueError as exc:
            raise ConfigError(where, f"not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(where, "expected http://host:port or https://host:port, optionally with a path prefix")
        if url.query_string or url.fragment or url.user:
            raise ConfigError(where, "an upstream URL may carry a path prefix but no query, fragment or credentials")
        urls.append(url.with_path(url.path.rstrip("/")))
    return tuple(urls)


def _breaker(section: Section) -> BreakerConfig:
    config = BreakerConfig(
        failures=section.positive_int("failures", 3), cooldown=section.duration("cooldown", 10.0, positive=True)
    )
    section.done()
    return config


def _port(section: Section, default: int) -> int:
    return section.integer("port", default, minimum=0, maximum=65535)


def _listen(section: Section) -> Listen:
    listen = Listen(host=section.text("host", "0.0.0.0"), port=_port(section, 8080))
    section.done()
    return listen


def _admin(section: Section) -> AdminConfig:
    if section.is_off():
        return AdminConfig(enabled=False)
    admin = AdminConfig(host=section.text("host", "127.0.0.1"), port=_port(section, 9901))
    section.done()
    return admin


def _store(section: Section) -> StoreConfig:
    url = section.text("url", "memory://")
    if not url.startswith(("memory://", "redis://", "rediss://", "redis+cluster://", "unix://")):
        raise section.error("url", "expected memory://, redis://, rediss:// or redis+cluster://")
    store = StoreConfig(
        url=url,
        on_error=section.text("on_error", "allow", choices=("allow", "deny", "local")),
        timeout=section.duration("timeout", 0.05, positive=True),
        max_memory=section.size("max_memory", 64 * 1024 * 1024),
    )
    section.done()
    return store


def _limits(section: Section) -> Limits:
    limits = Limits(
        max_body=section.size("max_body", 10 * 1024 * 1024),
        header_timeout=section.duration("header_timeout", 10.0, positive=True),
    )
    section.done()
    return limits


def _networks(top: Section, key: str) -> tuple[IPNetwork, ...]:
    entries = top.text_list(key, ())
    networks = []
    for index, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(f"{key}.{index}", f"expected an IP address or CIDR, got {entry!r}") from None
    return tuple(networks)
