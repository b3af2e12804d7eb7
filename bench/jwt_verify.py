"""In-process cost of JWT verification: one request through ``JwtAuthMiddleware``, in µs.

HS256 and RS256 (2048-bit), with the verified-token cache off and on (one token, so
every call after the first is a hit). No sockets, no proxy: this isolates what the
middleware adds per request, and is far less sensitive to machine noise than the wrk
rows. Prints one JSON object; ``run.py`` runs it pinned to the server CPU.

    .venv/bin/python bench/jwt_verify.py [--calls 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import jwt
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from middleware.auth import AuthMode, AuthPolicy, JwtAuthMiddleware, JwtSettings, KeySource

SECRET = "bench-" + "s" * 58


async def _ok(_request: web.Request) -> web.StreamResponse:
    return web.Response()


async def per_call_us(settings: JwtSettings, token: str, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of one middleware call, in µs."""
    middleware = JwtAuthMiddleware(AuthPolicy(mode=AuthMode.REQUIRED), settings=settings, keys=KeySource(settings))
    request = make_mocked_request("GET", "/", headers={"Authorization": f"Bearer {token}"})
    await middleware(request, _ok)  # the first call verifies (and fills the cache when there is one)
    means = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            await middleware(request, _ok)
        means.append((time.perf_counter() - started) / calls * 1e6)
    return float(statistics.median(means))


async def measure(calls: int, repeats: int, work: Path) -> dict[str, float]:
    now = int(time.time())
    claims = {"sub": "bench-user", "iat": now, "exp": now + 86400}
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = work / "rs256.pub.pem"
    pem.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    hs256 = JwtSettings(algorithms=frozenset({"HS256"}), secret=SECRET)
    rs256 = JwtSettings(algorithms=frozenset({"RS256"}), public_key=str(pem))
    cases = {
        "HS256": (hs256, jwt.encode(claims, SECRET, "HS256")),
        "RS256": (rs256, jwt.encode(claims, private, "RS256")),
    }
    results: dict[str, float] = {}
    for name, (settings, token) in cases.items():
        for label, size in (("no cache", 0), ("cache", settings.verify_cache or 1024)):
            configured = dataclasses.replace(settings, verify_cache=size)
            results[f"{name}, {label}"] = await per_call_us(configured, token, calls, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        print(json.dumps(asyncio.run(measure(args.calls, args.repeats, Path(work)))))


if __name__ == "__main__":
    main()
