"""The gateway with one feature on: JWT verification (issue 3.7), rate limiting (issue 4.7) and
the response cache (issue 5.7).

Each target is the plain-proxy gateway of ``servers.start_gateway`` with one section
added, so its cost is read against the ``gateway`` row of the same run:

* ``gateway-jwt-hs256`` / ``gateway-jwt-rs256``: ``auth: required`` with an HS256 secret,
  or an RS256 public key (a PEM file generated here); wrk sends a token valid for a day.
  ``gateway-jwt-rs256-nocache`` is RS256 with ``verify_cache: 0``: the same token checked
  in full on every request (the cost before the verified-token cache).
* ``gateway-rl-memory`` / ``gateway-rl-redis``: ``rate_limit: {requests: 1000000000,
  per: 1s}``, which never rejects, on ``memory://`` or on a ``redis-server`` started here
  (pinned to the load CPU like the backend, its CPU time counted as ours). The store's
  ``on_error`` is ``deny``: a store that fails under load shows as wrk errors, not as a
  fast row that skipped the limit.

* ``gateway-cache-hit`` / ``gateway-cache-miss``: ``cache: {ttl: 1h}`` on ``memory://``; every
  request after the first is a hit, or (with ``Cache-Control: no-cache`` sent by wrk) goes to
  the upstream and stores its answer again: the miss path. ``direct`` is nginx serving the same
  body statically.
* ``gateway-full-chain`` (issue 8): all three at once, as a protected, limited, cached API
  would run: HS256 ``auth: required``, the never-rejecting limit and ``cache: {ttl: 1h}``, the
  store (limit counters and cache entries) on a ``redis-server`` started here. wrk runs
  ``unique_query.lua``: every request has a query string never sent before, so each one is
  a true cache miss (lookup, fill lock, upstream request, entry stored in Redis).
  ``gateway-full-chain-asyncio`` is the same on the asyncio event loop.

JWT tokens are minted with pyjwt and the RSA key made with cryptography (both are the
gateway's own dependencies), so run this with the venv's python.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from servers import (
    BENCH_DIR,
    GATEWAY_PATH,
    LOAD_CPU,
    READY_TIMEOUT,
    SERVER_CPU,
    BenchError,
    Server,
    StartFn,
    Target,
    free_port,
    payload,
    plain_routes,
    start,
    start_gateway_with,
    wait_ready,
)

TOKEN_TTL = 86400  # seconds: far beyond any run
SUBJECT = "bench-user"
RATE_LIMIT = "rate_limit: {requests: 1000000000, per: 1s, key: ip}"  # never rejects
RATE_LIMIT_HEADER = "X-RateLimit-Limit"  # proof that the limit ran, checked before measuring


def _token(key: object, algorithm: str) -> str:
    import jwt

    now = int(time.time())
    claims = {"sub": SUBJECT, "scope": "bench", "iat": now, "exp": now + TOKEN_TTL}
    return jwt.encode(claims, key, algorithm=algorithm)  # type: ignore[arg-type]


def _jwt_target(name: str, jwt_section: str, token: str, port: int, backend: int, work: Path,
                stack: contextlib.ExitStack) -> Target:  # fmt: skip
    routes = plain_routes(port, backend, defaults="auth: required, rate_limit: off, cache: off")
    server = start_gateway_with(name, f"{routes}jwt: {jwt_section}\n", port, work, stack)
    return Target(name, f"http://127.0.0.1:{port}{GATEWAY_PATH}", server, headers=(f"Authorization: Bearer {token}",))


def start_gateway_jwt_hs256(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    secret = secrets.token_hex(32)  # 64 characters: over pyjwt's minimum HMAC key length
    section = f"{{algorithms: [HS256], secret: {secret}}}"
    return _jwt_target("gateway-jwt-hs256", section, _token(secret.encode(), "HS256"), port, backend, work, stack)


def _rs256(name: str, extra: str, port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = work / f"{name}.pub.pem"
    pem.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    section = f"{{algorithms: [RS256], public_key: {pem}{extra}}}"
    return _jwt_target(name, section, _token(private, "RS256"), port, backend, work, stack)


def start_gateway_jwt_rs256(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    return _rs256("gateway-jwt-rs256", "", port, backend, work, stack)


def start_gateway_jwt_rs256_nocache(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """RS256 with the verified-token cache off: every request parses and checks the signature."""
    return _rs256("gateway-jwt-rs256-nocache", ", verify_cache: 0", port, backend, work, stack)


# --- rate limit ----------------------------------------------------------------------------


def redis_command(argv: list[str], port: int) -> bytes:
    """Send one RESP command and return the first reply line (enough for PING and DBSIZE)."""
    request = f"*{len(argv)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in argv)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request.encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.strip()


def start_redis(port: int, work: Path, stack: contextlib.ExitStack, name: str = "redis") -> Server:
    """A throwaway redis-server: no persistence, pinned like the backend, answering PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("no redis-server: run `bash bench/setup.sh` first")
    data = work / name
    data.mkdir(exist_ok=True)
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(data), "--protected-mode", "no"]  # fmt: skip
    server = start(name, argv, LOAD_CPU, work, stack)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"redis-server exited with {server.proc.returncode}; log:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if redis_command(["PING"], port) == b"+PONG":
                return server
        time.sleep(0.05)
    raise BenchError(f"redis-server not answering PING on port {port}; log:\n{server.log_tail()}")


def _rate_limited_target(name: str, store: str, port: int, backend: int, work: Path,
                         stack: contextlib.ExitStack, helpers: tuple[Server, ...] = ()) -> Target:  # fmt: skip
    routes = plain_routes(port, backend, defaults=f"auth: none, {RATE_LIMIT}, cache: off")
    # timeout 1s: at 64 connections the saturated event loop alone delays a reply by tens of ms,
    # which is queueing, not the store failing; on_error: deny still shows any real failure
    store_section = f"store: {{url: '{store}', on_error: deny, timeout: 1s}}\n"
    server = start_gateway_with(name, f"{routes}{store_section}", port, work, stack)
    target = Target(name, f"http://127.0.0.1:{port}{GATEWAY_PATH}", server, helpers=helpers)
    wait_ready(server, target.url, payload(), must_have=(RATE_LIMIT_HEADER,))
    return target


def start_gateway_rl_memory(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    return _rate_limited_target("gateway-rl-memory", "memory://", port, backend, work, stack)


def start_gateway_rl_redis(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    redis_port = free_port()
    redis = start_redis(redis_port, work, stack)
    target = _rate_limited_target(
        "gateway-rl-redis", f"redis://127.0.0.1:{redis_port}/0", port, backend, work, stack, (redis,)
    )
    keys = redis_command(["DBSIZE"], redis_port)
    if keys in (b":0", b""):
        raise BenchError(f"gateway-rl-redis answered, but Redis holds no rate-limit key (DBSIZE {keys!r})")
    return target


def in_process_costs(script: str) -> dict[str, float]:
    """``jwt_verify.py`` or ``rl_verify.py`` pinned to the server CPU: µs per middleware call."""
    done = subprocess.run(
        ["taskset", "-c", SERVER_CPU, sys.executable, str(BENCH_DIR / script)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"{script} failed ({done.returncode}): {done.stderr or done.stdout}")
    costs: dict[str, float] = json.loads(done.stdout)
    return costs


# --- cache (issue 5.7) ------------------------------------------------------------------------


def _cached_target(name: str, headers: tuple[str, ...], port: int, backend: int, work: Path,
                   stack: contextlib.ExitStack) -> Target:  # fmt: skip
    routes = plain_routes(port, backend, defaults="auth: none, rate_limit: off, cache: {ttl: 1h}")
    server = start_gateway_with(name, routes, port, work, stack)
    target = Target(name, f"http://127.0.0.1:{port}{GATEWAY_PATH}", server, headers=headers)
    wait_ready(server, target.url, payload(), headers=headers, must_have=("X-Cache",))
    return target


def start_gateway_cache_hit(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """``cache: {ttl: 1h}`` on the memory store: after the first request every one is a hit."""
    return _cached_target("gateway-cache-hit", (), port, backend, work, stack)


def start_gateway_cache_miss(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """The same route with ``Cache-Control: no-cache`` on every request: each one goes to the
    upstream and stores the new answer (the miss path, storing included)."""
    return _cached_target("gateway-cache-miss", ("Cache-Control: no-cache",), port, backend, work, stack)


# --- the full chain (issue 8) ------------------------------------------------------------------


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as response:
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def _check_full_chain(target: Target, token: str, redis_port: int) -> None:
    """Before measuring: no token is a 401, a new URL is a limited MISS, the same URL again a
    HIT (so the miss stored its entry), and Redis holds keys."""
    probe = f"{target.url}?bench=probe-{secrets.token_hex(4)}"
    auth = {"Authorization": f"Bearer {token}"}
    anonymous, _ = _get(probe, {})
    first_status, first = _get(probe, auth)
    second_status, second = _get(probe, auth)
    seen = (anonymous, first_status, first.get("X-Cache"), RATE_LIMIT_HEADER in first, second.get("X-Cache"))
    if seen != (401, 200, "MISS", True, "HIT") or second_status != 200:
        raise BenchError(
            f"{target.name} is not the full chain: without a token {anonymous}, a new URL {first_status}"
            f" X-Cache {first.get('X-Cache')} (rate-limit header: {RATE_LIMIT_HEADER in first}), the same URL"
            f" again {second_status} X-Cache {second.get('X-Cache')}; log:\n{target.server.log_tail()}"
        )
    if redis_command(["DBSIZE"], redis_port) in (b":0", b""):
        raise BenchError(f"{target.name} answered, but Redis holds no key")


def _full_chain(name: str, loop: str, port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    redis_port = free_port()
    redis = start_redis(redis_port, work, stack, name=f"redis-{name}")
    secret = secrets.token_hex(32)
    token = _token(secret.encode(), "HS256")
    routes = plain_routes(port, backend, defaults=f"auth: required, {RATE_LIMIT}, cache: {{ttl: 1h}}")
    routes += f"jwt: {{algorithms: [HS256], secret: {secret}}}\n"
    routes += f"store: {{url: 'redis://127.0.0.1:{redis_port}/0', on_error: deny, timeout: 1s}}\n"  # as rl-redis
    server = start_gateway_with(name, routes, port, work, stack, loop=loop)
    target = Target(name, f"http://127.0.0.1:{port}{GATEWAY_PATH}", server, headers=(f"Authorization: Bearer {token}",),
                    helpers=(redis,), unique_query=True, loop=loop)  # fmt: skip
    wait_ready(server, target.url, payload(), headers=target.headers, must_have=(RATE_LIMIT_HEADER, "X-Cache"))
    _check_full_chain(target, token, redis_port)
    return target


def start_gateway_full_chain(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """HS256 auth required + rate limit on Redis + cache on Redis, every request a miss."""
    return _full_chain("gateway-full-chain", "", port, backend, work, stack)


def start_gateway_full_chain_asyncio(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    return _full_chain("gateway-full-chain-asyncio", "asyncio", port, backend, work, stack)


STARTERS: dict[str, StartFn] = {
    "gateway-full-chain": start_gateway_full_chain,
    "gateway-full-chain-asyncio": start_gateway_full_chain_asyncio,
    "gateway-jwt-hs256": start_gateway_jwt_hs256,
    "gateway-jwt-rs256-nocache": start_gateway_jwt_rs256_nocache,
    "gateway-jwt-rs256": start_gateway_jwt_rs256,
    "gateway-rl-memory": start_gateway_rl_memory,
    "gateway-rl-redis": start_gateway_rl_redis,
    "gateway-cache-miss": start_gateway_cache_miss,
    "gateway-cache-hit": start_gateway_cache_hit,
}
