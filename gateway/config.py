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
from middleware.schema import ConfigError, Section, describe, is_off

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
    "WebSocketConfig",
    "load_file",
    "load_text",
)

ROUTE_KEYS = ("auth", "scopes", "rate_limit", "cache", "timeout", "connect_timeout", "retries")
SERVICE_KEYS = ("upstreams", "websocket", "routes", "circuit_breaker")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
T = TypeVar("T")
_STORE_SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "rediss+cluster", "unix")
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
    body_timeout: float = 60.0  # longest pause between two reads of a request body
    drain_timeout: float = 10.0  # seconds in-flight requests get to finish after SIGTERM


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 3  # consecutive connection failures that take an upstream out
    cooldown: float = 10.0  # seconds it stays out before it is tried again


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketConfig:
    max_message: int = 1024 * 1024  # bytes in one message, either way; larger closes the socket with 1009
    messages_per_second: int = 100  # from the client, per socket (burst of as many); beyond it: 1008
    idle_timeout: float = 300.0  # seconds without a text/binary message either way before closing with 1001
    ping_interval: float = 30.0  # seconds of silence before the gateway pings a peer (pong due in half)

    @classmethod
    def parse(cls, section: Section) -> WebSocketConfig | None:
        """``websocket: true`` (defaults), a mapping of the fields above, or off/absent (None)."""
        if section.is_off():
            return None
        config = cls(
            max_message=section.size("max_message", 1024 * 1024),
            messages_per_second=section.positive_int("messages_per_second", 100),
            idle_timeout=section.duration("idle_timeout", 300.0, positive=True),
            ping_interval=section.duration("ping_interval", 30.0, positive=True),
        )
        section.done()
        return config


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A per-path route pattern, relative to the service: ``/public/*`` matches everything below
    ``/public/`` and ``/public`` itself; a ``*`` elsewhere matches within one segment; anything
    else is exact."""

    text: str
    regex: re.Pattern[str] = field(compare=False)

    @classmethod
    def compile(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise ValueError("must start with /")
        inner = text.split("/")[1:-1]  # a trailing slash is allowed; the segments before it must be plain
        if any(segment in ("", ".", "..") for segment in inner) or "?" in text or "#" in text or "\\" in text:
            raise ValueError("expected a normalised path: no //, . or .. segments, query or fragment")
        if text.endswith("/*"):
            # /admin itself and everything below /admin/: a bare /admin must not slip past the
            # rules meant for the subtree (nginx redirects it into the location for the same reason)
            return cls(text, re.compile(f"^{_segments(text[:-2])}(?:/.*)?$"))
        return cls(text, re.compile(f"^{_segments(text)}$"))

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None


def _segments(text: str) -> str:
    return "[^/]*".join(re.escape(part) for part in text.split("*"))


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
    except OSError as exc:
        raise ConfigInvalid([LocatedError(str(path), 1, 1, "", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigInvalid([LocatedError(str(path), 1, 1, "", f"cannot read: not UTF-8 ({exc.reason})")]) from None
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
        self._needs_jwt: ConfigError | None = None  # the first place that uses auth, for a missing jwt:

    def load(self) -> GatewayConfig:
        data = self._source.data
        if not isinstance(data, dict):
            raise ConfigInvalid([self._source.locate(ConfigError("", "expected a mapping at the top of the file"))])
        top = Section.single("", data, path="")
        listen = self._guard(lambda: _listen(_sub(top, "listen")), Listen())
        admin = self._guard(lambda: _admin(_sub(top, "admin", can_be_off=True)), AdminConfig())
        store = self._guard(lambda: _store(_sub(top, "store")), StoreConfig())
        limits = self._guard(lambda: _limits(_sub(top, "limits")), Limits())
        no_networks: tuple[IPNetwork, ...] = ()
        trusted = self._guard(lambda: _networks(top, "trusted_proxies"), no_networks)
        jwt_raw = top.raw("jwt", None)
        jwt = None
        if jwt_raw is not None and not is_off(jwt_raw):
            jwt = self._guard(lambda: JwtSettings.parse(_sub(top, "jwt")), None)
        defaults = top.raw("defaults", None)
        services_raw = top.raw("services", None)
        self._errors.extend(top.unknown())
        self._guard(lambda: _check_listeners(listen, admin), None)
        if defaults is None:
            defaults = {}
        elif not isinstance(defaults, dict):
            self._errors.append(ConfigError("defaults", f"expected a mapping, got {describe(defaults)}"))
            defaults = {}
        else:
            self._route_settings(Section.layered("defaults", [("defaults", defaults)]), "defaults", defaults=True)
        services: dict[str, Service] = {}
        if services_raw is None:
            self._errors.append(ConfigError("services", "required key is missing: at least one service"))
        elif not isinstance(services_raw, dict):
            self._errors.append(ConfigError("services", "expected a mapping of service name to service"))
        elif not services_raw:
            self._errors.append(ConfigError("services", "at least one service is needed"))
        for name, raw in services_raw.items() if isinstance(services_raw, dict) else ():
            service = self._service(name, raw, defaults)
            if service is not None:
                services[name] = service
        if (jwt_raw is None or is_off(jwt_raw)) and self._needs_jwt is not None:
            self._errors.append(self._needs_jwt)
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

    def _service(self, name: str, raw: object, defaults: dict[str, object]) -> Service | None:
        """The service at ``services.<name>``, or None when it has errors (all of them recorded)."""
        path = f"services.{name}"
        if not _SERVICE_NAME.match(name):
            message = "service names are letters, digits, '_', '.', '-' (they appear in URLs)"
            self._errors.append(ConfigError(path, message, at_key=True))
            return None
        if not isinstance(raw, dict):
            self._errors.append(ConfigError(path, "expected a mapping with at least `upstreams:`"))
            return None
        before = len(self._errors)
        own = Section.single(path, {k: v for k, v in raw.items() if k in SERVICE_KEYS}, path=path)
        no_urls: tuple[URL, ...] = ()
        upstreams = self._guard(lambda: _upstreams(own), no_urls)
        websocket = self._guard(lambda: WebSocketConfig.parse(own.child("websocket")), None)
        breaker = self._guard(lambda: _breaker(own), BreakerConfig())
        no_overrides: list[object] = []
        overrides = self._guard(lambda: _overrides(own), no_overrides)
        service_layer = {k: v for k, v in raw.items() if k not in SERVICE_KEYS}
        routes: list[Route] = []
        for index, override in enumerate(overrides):
            route = self._override(name, index, override, defaults, service_layer, upstreams, websocket)
            if route is not None:
                routes.append(route)
        section = Section.layered("route", [("defaults", defaults), (path, service_layer)])
        settings = self._route_settings(section, path)
        if settings is None or len(self._errors) > before:
            return None
        routes.append(settings.route(service=name, name=name, pattern=None, methods=None, upstreams=upstreams,
                                     websocket=websocket))  # fmt: skip
        return Service(name=name, upstreams=upstreams, breaker=breaker, routes=tuple(routes))

    def _override(
        self,
        service: str,
        index: int,
        raw: object,
        defaults: dict[str, object],
        service_layer: dict[str, object],
        upstreams: tuple[URL, ...],
        websocket: WebSocketConfig | None,
    ) -> Route | None:
        """``services.<service>.routes.<index>`` over the service and defaults, or None on errors."""
        service_path = f"services.{service}"
        path = f"{service_path}.routes.{index}"
        if not isinstance(raw, dict):
            self._errors.append(ConfigError(path, f"expected a mapping with `path:`, got {describe(raw)}"))
            return None
        section = Section.layered("route", [("defaults", defaults), (service_path, service_layer), (path, raw)])
        pattern = self._guard(lambda: _pattern(section), None)
        methods = self._guard(lambda: _methods(section), None)
        settings = self._route_settings(section, path)
        if pattern is None or settings is None:
            return None
        return settings.route(service=service, name=f"{service}/routes/{index}", pattern=pattern, methods=methods,
                              upstreams=upstreams, websocket=websocket)  # fmt: skip

    def _route_settings(self, section: Section, path: str, *, defaults: bool = False) -> _Settings | None:
        """The per-route keys of a merged section, every error recorded; None when there were any."""
        before = len(self._errors)
        settings = _Settings(
            timeout=self._guard(lambda: section.duration("timeout", 30.0, positive=True), 30.0),
            connect_timeout=self._guard(lambda: section.duration("connect_timeout", 2.0, positive=True), 2.0),
            retries=self._guard(lambda: section.integer("retries", 1, maximum=10), 1),
            auth=self._guard(lambda: AuthPolicy.parse(section), AuthPolicy()),
            rate_limit=self._guard(lambda: RateLimitConfig.parse(section.child("rate_limit")), None),
            cache=self._guard(lambda: CacheConfig.parse(section.child("cache")), None),
        )
        for key in ROUTE_KEYS:
            section.raw(key, None)  # read even when a parser stopped early: only typos are unknown
        self._errors.extend(section.unknown())
        if len(self._errors) > before:
            return None
        if not defaults and settings.auth.mode is not AuthMode.NONE and self._needs_jwt is None:
            if section.has("auth"):
                self._needs_jwt = section.error("auth", f"auth: {settings.auth.mode.value} needs a jwt: section")
            else:
                message = "auth: required (the default) needs a jwt: section, or set auth: none"
                self._needs_jwt = ConfigError(path, message, at_key=True)
        return settings


@dataclass(frozen=True, slots=True, kw_only=True)
class _Settings:
    """The keys a route inherits from the service and ``defaults`` (see :class:`Route`)."""

    timeout: float
    connect_timeout: float
    retries: int
    auth: AuthPolicy
    rate_limit: RateLimitConfig | None
    cache: CacheConfig | None

    def route(self, *, service: str, name: str, pattern: PathPattern | None, methods: frozenset[str] | None,
              upstreams: tuple[URL, ...], websocket: WebSocketConfig | None) -> Route:  # fmt: skip
        return Route(service=service, name=name, pattern=pattern, methods=methods, upstreams=upstreams,
                     websocket=websocket, timeout=self.timeout, connect_timeout=self.connect_timeout,
                     retries=self.retries, auth=self.auth, rate_limit=self.rate_limit, cache=self.cache)  # fmt: skip


def _sub(top: Section, key: str, *, can_be_off: bool = False) -> Section:
    """A top-level section; absent or empty means all defaults."""
    raw = top.raw(key, None)
    if raw is None:
        raw = {}
    elif not isinstance(raw, dict) and not (can_be_off and is_off(raw)):
        raise top.error(key, f"expected a mapping, got {describe(raw)}")
    return Section.single(key, raw, path=key)


def _check_listeners(listen: Listen, admin: AdminConfig) -> None:
    wildcard = ("0.0.0.0", "::", "")
    if (
        admin.enabled
        and admin.port == listen.port != 0
        and (admin.host == listen.host or admin.host in wildcard or listen.host in wildcard)
    ):
        raise ConfigError("admin.port", "the admin listener must not share the public listener's address")


def _overrides(service: Section) -> list[object]:
    overrides = service.raw("routes", [])
    if overrides is None:
        return []
    if not isinstance(overrides, list):
        raise service.error("routes", "expected a list of {path: ..., ...} overrides")
    return overrides


def _pattern(section: Section) -> PathPattern:
    try:
        return PathPattern.compile(section.text("path"))
    except ValueError as exc:
        raise section.error("path", str(exc)) from None


def _methods(section: Section) -> frozenset[str] | None:
    if not section.has("methods"):
        section.raw("methods", None)
        return None
    methods = {m.upper() for m in section.text_list("methods")}
    if not methods:
        raise section.error("methods", "expected at least one method (leave methods out for all of them)")
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


def _breaker(service: Section) -> BreakerConfig:
    section = service.child("circuit_breaker")
    if not service.has("circuit_breaker"):
        return BreakerConfig()
    if section.is_off():
        raise service.error(
            "circuit_breaker", "the circuit breaker cannot be switched off; expected {failures, cooldown}"
        )
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
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in _STORE_SCHEMES:
        raise section.error(
            "url",
            "expected memory://, redis://host:port/db, rediss://..., redis+cluster://h1:p1,h2:p2 or rediss+cluster://...",
        )
    if scheme != "memory" and not rest.strip("/"):
        raise section.error("url", f"{scheme}:// needs a host (or a socket path for unix://)")
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
        body_timeout=section.duration("body_timeout", 60.0, positive=True),
        drain_timeout=section.duration("drain_timeout", 10.0),
    )
    section.done()
    return limits


def _networks(top: Section, key: str) -> tuple[IPNetwork, ...]:
    if top.raw(key, None) is None:
        return ()
    entries = top.text_list(key)
    networks = []
    for index, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{key}.{index}", f"expected an IP address or CIDR, got {entry!r}") from None
    return tuple(networks)
