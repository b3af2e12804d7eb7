"""A real JWKS endpoint for tests: serve a key set, rotate it, take it down, count fetches."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

JWKS_PATH = "/.well-known/jwks.json"


def public_jwk(private_key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    """The public JWK of an RSA, EC or Ed25519/Ed448 private key, with ``kid`` (and e.g. ``alg``)."""
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, **extra}


@dataclass
class JwksBackend:
    """State of the endpoint; change it between requests to rotate keys or fail."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    max_age: int | None = None  # Cache-Control: max-age when set
    down: bool = False  # answer 503
    body: bytes | None = None  # answer 200 with this instead of the key set
    delay: float = 0.0  # seconds before answering, so concurrent fetches would overlap
    fetches: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            return web.Response(status=503, text="down")
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        headers = {"Cache-Control": f"max-age={self.max_age}"} if self.max_age is not None else {}
        return web.json_response({"keys": self.keys}, headers=headers)
