"""``gateway token``: mint a development HS256 token with the configured secret (DESIGN §2)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import jwt

from middleware.schema import parse_duration

from .config import GatewayConfig

__all__ = ("mint_token",)


def mint_token(
    config: GatewayConfig,
    *,
    sub: str,
    scopes: Sequence[str] = (),
    ttl: str | float = "1h",
    claims: Sequence[str] = (),
    now: float | None = None,
) -> str:
    """An HS256 token for ``sub`` with ``scopes`` (space-joined ``scope`` claim), valid for ``ttl``.

    Uses ``jwt.secret`` and sets ``iss``/``aud`` when the config checks them, so the token
    is accepted by this gateway. Raises ValueError when the config has no HMAC secret.
    """
    settings = config.jwt
    if settings is None or settings.secret is None:
        raise ValueError("the config has no jwt.secret to sign with")
    lifetime = int(parse_duration(ttl))
    if lifetime <= 0:
        raise ValueError(f"--ttl must be at least 1s, got {ttl!r}")
    if not sub:
        raise ValueError("--sub must not be empty")
    issued = int(time.time() if now is None else now)
    payload: dict[str, object] = {"sub": sub, "iat": issued, "exp": issued + lifetime}
    if scopes:
        payload["scope"] = " ".join(scopes)
    if settings.issuer:
        payload["iss"] = settings.issuer
    if settings.audience:
        payload["aud"] = settings.audience[0]
    for item in claims:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--claim expects NAME=VALUE, got {item!r}")
        if name in ("sub", "iat", "exp", "scope"):
            raise ValueError(f"--claim cannot set {name}; use --sub, --ttl or --scope")
        payload[name] = value
    algorithm = (
        "HS256" if "HS256" in settings.algorithms else sorted(a for a in settings.algorithms if a.startswith("HS"))[0]
    )
    return jwt.encode(payload, settings.secret, algorithm=algorithm)
