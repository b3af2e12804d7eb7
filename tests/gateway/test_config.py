"""routes.yaml → GatewayConfig (DESIGN §3): typed objects, layering, ${VAR}, and the
``routes.yaml:LINE:COL: dotted.path: message`` errors that `gateway check` prints.

YAML in these tests starts on line 1 (a string opened with a backslash, then dedented), so
every expected ``LINE:COL`` can be counted in the source.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
from pathlib import Path

import pytest
from yarl import URL

from gateway.config import (
    AdminConfig,
    BreakerConfig,
    ConfigInvalid,
    GatewayConfig,
    Limits,
    Listen,
    PathPattern,
    Route,
    Service,
    StoreConfig,
    load_file,
    load_text,
)
from gateway.websocket import WebSocketConfig
from middleware.auth import AuthMode, AuthPolicy
from middleware.cache import CacheConfig
from middleware.rate_limit import RateLimitConfig

SECRET = "config-test-secret-0123456789abcdef"
ENV = {"JWT_SECRET": SECRET}

BAD_UPSTREAM = "expected http://host:port or https://host:port, optionally with a path prefix"
UPSTREAM_EXTRAS = "an upstream URL may carry a path prefix but no query, fragment or credentials"
BAD_DURATION = "expected a duration like 250ms, 2s, 5m, 1h or a number of seconds"
BAD_SIZE = "expected a size like 512KiB, 10MiB or a number of bytes"
BAD_STORE = (
    "expected memory://, redis://host:port/db, rediss://..., redis+cluster://h1:p1,h2:p2 or rediss+cluster://..."
)


def load(text: str, env: dict[str, str] | None = None) -> GatewayConfig:
    return load_text(textwrap.dedent(text), env=ENV if env is None else env)


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigInvalid) as caught:
        load(text, env)
    assert str(caught.value) == "\n".join(str(e) for e in caught.value.errors)
    return [str(error) for error in caught.value.errors]


def first_match(service: Service, rest: str, method: str = "GET") -> Route:
    return next(route for route in service.routes if route.matches(rest, method))


# A service with auth off, for tests about something else.
PLAIN = """\
defaults: {auth: none}
services:
  users:
    upstreams: [http://127.0.0.1:9001]
"""


# -- a whole valid file -------------------------------------------------------------------------

DESIGN_EXAMPLE = """\
listen: {host: 0.0.0.0, port: 8080}
admin:  {host: 127.0.0.1, port: 9901}
store:
  url: memory://
  on_error: allow
trusted_proxies: []
limits: {max_body: 10MiB, header_timeout: 10s}
jwt:
  algorithms: [HS256]
  secret: ${JWT_SECRET}
  issuer: https://auth.example
  audience: api
  leeway: 30s
  claims_headers: {sub: X-User-Id, scope: X-User-Scopes}
defaults:
  timeout: 30s
  connect_timeout: 2s
  retries: 1
  auth: required
  rate_limit: {requests: 100, per: 1m, key: ip}
  cache: off
services:
  users:
    upstreams: [http://127.0.0.1:9001, http://127.0.0.1:9002]
    auth: optional
    scopes: [users:read]
    rate_limit: {requests: 10, per: 1s, key: sub}
    cache: {ttl: 30s}
    routes:
      - {path: /public/*, auth: none, cache: {ttl: 5m}}
      - {path: /admin/*, methods: [POST, DELETE], scopes: [users:admin]}
  chat:
    upstreams: [http://127.0.0.1:9003]
    websocket: true
"""


def test_design_example_top_level_sections() -> None:
    config = load(DESIGN_EXAMPLE)
    assert config.source == "routes.yaml"
    assert config.listen == Listen(host="0.0.0.0", port=8080)
    assert config.admin == AdminConfig(host="127.0.0.1", port=9901, enabled=True)
    assert config.store == StoreConfig(url="memory://", on_error="allow")
    assert config.trusted_proxies == ()
    assert config.limits == Limits(max_body=10 * 1024 * 1024, header_timeout=10.0)
    assert list(config.services) == ["users", "chat"]


def test_design_example_jwt_section() -> None:
    jwt = load(DESIGN_EXAMPLE).jwt
    assert jwt is not None
    assert jwt.algorithms == frozenset({"HS256"})
    assert jwt.secret == SECRET
    assert (jwt.issuer, jwt.audience, jwt.leeway) == ("https://auth.example", ("api",), 30.0)
    assert jwt.claims_headers == (("sub", "X-User-Id"), ("scope", "X-User-Scopes"))
    assert SECRET not in repr(jwt)


def test_design_example_service_with_overrides() -> None:
    users = load(DESIGN_EXAMPLE).services["users"]
    assert users.upstreams == (URL("http://127.0.0.1:9001"), URL("http://127.0.0.1:9002"))
    assert users.breaker == BreakerConfig()
    public, admin, catch_all = users.routes
    service_limit = RateLimitConfig(requests=10, per=1.0, key="sub")

    assert (public.name, public.pattern, public.methods) == ("users/routes/0", PathPattern.compile("/public/*"), None)
    assert public.auth == AuthPolicy(mode=AuthMode.NONE, scopes=frozenset({"users:read"}))
    assert public.cache == CacheConfig(ttl=300.0)
    assert public.rate_limit == service_limit

    assert (admin.name, admin.methods) == ("users/routes/1", frozenset({"POST", "DELETE"}))
    assert admin.auth == AuthPolicy(mode=AuthMode.OPTIONAL, scopes=frozenset({"users:admin"}))
    assert admin.cache == CacheConfig(ttl=30.0)

    assert (catch_all.name, catch_all.pattern, catch_all.methods) == ("users", None, None)
    assert catch_all.auth == AuthPolicy(mode=AuthMode.OPTIONAL, scopes=frozenset({"users:read"}))
    assert (catch_all.rate_limit, catch_all.cache) == (service_limit, CacheConfig(ttl=30.0))
    assert (catch_all.timeout, catch_all.connect_timeout, catch_all.retries) == (30.0, 2.0, 1)
    assert all(route.upstreams == users.upstreams and route.websocket is None for route in users.routes)


def test_design_example_service_on_defaults() -> None:
    (chat,) = load(DESIGN_EXAMPLE).services["chat"].routes
    assert chat.websocket == WebSocketConfig()
    assert chat.auth == AuthPolicy(mode=AuthMode.REQUIRED)
    assert chat.rate_limit == RateLimitConfig(requests=100, per=60.0, key="ip")
    assert chat.cache is None


def test_config_objects_are_frozen() -> None:
    config = load(DESIGN_EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.services["users"].routes[0].timeout = 1.0  # type: ignore[misc]


def test_minimal_file_gets_every_default() -> None:
    config = load(PLAIN)
    assert (config.listen, config.admin, config.store, config.limits) == (
        Listen(),
        AdminConfig(),
        StoreConfig(),
        Limits(),
    )
    assert config.jwt is None
    (route,) = config.services["users"].routes
    assert (route.timeout, route.connect_timeout, route.retries) == (30.0, 2.0, 1)
    assert (route.rate_limit, route.cache, route.websocket) == (None, None, None)


def test_empty_sections_mean_defaults() -> None:
    config = load("""\
        listen:
        store:
        limits:
        trusted_proxies:
        defaults:
          auth: none
        services:
          users:
            upstreams: [http://127.0.0.1:9001]
            routes:
        """)
    assert (config.listen, config.store, config.limits, config.trusted_proxies) == (
        Listen(),
        StoreConfig(),
        Limits(),
        (),
    )
    assert len(config.services["users"].routes) == 1


def test_load_file_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("services: {users: {upstreams: [ftp://x]}}\ndefaults: {auth: none}\n")
    with pytest.raises(ConfigInvalid) as caught:
        load_file(path, env={})
    assert [str(e) for e in caught.value.errors] == [
        f"{path}:1:32: services.users.upstreams.0: expected http://host:port or https://host:port, "
        "optionally with a path prefix"
    ]


def test_load_file_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(PLAIN)
    assert load_file(path, env={}).source == str(path)


def test_missing_file_is_one_located_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigInvalid) as caught:
        load_file(path)
    assert [str(e) for e in caught.value.errors] == [f"{path}:1:1: cannot read: No such file or directory"]


# -- layering: defaults → service → route ---------------------------------------------------------

LAYERS = """\
defaults:
  auth: none
  timeout: 10s
  retries: 2
  rate_limit: {requests: 100, per: 1m}
  cache: {ttl: 10s, shared: true}
services:
  users:
    upstreams: [http://127.0.0.1:9001]
    timeout: 20s
    cache: {ttl: 30s}
    routes:
      - {path: /fast/*, timeout: 1s}
      - {path: /fresh, cache: {ttl: 1s}}
      - {path: /nolimit, rate_limit: off}
      - {path: /inherit, cache: on}
"""


def test_service_overrides_defaults_key_by_key() -> None:
    route = load(LAYERS).services["users"].routes[-1]
    assert (route.timeout, route.retries) == (20.0, 2)
    assert route.rate_limit == RateLimitConfig(requests=100, per=60.0)


def test_route_overrides_service_and_keeps_the_rest() -> None:
    fast = load(LAYERS).services["users"].routes[0]
    assert (fast.timeout, fast.retries, fast.cache) == (1.0, 2, CacheConfig(ttl=30.0))


def test_service_section_replaces_the_defaults_section_as_a_whole() -> None:
    route = load(LAYERS).services["users"].routes[-1]
    assert route.cache == CacheConfig(ttl=30.0, shared=False)  # `shared: true` from defaults is not merged in


def test_route_section_replaces_the_service_section_as_a_whole() -> None:
    fresh = load(LAYERS).services["users"].routes[1]
    assert fresh.cache == CacheConfig(ttl=1.0)


def test_route_can_switch_a_section_off() -> None:
    assert load(LAYERS).services["users"].routes[2].rate_limit is None


def test_section_switched_on_inherits_the_layer_below() -> None:
    assert load(LAYERS).services["users"].routes[3].cache == CacheConfig(ttl=30.0)


@pytest.mark.parametrize(
    ("text", "cached"),
    [
        pytest.param(
            """\
            defaults: {auth: none, cache: off}
            services:
              users:
                upstreams: [http://127.0.0.1:9001]
            """,
            False,
            id="off in defaults",
        ),
        pytest.param(
            """\
            defaults: {auth: none, cache: {ttl: 5s}}
            services:
              users:
                upstreams: [http://127.0.0.1:9001]
                cache: off
            """,
            False,
            id="off in the service over defaults",
        ),
        pytest.param(
            """\
            defaults: {auth: none, cache: {ttl: 5s}}
            services:
              users:
                upstreams: [http://127.0.0.1:9001]
                routes: [{path: /x, cache: false}]
            """,
            False,
            id="false in the route over defaults",
        ),
        pytest.param(
            """\
            defaults: {auth: none, cache: off}
            services:
              users:
                upstreams: [http://127.0.0.1:9001]
                routes: [{path: /x, cache: {ttl: 5s}}]
            """,
            True,
            id="a mapping in the route over off",
        ),
    ],
)
def test_off_at_any_layer(text: str, cached: bool) -> None:
    route = load(text).services["users"].routes[0]
    assert (route.cache is not None) is cached


def test_auth_off_is_auth_none() -> None:
    route = (
        load("""\
        services:
          users:
            upstreams: [http://127.0.0.1:9001]
            auth: off
        """)
        .services["users"]
        .routes[0]
    )
    assert route.auth.mode is AuthMode.NONE


def test_overrides_keep_file_order_and_the_catch_all_comes_last() -> None:
    users = load(LAYERS).services["users"]
    assert [r.name for r in users.routes] == [
        "users/routes/0",
        "users/routes/1",
        "users/routes/2",
        "users/routes/3",
        "users",
    ]
    assert [r.pattern.text if r.pattern else None for r in users.routes] == [
        "/fast/*",
        "/fresh",
        "/nolimit",
        "/inherit",
        None,
    ]


def test_first_matching_override_wins() -> None:
    users = load("""\
        defaults: {auth: none}
        services:
          users:
            upstreams: [http://127.0.0.1:9001]
            routes:
              - {path: /public/*, timeout: 1s}
              - {path: /public/special, timeout: 2s}
              - {path: /admin/*, methods: [POST], timeout: 3s}
        """).services["users"]
    assert first_match(users, "/public/special").name == "users/routes/0"
    assert first_match(users, "/admin/x", "POST").name == "users/routes/2"
    assert first_match(users, "/admin/x", "GET").name == "users"
    assert first_match(users, "/other").name == "users"


# -- path patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        pytest.param("/public/*", "/public/a", True, id="prefix: one level"),
        pytest.param("/public/*", "/public/a/b/c", True, id="prefix: deeper"),
        pytest.param("/public/*", "/public/", True, id="prefix: the directory"),
        pytest.param("/public/*", "/public", True, id="prefix: the bare path too"),
        pytest.param("/public/*", "/publicity", False, id="prefix: not a string prefix"),
        pytest.param("/items/*/detail", "/items/7/detail", True, id="star within a segment"),
        pytest.param("/items/*/detail", "/items/7/8/detail", False, id="star stays in one segment"),
        pytest.param("/items/*/detail", "/items//detail", True, id="star may be empty"),
        pytest.param("/files/*.json", "/files/a.json", True, id="star inside a segment name"),
        pytest.param("/files/*.json", "/files/a.jsonx", False, id="star inside a segment name, exact suffix"),
        pytest.param("/users", "/users", True, id="exact"),
        pytest.param("/users", "/users/", False, id="exact: no trailing slash"),
        pytest.param("/users/", "/users/", True, id="exact with trailing slash"),
        pytest.param("/a.b", "/axb", False, id="regex characters are literal"),
        pytest.param("/*", "/anything/at/all", True, id="everything"),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    assert PathPattern.compile(pattern).matches(path) is matches


NOT_NORMALISED = "expected a normalised path: no //, . or .. segments, query or fragment"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param("public/*", "must start with /", id="relative"),
        pytest.param("/a//b", NOT_NORMALISED, id="empty segment"),
        pytest.param("/a/../b", NOT_NORMALISED, id="dot-dot"),
        pytest.param("/a/./b", NOT_NORMALISED, id="dot"),
        pytest.param("/a?b=1", NOT_NORMALISED, id="query"),
    ],
)
def test_bad_path_patterns(path: str, message: str) -> None:
    text = PLAIN + f'    routes:\n      - {{path: "{path}"}}\n'
    assert errors(text) == [f"routes.yaml:6:16: services.users.routes.0.path: {message}"]


def test_route_needs_a_path() -> None:
    assert errors(PLAIN + "    routes:\n      - {timeout: 1s}\n") == [
        "routes.yaml:6:9: services.users.routes.0.path: required key is missing"
    ]


# -- methods --------------------------------------------------------------------------------------


def _methods(methods: str) -> frozenset[str] | None:
    config = load(PLAIN + f"    routes:\n      - {{path: /x, methods: {methods}}}\n")
    return config.services["users"].routes[0].methods


def test_get_implies_head() -> None:
    assert _methods("[GET]") == frozenset({"GET", "HEAD"})


def test_methods_are_upper_cased() -> None:
    assert _methods("[post, Delete]") == frozenset({"POST", "DELETE"})


def test_one_method_may_be_written_alone() -> None:
    assert _methods("PUT") == frozenset({"PUT"})


def test_route_with_methods_only_matches_those() -> None:
    users = load(PLAIN + "    routes:\n      - {path: /x, methods: [GET]}\n").services["users"]
    assert first_match(users, "/x", "HEAD").name == "users/routes/0"
    assert first_match(users, "/x", "POST").name == "users"


@pytest.mark.parametrize(
    ("methods", "error"),
    [
        pytest.param(
            "[GET, FETCH]", "routes.yaml:6:29: services.users.routes.0.methods: unknown method FETCH", id="unknown"
        ),
        pytest.param(
            "[]",
            "routes.yaml:6:29: services.users.routes.0.methods: expected at least one method "
            "(leave methods out for all of them)",
            id="empty",
        ),
        pytest.param(
            "[1]",
            "routes.yaml:6:30: services.users.routes.0.methods.0: expected a non-empty string, got 1",
            id="number",
        ),
    ],
)
def test_bad_methods(methods: str, error: str) -> None:
    assert errors(PLAIN + f"    routes:\n      - {{path: /x, methods: {methods}}}\n") == [error]


# -- upstreams ------------------------------------------------------------------------------------


def _upstreams(*urls: str) -> tuple[URL, ...]:
    lines = "".join(f"      - {url}\n" for url in urls)
    return load(f"defaults: {{auth: none}}\nservices:\n  users:\n    upstreams:\n{lines}").services["users"].upstreams


def test_upstream_trailing_slash_is_stripped() -> None:
    assert _upstreams("http://127.0.0.1:9001/") == (URL("http://127.0.0.1:9001"),)


def test_upstream_path_prefix_is_kept() -> None:
    assert _upstreams("http://h:9001/v1/") == (URL("http://h:9001/v1"),)


def test_https_upstream() -> None:
    assert _upstreams("https://api.example") == (URL("https://api.example"),)


def test_one_upstream_may_be_written_alone() -> None:
    service = load("defaults: {auth: none}\nservices:\n  users:\n    upstreams: http://h:1\n").services["users"]
    assert service.upstreams == (URL("http://h:1"),)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("ftp://h", BAD_UPSTREAM, id="scheme"),
        pytest.param("h:9001", BAD_UPSTREAM, id="no scheme"),
        pytest.param("http:///v1", BAD_UPSTREAM, id="no host"),
        pytest.param("http://h/v1?a=1", UPSTREAM_EXTRAS, id="query"),
        pytest.param("http://h/v1#top", UPSTREAM_EXTRAS, id="fragment"),
        pytest.param("http://u:p@h", UPSTREAM_EXTRAS, id="credentials"),
        pytest.param("http://h:99999", "not a URL: Port out of range 0-65535", id="port"),
    ],
)
def test_bad_upstream_is_located_at_the_entry(url: str, message: str) -> None:
    assert errors(f"""\
        defaults: {{auth: none}}
        services:
          users:
            upstreams:
              - http://ok:1
              - {url}
        """) == [f"routes.yaml:6:9: services.users.upstreams.1: {message}"]


def test_upstreams_are_required() -> None:
    assert errors("""\
        defaults: {auth: none}
        services:
          users: {timeout: 1s}
        """) == ["routes.yaml:3:10: services.users.upstreams: required key is missing"]


def test_upstreams_must_not_be_empty() -> None:
    assert errors("""\
        defaults: {auth: none}
        services:
          users: {upstreams: []}
        """) == ["routes.yaml:3:22: services.users.upstreams: at least one upstream is needed"]


# -- ${VAR} substitution ------------------------------------------------------------------------


def test_variable_is_replaced_from_env() -> None:
    config = load(DESIGN_EXAMPLE, env={"JWT_SECRET": "from-the-environment"})
    assert config.jwt is not None and config.jwt.secret == "from-the-environment"


def test_default_is_used_when_the_variable_is_unset() -> None:
    assert load("listen: {host: ${HOST:-127.0.0.2}}\n" + PLAIN, env={}).listen.host == "127.0.0.2"


def test_default_is_used_when_the_variable_is_empty() -> None:
    assert load("listen: {host: ${HOST:-127.0.0.2}}\n" + PLAIN, env={"HOST": ""}).listen.host == "127.0.0.2"


def test_variable_wins_over_its_default() -> None:
    assert load("listen: {host: ${HOST:-127.0.0.2}}\n" + PLAIN, env={"HOST": "10.0.0.1"}).listen.host == "10.0.0.1"


def test_empty_default() -> None:
    config = load("store: {url: 'redis://h${SUFFIX:-}'}\n" + PLAIN, env={})
    assert config.store.url == "redis://h"


def test_unquoted_variable_becomes_a_number() -> None:
    assert load("listen: {port: ${PORT}}\n" + PLAIN, env={"PORT": "9000"}).listen.port == 9000


def test_unquoted_variable_in_block_style_becomes_a_number() -> None:
    assert load("listen:\n  port: ${PORT}\n" + PLAIN, env={"PORT": "9000"}).listen.port == 9000


def test_quoted_variable_stays_text() -> None:
    text = "jwt: {secret: '${S}'}\n" + PLAIN.replace("{auth: none}", "{auth: required}")
    config = load(text, env={"S": "12345678"})
    assert config.jwt is not None and config.jwt.secret == "12345678"


def test_unquoted_numeric_secret_is_a_number_and_refused() -> None:
    text = "jwt: {secret: ${S}}\n" + PLAIN
    assert errors(text, env={"S": "12345678"}) == [
        "routes.yaml:1:15: jwt.secret: expected a non-empty string, got 12345678"
    ]


def test_variable_inside_a_longer_value() -> None:
    text = "defaults: {auth: none}\nservices:\n  users:\n    upstreams: [http://${UP_HOST}:${UP_PORT}/v1]\n"
    service = load(text, env={"UP_HOST": "10.1.2.3", "UP_PORT": "9001"}).services["users"]
    assert service.upstreams == (URL("http://10.1.2.3:9001/v1"),)


def test_substituted_value_cannot_inject_yaml() -> None:
    config = load("listen: {host: ${HOST}}\n" + PLAIN, env={"HOST": "a, port: 1}"})
    assert config.listen == Listen(host="a, port: 1}", port=8080)


def test_double_dollar_is_a_literal_dollar() -> None:
    config = load("jwt: {secret: 'pa$$word-${X}-$${Y}'}\n" + PLAIN, env={"X": "x"})
    assert config.jwt is not None and config.jwt.secret == "pa$word-x-${Y}"


def test_variable_in_a_comment_is_ignored() -> None:
    load("# port: ${NOT_SET}\n" + PLAIN, env={})


def test_missing_variable_is_located_at_its_value() -> None:
    assert errors("listen: {host: 127.0.0.1, port: ${PORT}}\n" + PLAIN, env={}) == [
        "routes.yaml:1:33: listen.port: environment variable PORT is not set (use ${PORT:-default})"
    ]


def test_columns_after_a_variable_are_unchanged() -> None:
    text = "listen: {host: ${HOST}, port: x}\n" + PLAIN
    assert errors(text, env={"HOST": "a-much-longer-value-than-the-reference"}) == [
        "routes.yaml:1:31: listen.port: expected an integer, got 'x'"
    ]


def test_os_environ_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TEST_HOST", "10.9.8.7")
    config = load_text("listen: {host: ${GATEWAY_TEST_HOST}}\n" + PLAIN)
    assert config.listen.host == "10.9.8.7"


# -- YAML itself ----------------------------------------------------------------------------------


def test_yaml_syntax_error_is_located() -> None:
    assert errors("""\
        defaults: {auth: none}
        services:
          users: {upstreams: [http://h:1}
        """) == ["routes.yaml:3:33: invalid YAML: expected ',' or ']', but got '}'"]


def test_tab_indentation_is_located() -> None:
    assert errors("services:\n\tusers: {}\n") == [
        "routes.yaml:2:1: invalid YAML: found character '\\t' that cannot start any token"
    ]


def test_duplicate_key_is_located_at_the_second_one() -> None:
    assert errors("""\
        defaults: {auth: none}
        services:
          users:
            upstreams: [http://h:1]
            timeout: 1s
            timeout: 2s
        """) == ["routes.yaml:6:5: services.users.timeout: duplicate key"]


def test_duplicate_top_level_section() -> None:
    assert errors(PLAIN + "defaults: {auth: none}\n") == ["routes.yaml:5:1: defaults: duplicate key"]


def test_yaml_anchors_and_merge_keys() -> None:
    users = load("""\
        defaults:
          auth: none
        services:
          users: &base
            upstreams: [http://h:1]
            timeout: 5s
            retries: 3
          orders:
            <<: *base
            retries: 0
        """).services["orders"]
    assert (users.routes[0].timeout, users.routes[0].retries) == (5.0, 0)


def test_empty_file() -> None:
    assert errors("") == ["routes.yaml:1:1: services: required key is missing: at least one service"]


def test_top_level_must_be_a_mapping() -> None:
    assert errors("- a\n- b\n") == ["routes.yaml:1:1: expected a mapping at the top of the file"]


def test_keys_are_taken_as_written() -> None:
    config = load(
        "defaults: {auth: none}\nservices:\n  on: {upstreams: [http://h:1]}\n  '42': {upstreams: [http://h:2]}\n"
    )
    assert list(config.services) == ["on", "42"]


# -- unknown keys, at every level, located at the key ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param("listn: {port: 1}\n" + PLAIN, "routes.yaml:1:1: listn: unknown key", id="top"),
        pytest.param("listen: {prot: 1}\n" + PLAIN, "routes.yaml:1:10: listen.prot: unknown key", id="listen"),
        pytest.param("admin: {hots: x}\n" + PLAIN, "routes.yaml:1:9: admin.hots: unknown key", id="admin"),
        pytest.param(
            "store:\n  url: memory://\n  onerror: deny\n" + PLAIN,
            "routes.yaml:3:3: store.onerror: unknown key",
            id="store",
        ),
        pytest.param("limits: {max_bdy: 1}\n" + PLAIN, "routes.yaml:1:10: limits.max_bdy: unknown key", id="limits"),
        pytest.param(
            "jwt:\n  secret: s\n  algorithm: [HS256]\n" + PLAIN, "routes.yaml:3:3: jwt.algorithm: unknown key", id="jwt"
        ),
        pytest.param(
            "defaults: {auth: none, timout: 1s}\nservices:\n  users: {upstreams: [http://h:1]}\n",
            "routes.yaml:1:24: defaults.timout: unknown key",
            id="defaults",
        ),
        pytest.param(
            PLAIN + "    upstream: [http://h:2]\n",
            "routes.yaml:5:5: services.users.upstream: unknown key",
            id="service",
        ),
        pytest.param(
            PLAIN + "    routes:\n      - {path: /x, tiemout: 1s}\n",
            "routes.yaml:6:20: services.users.routes.0.tiemout: unknown key",
            id="route",
        ),
        pytest.param(
            PLAIN + "    routes:\n      - {path: /x, upstreams: [http://h:2]}\n",
            "routes.yaml:6:20: services.users.routes.0.upstreams: unknown key",
            id="service-only key in a route",
        ),
        pytest.param(
            PLAIN + "    rate_limit:\n      requests: 1\n      per: 1s\n      burst: 5\n",
            "routes.yaml:8:7: services.users.rate_limit.burst: unknown key",
            id="rate_limit",
        ),
        pytest.param(
            PLAIN + "    routes:\n      - path: /x\n        cache: {ttl: 1s, tll: 2s}\n",
            "routes.yaml:7:26: services.users.routes.0.cache.tll: unknown key",
            id="cache in a route",
        ),
        pytest.param(
            PLAIN + "    websocket: {max_mesage: 1KiB}\n",
            "routes.yaml:5:17: services.users.websocket.max_mesage: unknown key",
            id="websocket",
        ),
        pytest.param(
            PLAIN + "    circuit_breaker: {failures: 2, cooldwn: 5s}\n",
            "routes.yaml:5:36: services.users.circuit_breaker.cooldwn: unknown key",
            id="circuit_breaker",
        ),
        pytest.param(
            "defaults:\n  auth: none\n  rate_limit: {requests: 1, per: 1s, kye: ip}\nservices:\n  users: {upstreams: [http://h:1]}\n",
            "routes.yaml:3:38: defaults.rate_limit.kye: unknown key",
            id="rate_limit in defaults",
        ),
        pytest.param(
            PLAIN + "    methods: [GET]\n",
            "routes.yaml:5:5: services.users.methods: unknown key",
            id="methods on a service",
        ),
        pytest.param(
            "defaults: {auth: none, path: /x}\nservices:\n  users: {upstreams: [http://h:1]}\n",
            "routes.yaml:1:24: defaults.path: unknown key",
            id="path in defaults",
        ),
    ],
)
def test_unknown_key(text: str, error: str) -> None:
    assert errors(text) == [error]


def test_every_unknown_key_of_a_section_is_reported() -> None:
    assert errors(PLAIN + "    timout: 1s\n    retires: 2\n") == [
        "routes.yaml:5:5: services.users.timout: unknown key",
        "routes.yaml:6:5: services.users.retires: unknown key",
    ]


def test_unknown_key_in_defaults_is_reported_once() -> None:
    assert errors("""\
        defaults: {auth: none, bogus: 1}
        services:
          users: {upstreams: [http://h:1]}
          orders: {upstreams: [http://h:2], routes: [{path: /x}]}
        """) == ["routes.yaml:1:24: defaults.bogus: unknown key"]


# -- wrong types and values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(
            "listen: {port: abc}\n" + PLAIN,
            "routes.yaml:1:16: listen.port: expected an integer, got 'abc'",
            id="port word",
        ),
        pytest.param(
            "listen: {port: 70000}\n" + PLAIN, "routes.yaml:1:16: listen.port: must be <= 65535", id="port range"
        ),
        pytest.param(
            "listen: {host: 5}\n" + PLAIN,
            "routes.yaml:1:16: listen.host: expected a non-empty string, got 5",
            id="host number",
        ),
        pytest.param(
            "listen: [8080]\n" + PLAIN, "routes.yaml:1:9: listen: expected a mapping, got a list", id="listen list"
        ),
        pytest.param(
            "listen: off\n" + PLAIN, "routes.yaml:1:9: listen: expected a mapping, got false", id="listen off"
        ),
        pytest.param(
            "store: memory://\n" + PLAIN, "routes.yaml:1:8: store: expected a mapping, got 'memory://'", id="store text"
        ),
        pytest.param(
            "limits: {max_body: 10XB}\n" + PLAIN,
            "routes.yaml:1:20: limits.max_body: expected a size like 512KiB, 10MiB or a number of bytes, got '10XB'",
            id="size",
        ),
        pytest.param(
            "limits: {header_timeout: 0}\n" + PLAIN,
            "routes.yaml:1:26: limits.header_timeout: must be greater than 0",
            id="zero duration",
        ),
        pytest.param(
            "limits: {body_timeout: 0ms}\n" + PLAIN,
            "routes.yaml:1:24: limits.body_timeout: must be greater than 0",
            id="negative body timeout",
        ),
        pytest.param(
            PLAIN + "    timeout: soon\n",
            f"routes.yaml:5:14: services.users.timeout: {BAD_DURATION}, got 'soon'",
            id="duration",
        ),
        pytest.param(
            PLAIN + "    retries: 11\n", "routes.yaml:5:14: services.users.retries: must be <= 10", id="retries"
        ),
        pytest.param(
            PLAIN + "    retries: yes\n",
            "routes.yaml:5:14: services.users.retries: expected an integer, got true",
            id="retries bool",
        ),
        pytest.param(
            PLAIN + "    auth: maybe\n",
            "routes.yaml:5:11: services.users.auth: expected required, optional or none, got 'maybe'",
            id="auth",
        ),
        pytest.param(
            PLAIN + "    scopes: [users:read, 7]\n",
            "routes.yaml:5:26: services.users.scopes.1: expected a non-empty string, got 7",
            id="scope",
        ),
        pytest.param(
            PLAIN + "    rate_limit: {requests: 0, per: 1s}\n",
            "routes.yaml:5:28: services.users.rate_limit.requests: must be >= 1",
            id="rate limit budget",
        ),
        pytest.param(
            PLAIN + "    rate_limit: {requests: 5}\n",
            "routes.yaml:5:17: services.users.rate_limit.per: required key is missing",
            id="rate limit without per",
        ),
        pytest.param(
            PLAIN + "    rate_limit: {requests: 5, per: 1s, key: cookie}\n",
            "routes.yaml:5:45: services.users.rate_limit.key: "
            "expected ip, sub, header:<Name> or claim:<name>, got 'cookie'",
            id="rate limit key",
        ),
        pytest.param(
            PLAIN + "    rate_limit: 5\n",
            "routes.yaml:5:17: services.users.rate_limit: expected a mapping or off, got 5",
            id="rate limit number",
        ),
        pytest.param(
            PLAIN + "    routes:\n      - {path: /x, rate_limit: on}\n",
            "routes.yaml:6:32: services.users.routes.0.rate_limit.requests: required key is missing",
            id="rate limit on with nothing below",
        ),
        pytest.param(
            PLAIN + "    cache: {statuses: [200, 999]}\n",
            "routes.yaml:5:23: services.users.cache.statuses: expected a list of HTTP status codes",
            id="cache statuses",
        ),
        pytest.param(
            PLAIN + "    cache: {ttl: 1s, shared: maybe}\n",
            "routes.yaml:5:30: services.users.cache.shared: expected true or false, got 'maybe'",
            id="cache shared",
        ),
        pytest.param(
            PLAIN + "    websocket: 5\n",
            "routes.yaml:5:16: services.users.websocket: expected a mapping or off, got 5",
            id="websocket number",
        ),
        pytest.param(
            PLAIN + "    circuit_breaker: {failures: 0}\n",
            "routes.yaml:5:33: services.users.circuit_breaker.failures: must be >= 1",
            id="breaker failures",
        ),
        pytest.param(
            PLAIN + "    circuit_breaker: off\n",
            "routes.yaml:5:22: services.users.circuit_breaker: "
            "the circuit breaker cannot be switched off; expected {failures, cooldown}",
            id="breaker off",
        ),
        pytest.param(
            PLAIN + "    routes: {path: /x}\n",
            "routes.yaml:5:13: services.users.routes: expected a list of {path: ..., ...} overrides",
            id="routes mapping",
        ),
        pytest.param(
            PLAIN + "    routes: [/x]\n",
            "routes.yaml:5:14: services.users.routes.0: expected a mapping with `path:`, got '/x'",
            id="route text",
        ),
        pytest.param(
            "defaults: [auth]\nservices: {users: {upstreams: [http://h:1], auth: none}}\n",
            "routes.yaml:1:11: defaults: expected a mapping, got a list",
            id="defaults list",
        ),
    ],
)
def test_wrong_value(text: str, error: str) -> None:
    assert errors(text) == [error]


# -- services ---------------------------------------------------------------------------------------


def test_services_are_required() -> None:
    assert errors("defaults: {auth: none}\n") == [
        "routes.yaml:1:1: services: required key is missing: at least one service"
    ]


def test_services_must_not_be_empty() -> None:
    assert errors("defaults: {auth: none}\nservices: {}\n") == [
        "routes.yaml:2:11: services: at least one service is needed"
    ]


def test_services_must_be_a_mapping() -> None:
    assert errors("defaults: {auth: none}\nservices:\n  - users\n") == [
        "routes.yaml:3:3: services: expected a mapping of service name to service"
    ]


def test_service_must_be_a_mapping() -> None:
    assert errors("defaults: {auth: none}\nservices:\n  users:\n") == [
        "routes.yaml:3:9: services.users: expected a mapping with at least `upstreams:`"
    ]


def test_service_name_must_fit_in_a_url() -> None:
    assert errors("defaults: {auth: none}\nservices:\n  'my users': {upstreams: [http://h:1]}\n") == [
        "routes.yaml:3:3: services.my users: service names are letters, digits, '_', '.', '-' (they appear in URLs)"
    ]


def test_websocket_settings() -> None:
    (route,) = load(PLAIN + "    websocket: {max_message: 64KiB, idle_timeout: 1m}\n").services["users"].routes
    assert route.websocket == WebSocketConfig(max_message=64 * 1024, idle_timeout=60.0)


def test_circuit_breaker_settings() -> None:
    users = load(PLAIN + "    circuit_breaker: {failures: 5, cooldown: 30s}\n").services["users"]
    assert users.breaker == BreakerConfig(failures=5, cooldown=30.0)


# -- error reporting: several at once, in file order ---------------------------------------------------


def test_every_error_is_reported_in_file_order() -> None:
    assert errors("""\
        services:
          users:
            upstreams: [ftp://h]
            timeout: never
            routes:
              - {path: nope}
          orders:
            upstreams: [http://h:2]
            retries: -1
        listen: {port: x}
        defaults: {auth: none, cache: {ttl: soon}}
        store: {url: 'http://redis', on_error: maybe}
        """) == [
        "routes.yaml:3:17: services.users.upstreams.0: expected http://host:port or https://host:port, "
        "optionally with a path prefix",
        "routes.yaml:4:14: services.users.timeout: expected a duration like 250ms, 2s, 5m, 1h or a number of "
        "seconds, got 'never'",
        "routes.yaml:6:16: services.users.routes.0.path: must start with /",
        "routes.yaml:9:14: services.orders.retries: must be >= 0",
        "routes.yaml:10:16: listen.port: expected an integer, got 'x'",
        "routes.yaml:11:37: defaults.cache.ttl: expected a duration like 250ms, 2s, 5m, 1h or a number of "
        "seconds, got 'soon'",
        f"routes.yaml:12:14: store.url: {BAD_STORE}",
    ]


def test_several_errors_in_one_route_are_all_reported() -> None:
    assert errors(PLAIN + "    routes:\n      - {path: /x, timeout: x, retries: x, bogus: 1}\n") == [
        "routes.yaml:6:29: services.users.routes.0.timeout: expected a duration like 250ms, 2s, 5m, 1h or a number "
        "of seconds, got 'x'",
        "routes.yaml:6:41: services.users.routes.0.retries: expected an integer, got 'x'",
        "routes.yaml:6:44: services.users.routes.0.bogus: unknown key",
    ]


# -- jwt ---------------------------------------------------------------------------------------------


def _jwt(body: str) -> str:
    return "jwt:\n" + textwrap.indent(textwrap.dedent(body), "  ") + PLAIN


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param(
            "algorithms: [HS256, none]\nsecret: s\n",
            "routes.yaml:2:15: jwt.algorithms: `none` is never accepted",
            id="none",
        ),
        pytest.param(
            "algorithms: [None]\nsecret: s\n", "routes.yaml:2:15: jwt.algorithms: `none` is never accepted", id="None"
        ),
        pytest.param(
            "algorithms: [HS1]\nsecret: s\n",
            "routes.yaml:2:15: jwt.algorithms: unsupported algorithm 'HS1'",
            id="unknown",
        ),
        pytest.param(
            "algorithms: [HS256]\n", "routes.yaml:2:3: jwt.secret: HS256 needs a secret", id="HS without secret"
        ),
        pytest.param(
            "algorithms: [RS256]\n",
            "routes.yaml:2:3: jwt.public_key: RS256 needs public_key or jwks_url",
            id="RS without key",
        ),
        pytest.param(
            "algorithms: [RS256]\nsecret: s\njwks_url: https://auth.example/jwks\n",
            "routes.yaml:3:11: jwt.secret: a secret is only used by HS256/HS384/HS512; add one to algorithms",
            id="secret with only RS",
        ),
        pytest.param(
            "algorithms: [HS256]\nsecret: s\njwks_url: https://auth.example/jwks\n",
            "routes.yaml:4:13: jwt.jwks_url: a public key needs an RS*, PS*, ES* or EdDSA algorithm",
            id="jwks with only HS",
        ),
        pytest.param(
            "algorithms: [RS256]\npublic_key: k.pem\njwks_url: https://auth.example/jwks\n",
            "routes.yaml:4:13: jwt.jwks_url: set public_key or jwks_url, not both",
            id="both keys",
        ),
        pytest.param(
            "algorithms: [RS256]\njwks_url: ftp://auth.example/jwks\n",
            "routes.yaml:3:13: jwt.jwks_url: expected an http(s) URL",
            id="jwks scheme",
        ),
        pytest.param(
            "secret: s\nleeway: forever\n",
            "routes.yaml:3:11: jwt.leeway: expected a duration like 250ms, 2s, 5m, 1h or a number of seconds, "
            "got 'forever'",
            id="leeway",
        ),
        pytest.param(
            "secret: s\nclaims_headers: {sub: 'X User'}\n",
            "routes.yaml:3:25: jwt.claims_headers.sub: expected a header name",
            id="claim header name",
        ),
    ],
)
def test_jwt_rules(body: str, error: str) -> None:
    assert errors(_jwt(body)) == [error]


def test_jwt_with_rs_and_jwks() -> None:
    jwt = load(_jwt("algorithms: [RS256, ES256]\njwks_url: https://auth.example/jwks\naudience: [a, b]\n")).jwt
    assert jwt is not None
    assert (jwt.algorithms, jwt.jwks_url, jwt.secret) == (
        frozenset({"RS256", "ES256"}),
        "https://auth.example/jwks",
        None,
    )
    assert jwt.audience == ("a", "b")


def test_jwt_algorithms_default_to_hs256() -> None:
    jwt = load(_jwt("secret: s\n")).jwt
    assert jwt is not None and jwt.algorithms == frozenset({"HS256"})


def test_jwt_off_means_no_jwt() -> None:
    assert load("jwt: off\n" + PLAIN).jwt is None


def test_default_auth_without_jwt_is_located_at_the_first_service() -> None:
    assert errors("""\
        services:
          users:
            upstreams: [http://h:1]
          orders:
            upstreams: [http://h:2]
        """) == [
        "routes.yaml:2:3: services.users: auth: required (the default) needs a jwt: section, or set auth: none"
    ]


def test_explicit_auth_without_jwt_is_located_at_the_auth_value() -> None:
    assert errors("""\
        defaults: {auth: none}
        services:
          users:
            upstreams: [http://h:1]
            routes:
              - {path: /me, auth: optional}
        """) == ["routes.yaml:6:27: services.users.routes.0.auth: auth: optional needs a jwt: section"]


def test_auth_required_in_defaults_without_jwt_is_located_in_defaults() -> None:
    assert errors("""\
        defaults: {auth: required}
        services:
          users: {upstreams: [http://h:1]}
        """) == ["routes.yaml:1:18: defaults.auth: auth: required needs a jwt: section"]


def test_auth_required_in_defaults_is_fine_when_every_service_turns_it_off() -> None:
    load("""\
        defaults: {auth: required}
        services:
          users: {upstreams: [http://h:1], auth: none}
        """)


def test_invalid_jwt_section_is_reported_alone() -> None:
    assert errors("jwt: {algorithms: [HS256]}\nservices:\n  users: {upstreams: [http://h:1]}\n") == [
        "routes.yaml:1:6: jwt.secret: HS256 needs a secret"
    ]


# -- store, listeners, trusted proxies -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://127.0.0.1:6379/0",
        "rediss://user:pass@redis.example:6380/1",
        "redis+cluster://h1:7000,h2:7001",
        "unix:///run/redis.sock",
    ],
)
def test_store_urls(url: str) -> None:
    assert load(f"store: {{url: '{url}'}}\n" + PLAIN).store.url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param(
            "http://redis:6379",
            BAD_STORE,
            id="scheme",
        ),
        pytest.param(
            "memory",
            BAD_STORE,
            id="no ://",
        ),
        pytest.param("redis://", "redis:// needs a host (or a socket path for unix://)", id="no host"),
    ],
)
def test_bad_store_urls(url: str, message: str) -> None:
    assert errors(f"store: {{url: '{url}'}}\n" + PLAIN) == [f"routes.yaml:1:14: store.url: {message}"]


@pytest.mark.parametrize("on_error", ["allow", "deny", "local"])
def test_store_on_error_choices(on_error: str) -> None:
    assert load(f"store: {{on_error: {on_error}}}\n" + PLAIN).store.on_error == on_error


def test_store_on_error_refuses_other_words() -> None:
    assert errors("store: {on_error: ignore}\n" + PLAIN) == [
        "routes.yaml:1:19: store.on_error: expected one of allow, deny, local, got 'ignore'"
    ]


def test_store_options() -> None:
    store = load("store: {timeout: 250ms, max_memory: 16MiB}\n" + PLAIN).store
    assert (store.timeout, store.max_memory) == (0.25, 16 * 1024 * 1024)


def test_admin_off() -> None:
    assert load("admin: off\n" + PLAIN).admin.enabled is False


def test_admin_must_not_share_the_public_port() -> None:
    assert errors("listen: {host: 0.0.0.0, port: 8080}\nadmin: {host: 127.0.0.1, port: 8080}\n" + PLAIN) == [
        "routes.yaml:2:32: admin.port: the admin listener must not share the public listener's address"
    ]


def test_admin_may_use_the_same_port_on_another_address() -> None:
    config = load("listen: {host: 127.0.0.1, port: 8080}\nadmin: {host: 127.0.0.2, port: 8080}\n" + PLAIN)
    assert config.admin.port == config.listen.port


def test_trusted_proxies() -> None:
    config = load("trusted_proxies: [10.0.0.0/8, 192.168.1.7, '::1', 'fd00::/8', 172.16.5.1/12]\n" + PLAIN)
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("172.16.0.0/12"),  # host bits are dropped, not an error
    )


def test_trusted_proxies_may_be_one_address() -> None:
    assert load("trusted_proxies: 10.0.0.1\n" + PLAIN).trusted_proxies == (ipaddress.ip_network("10.0.0.1/32"),)


@pytest.mark.parametrize(
    ("entry", "col"),
    [
        pytest.param("not-an-ip", 31, id="word"),
        pytest.param("10.0.0.0/33", 31, id="prefix too long"),
        pytest.param("300.1.1.1", 31, id="octet"),
    ],
)
def test_bad_trusted_proxy_is_located_at_the_entry(entry: str, col: int) -> None:
    assert errors(f"trusted_proxies: [10.0.0.0/8, {entry}]\n" + PLAIN) == [
        f"routes.yaml:1:{col}: trusted_proxies.1: expected an IP address or CIDR, got '{entry}'"
    ]
