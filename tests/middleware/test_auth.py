"""JWT auth (DESIGN §6): config, verification, error headers, JWKS caching/rotation, claim headers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from middleware import base
from middleware.auth import (
    MAX_TOKEN_LENGTH,
    AuthMode,
    AuthPolicy,
    JwtAuthMiddleware,
    JwtSettings,
    KeySource,
    Rejected,
    RejectedTokens,
    Verified,
    VerifiedTokens,
    claim_header_names,
    claim_headers,
)
from middleware.base import CLAIMS, OUTCOME, Handler
from middleware.jwks import VerificationKey
from middleware.problem import ProblemMiddleware
from middleware.request_id import RequestIdMiddleware
from middleware.schema import ConfigError, Section

from .conftest import MakeClient
from .jwks_server import JWKS_PATH, JwksBackend, public_jwk

SECRET = "test-secret-" + "x" * 52  # 64 bytes: long enough for HS512
CHALLENGE = 'Bearer realm="gateway"'
Client = TestClient[web.Request, web.Application]


def invalid(description: str) -> str:
    return f'{CHALLENGE}, error="invalid_token", error_description="{description}"'


def claims(**overrides: Any) -> dict[str, Any]:
    """Fresh claims for alice; an override of None removes the claim."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 300, **overrides}
    return {k: v for k, v in payload.items() if v is not None}


def sign(payload: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256", **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers or None)


def b64(data: bytes | dict[str, Any] | list[Any]) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256_raw(header: bytes | dict[str, Any], payload: bytes | dict[str, Any], secret: bytes = SECRET.encode()) -> str:
    """A correctly HS256-signed token with any header/payload bytes (pyjwt refuses to build odd ones)."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs_settings(**overrides: Any) -> JwtSettings:
    return JwtSettings(**{"algorithms": frozenset({"HS256"}), "secret": SECRET, **overrides})


def policy(mode: AuthMode = AuthMode.REQUIRED, *scopes: str) -> AuthPolicy:
    return AuthPolicy(mode=mode, scopes=frozenset(scopes))


async def whoami(request: web.Request) -> web.StreamResponse:
    return web.json_response({"sub": request[OUTCOME].sub, "claims": request.get(CLAIMS)})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def public_pem(private_key: Any) -> bytes:
    return bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def pem(private_key: Any, tmp_path: Path) -> str:
    """The path of a new PEM file holding the public half of ``private_key``."""
    path = tmp_path / f"{uuid.uuid4().hex}.pem"
    path.write_bytes(public_pem(private_key))
    return str(path)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


AuthClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def auth_client(make_client: MakeClient, aiohttp_client: Any) -> AuthClient:
    """A client on [request id, problem, JwtAuthMiddleware, *after] → handler; ``roomy`` lifts aiohttp's
    8 KiB header limit so that oversized tokens reach the middleware."""

    async def build(
        settings: JwtSettings | None = None,
        auth: AuthPolicy | None = None,
        *,
        keys: KeySource | None = None,
        websocket: bool = False,
        after: tuple[base.Middleware, ...] = (),
        handler: Handler = whoami,
        roomy: bool = False,
    ) -> Client:
        settings = settings or hs_settings()
        middleware = JwtAuthMiddleware(
            auth or policy(), settings=settings, keys=keys or KeySource(settings), websocket=websocket
        )
        if not roomy:
            return await make_client(middleware, *after, handler=handler)
        app = web.Application(
            middlewares=[RequestIdMiddleware(), ProblemMiddleware(), middleware, *after],
            handler_args={"max_field_size": 200_000, "max_line_size": 200_000},
        )
        base.install(app)
        app.router.add_route("*", "/{tail:.*}", handler)
        client: Client = await aiohttp_client(app)
        return client

    return build


# -- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param({"algorithms": ["none"], "secret": "s"}, "jwt.algorithms: `none` is never accepted", id="none"),
        pytest.param({"algorithms": ["HS256"]}, "jwt.secret: HS256 needs a secret", id="hs without secret"),
        pytest.param({"algorithms": ["RS256"], "secret": "s"}, "jwt.public_key: RS256 needs", id="rs without key"),
        pytest.param({"secret": "s", "leeway": "soon"}, "jwt.leeway: expected a duration", id="bad leeway"),
        pytest.param({"secret": "s", "secrte": "s"}, "jwt.secrte: unknown key", id="typo"),
    ],
)
def test_jwt_section_errors(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        JwtSettings.parse(Section.single("jwt", raw))


def test_public_key_file_that_is_missing_is_a_config_error(tmp_path: Path) -> None:
    settings = JwtSettings(algorithms=frozenset({"RS256"}), public_key=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"jwt\.public_key: cannot read"):
        KeySource(settings)


def test_public_key_of_the_wrong_family_is_a_config_error(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    settings = JwtSettings(algorithms=frozenset({"RS256"}), public_key=pem(ec_key, tmp_path))
    with pytest.raises(ConfigError, match="verifies none of the allowed algorithms"):
        KeySource(settings)


def test_jwks_url_needs_a_session() -> None:
    with pytest.raises(TypeError, match="ClientSession"):
        KeySource(JwtSettings(algorithms=frozenset({"RS256"}), jwks_url="http://127.0.0.1:1/jwks"))


# -- modes and the 401 challenge ---------------------------------------------------------------


async def test_required_route_without_token_is_401_with_bare_challenge(auth_client: AuthClient) -> None:
    client = await auth_client()
    response = await client.get("/")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert response.headers["Content-Type"] == "application/problem+json"
    assert (await response.json())["detail"] == "A bearer token is required"


async def test_valid_token_passes_with_claims_and_subject(auth_client: AuthClient) -> None:
    client = await auth_client()
    response = await client.get("/", headers=bearer(sign(claims(tenant="acme"))))
    assert response.status == 200
    body = await response.json()
    assert body["sub"] == "alice"
    assert body["claims"]["tenant"] == "acme"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
async def test_bearer_scheme_is_case_insensitive(auth_client: AuthClient, scheme: str) -> None:
    client = await auth_client()
    response = await client.get("/", headers={"Authorization": f"{scheme} {sign(claims())}"})
    assert response.status == 200


async def test_other_authorization_schemes_count_as_no_token(auth_client: AuthClient) -> None:
    client = await auth_client()
    response = await client.get("/", headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE


async def test_optional_route_without_token_is_anonymous(auth_client: AuthClient) -> None:
    client = await auth_client(auth=policy(AuthMode.OPTIONAL, "users:read"))
    response = await client.get("/")
    assert response.status == 200
    assert await response.json() == {"sub": None, "claims": None}


async def test_optional_route_with_invalid_token_is_401_not_anonymous(auth_client: AuthClient) -> None:
    client = await auth_client(auth=policy(AuthMode.OPTIONAL))
    response = await client.get("/", headers=bearer(sign(claims(), key="another-secret-" + "y" * 40)))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == invalid("the token signature does not verify")


async def test_optional_route_with_valid_token_is_authenticated(auth_client: AuthClient) -> None:
    client = await auth_client(auth=policy(AuthMode.OPTIONAL))
    response = await client.get("/", headers=bearer(sign(claims())))
    assert (await response.json())["sub"] == "alice"


async def test_none_route_does_not_look_at_tokens(auth_client: AuthClient) -> None:
    client = await auth_client(auth=policy(AuthMode.NONE))
    response = await client.get("/", headers=bearer("garbage"))
    assert response.status == 200
    assert (await response.json())["claims"] is None


async def test_claims_reach_a_later_middleware(auth_client: AuthClient) -> None:
    seen: list[dict[str, Any]] = []

    @web.middleware
    async def later(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request[CLAIMS])
        return await handler(request)

    client = await auth_client(after=(later,))
    response = await client.get("/", headers=bearer(sign(claims(tenant="acme"))))
    assert response.status == 200
    assert seen[0]["sub"] == "alice"
    assert seen[0]["tenant"] == "acme"


# -- invalid tokens: every reason is a 401 with error="invalid_token" ----------------------------------


def _other_secret() -> str:
    return "not-the-secret-" + "z" * 50


@pytest.mark.parametrize(
    ("settings", "token", "description"),
    [
        pytest.param({}, lambda: sign(claims(exp=int(time.time()) - 60)), "the token has expired", id="expired"),
        pytest.param({}, lambda: sign(claims(nbf=int(time.time()) + 600)), "the token is not valid yet", id="nbf"),
        pytest.param({}, lambda: sign(claims(iat=int(time.time()) + 600)), "the token is not valid yet", id="iat"),
        pytest.param(
            {"issuer": "https://auth.example"},
            lambda: sign(claims(iss="https://evil.example")),
            "the token has the wrong issuer",
            id="wrong iss",
        ),
        pytest.param(
            {"issuer": "https://auth.example"}, lambda: sign(claims()), "the token lacks a required claim", id="no iss"
        ),
        pytest.param(
            {"audience": ("api",)},
            lambda: sign(claims(aud="other")),
            "the token is not meant for this audience",
            id="wrong aud",
        ),
        pytest.param({"audience": ("api",)}, lambda: sign(claims()), "the token lacks a required claim", id="no aud"),
        pytest.param(
            {}, lambda: sign(claims(), key=_other_secret()), "the token signature does not verify", id="bad signature"
        ),
        pytest.param(
            {}, lambda: sign(claims(), algorithm="HS512"), "the token algorithm is not accepted", id="alg not allowed"
        ),
        pytest.param(
            {}, lambda: f"{b64({'alg': 'none'})}.{b64(claims())}.", "the token algorithm is not accepted", id="none"
        ),
        pytest.param(
            {}, lambda: f"{b64({'alg': 'NONE'})}.{b64(claims())}.", "the token algorithm is not accepted", id="NONE"
        ),
        pytest.param(
            {"algorithms": frozenset({"HS256", "none"})},
            lambda: f"{b64({'alg': 'none'})}.{b64(claims())}.",
            "the token algorithm is not accepted",
            id="none even if listed",
        ),
    ],
)
async def test_invalid_token_is_401_with_description(
    auth_client: AuthClient, settings: dict[str, Any], token: Callable[[], str], description: str
) -> None:
    client = await auth_client(hs_settings(**settings))
    response = await client.get("/", headers=bearer(token()))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == invalid(description)
    assert (await response.json())["detail"] == f"Invalid bearer token: {description}"


@pytest.mark.parametrize(
    ("claim", "offset"),
    [
        pytest.param("exp", -20, id="expired within leeway"),
        pytest.param("nbf", 20, id="nbf within leeway"),
    ],
)
async def test_leeway_is_allowed(auth_client: AuthClient, claim: str, offset: int) -> None:
    client = await auth_client(hs_settings(leeway=30.0))
    token = sign(claims(**{claim: int(time.time()) + offset}))  # taken now, not at collection time
    response = await client.get("/", headers=bearer(token))
    assert response.status == 200


async def test_matching_issuer_and_one_of_the_audiences_pass(auth_client: AuthClient) -> None:
    client = await auth_client(hs_settings(issuer="https://auth.example", audience=("api", "web")))
    token = sign(claims(iss="https://auth.example", aud=["web", "mobile"]))
    assert (await client.get("/", headers=bearer(token))).status == 200


async def test_audience_is_not_checked_when_not_configured(auth_client: AuthClient) -> None:
    client = await auth_client()
    assert (await client.get("/", headers=bearer(sign(claims(aud="anything"))))).status == 200


GARBAGE = [
    pytest.param("", id="empty"),
    pytest.param("garbage", id="one segment"),
    pytest.param("a.b", id="two segments"),
    pytest.param("a.b.c.d", id="four segments"),
    pytest.param("!!!.@@@.###", id="not base64"),
    pytest.param("ü.ü.ü", id="non-ascii"),
    pytest.param(f"{b64(b'not json')}.{b64(claims())}.sig", id="header not json"),
    pytest.param(f"{b64([1, 2])}.{b64(claims())}.sig", id="header a json list"),
    pytest.param(f"{b64(b'{}')}.{b64(claims())}.sig", id="header without alg"),
    pytest.param(f"{b64({'alg': ['HS256']})}.{b64(claims())}.sig", id="alg a list"),
    pytest.param(f"{b64({'alg': 'HS256'})}.{b64(claims())}.a", id="signature bad length"),
    pytest.param(hs256_raw({"alg": "HS256", "kid": 7}, claims()), id="kid a number"),
    pytest.param(hs256_raw({"alg": "HS256", "crit": ["exp"]}, claims()), id="unknown crit"),
    pytest.param(hs256_raw({"alg": "HS256", "b64": False, "crit": ["b64"]}, claims()), id="b64 false"),
    pytest.param(hs256_raw({"alg": "HS256"}, b"not json"), id="signed payload not json"),
    pytest.param(hs256_raw({"alg": "HS256"}, b"[1]"), id="signed payload a list"),
    pytest.param(hs256_raw({"alg": "HS256"}, b'{"exp": 1e999}'), id="exp infinite"),
    pytest.param(hs256_raw({"alg": "HS256"}, b'{"exp": "tomorrow"}'), id="exp a string"),
    pytest.param(hs256_raw({"alg": "HS256"}, b'{"nbf": [1]}'), id="nbf a list"),
    pytest.param(hs256_raw({"alg": "HS256"}, b'{"iat": {}}'), id="iat an object"),
    pytest.param(hs256_raw({"alg": "HS256"}, b'{"sub": 42}'), id="sub a number"),
    pytest.param(hs256_raw({"alg": "HS256"}, b'{"exp": ' + b"9" * 5000 + b"}"), id="exp 5000 digits"),
    pytest.param(hs256_raw({"alg": "HS256"}, b"[" * 2000 + b"]" * 2000), id="deeply nested"),
    pytest.param(hs256_raw({"alg": "HS256"}, b"[" * 50_000 + b"]" * 50_000), id="100 KB"),
    pytest.param(f"{b64({'alg': 'RS256'})}.{b64(claims())}.{b64(b'x' * 256)}", id="rs256 without a key"),
]


@pytest.mark.parametrize("token", GARBAGE)
async def test_malformed_token_is_401_never_500(auth_client: AuthClient, token: str) -> None:
    client = await auth_client(auth=policy(AuthMode.OPTIONAL), roomy=True)
    response = await client.get("/", headers=bearer(token))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith(f'{CHALLENGE}, error="invalid_token", error_description="')


def _signed_segments(header_segment: str, payload: dict[str, Any]) -> str:
    """An HS256 token signed over ``header_segment`` exactly as given (padding, junk and all)."""
    signing_input = f"{header_segment}.{b64(payload)}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def test_header_with_base64_padding_still_verifies(auth_client: AuthClient) -> None:
    # some issuers (AWS ALB) keep the '=' padding; pyjwt accepts it, and so must the key lookup
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256"}).encode()).decode()
    assert header.endswith("=")
    client = await auth_client()
    response = await client.get("/", headers=bearer(_signed_segments(header, claims())))
    assert response.status == 200


async def test_header_with_characters_outside_base64url_is_malformed_even_when_signed(
    auth_client: AuthClient,
) -> None:
    # a lenient base64 decoder skips the '!' and would read a good header; the token is refused
    header = b64({"alg": "HS256"})
    client = await auth_client()
    response = await client.get("/", headers=bearer(_signed_segments(header[:4] + "!" + header[4:], claims())))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == invalid("the token is malformed")


async def test_header_kid_that_is_not_a_string_is_invalid(auth_client: AuthClient) -> None:
    client = await auth_client()
    response = await client.get("/", headers=bearer(hs256_raw({"alg": "HS256", "kid": 7}, claims())))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == invalid("the token is invalid")


async def test_100kb_token_is_401(auth_client: AuthClient) -> None:
    client = await auth_client(roomy=True)
    token = sign(claims(padding="p" * 100_000))
    response = await client.get("/", headers=bearer(token))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == invalid("the token is too long")


async def test_token_at_the_length_cap_is_still_verified(auth_client: AuthClient) -> None:
    client = await auth_client(roomy=True)
    token = sign(claims(padding=""))
    token = sign(claims(padding="p" * ((MAX_TOKEN_LENGTH - len(token)) * 3 // 4)))
    assert MAX_TOKEN_LENGTH - 4 <= len(token) <= MAX_TOKEN_LENGTH
    assert (await client.get("/", headers=bearer(token))).status == 200


# -- algorithm families and key confusion -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_fixture", "algorithm"),
    [
        pytest.param("rsa_key", "RS256", id="RS256"),
        pytest.param("rsa_key", "PS384", id="PS384"),
        pytest.param("ec_key", "ES256", id="ES256"),
        pytest.param("ed_key", "EdDSA", id="EdDSA"),
    ],
)
async def test_static_public_key_verifies_its_family(
    auth_client: AuthClient, request: pytest.FixtureRequest, tmp_path: Path, key_fixture: str, algorithm: str
) -> None:
    private = request.getfixturevalue(key_fixture)
    settings = JwtSettings(algorithms=frozenset({algorithm}), public_key=pem(private, tmp_path))
    client = await auth_client(settings)
    response = await client.get("/", headers=bearer(sign(claims(), key=private, algorithm=algorithm)))
    assert response.status == 200


async def test_ed448_public_key_verifies_eddsa(auth_client: AuthClient, tmp_path: Path) -> None:
    private = ed448.Ed448PrivateKey.generate()
    settings = JwtSettings(algorithms=frozenset({"EdDSA"}), public_key=pem(private, tmp_path))
    client = await auth_client(settings)
    assert (await client.get("/", headers=bearer(sign(claims(), key=private, algorithm="EdDSA")))).status == 200


async def test_es384_token_is_not_verified_with_a_p256_key(
    auth_client: AuthClient, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    settings = JwtSettings(algorithms=frozenset({"ES256", "ES384"}), public_key=pem(ec_key, tmp_path))
    client = await auth_client(settings)
    forged = f"{b64({'alg': 'ES384'})}.{b64(claims())}.{b64(b'x' * 96)}"
    response = await client.get("/", headers=bearer(forged))
    assert response.headers["WWW-Authenticate"] == invalid("the token algorithm is not accepted")


@pytest.mark.parametrize(
    "algorithms",
    [
        pytest.param({"RS256"}, id="HS256 not allowed"),
        pytest.param({"RS256", "HS256"}, id="HS256 allowed with a secret"),
    ],
)
async def test_hs256_signed_with_the_rsa_public_pem_is_rejected(
    auth_client: AuthClient, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, algorithms: set[str]
) -> None:
    path = pem(rsa_key, tmp_path)
    secret = SECRET if "HS256" in algorithms else None
    client = await auth_client(JwtSettings(algorithms=frozenset(algorithms), public_key=path, secret=secret))
    forged = hs256_raw({"alg": "HS256", "typ": "JWT"}, claims(), secret=public_pem(rsa_key))
    response = await client.get("/", headers=bearer(forged))
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_short_hmac_secret_still_verifies_without_warnings(auth_client: AuthClient) -> None:
    client = await auth_client(hs_settings(secret="short"))  # filterwarnings=error: pyjwt's warning would fail
    token = hs256_raw({"alg": "HS256"}, claims(), secret=b"short")  # pyjwt would warn while signing, too
    assert (await client.get("/", headers=bearer(token))).status == 200


# -- scopes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "granted",
    [
        pytest.param({"scope": "users:read users:write"}, id="scope string"),
        pytest.param({"scp": ["users:write", "users:read"]}, id="scp list"),
        pytest.param({"scp": "users:read users:write"}, id="scp string"),
        pytest.param({"scope": "users:read", "scp": ["users:write"]}, id="both claims"),
    ],
)
async def test_all_scopes_granted_pass(auth_client: AuthClient, granted: dict[str, Any]) -> None:
    client = await auth_client(auth=policy(AuthMode.REQUIRED, "users:read", "users:write"))
    assert (await client.get("/", headers=bearer(sign(claims(**granted))))).status == 200


@pytest.mark.parametrize(
    "granted",
    [
        pytest.param({"scope": "users:read"}, id="one missing"),
        pytest.param({}, id="no scope claim"),
        pytest.param({"scope": 42}, id="scope not a string"),
        pytest.param({"scp": [{"users:write": True}, "users:read"]}, id="scp with junk"),
        pytest.param({"scope": "users:read,users:write"}, id="comma is not a separator"),
    ],
)
async def test_missing_scope_is_403_insufficient_scope(auth_client: AuthClient, granted: dict[str, Any]) -> None:
    client = await auth_client(auth=policy(AuthMode.REQUIRED, "users:read", "users:write"))
    response = await client.get("/", headers=bearer(sign(claims(**granted))))
    assert response.status == 403
    assert response.headers["WWW-Authenticate"] == (
        f'{CHALLENGE}, error="insufficient_scope", error_description="the token lacks a required scope", '
        'scope="users:read users:write"'
    )


async def test_optional_route_with_token_lacking_scope_is_403(auth_client: AuthClient) -> None:
    client = await auth_client(auth=policy(AuthMode.OPTIONAL, "users:read"))
    assert (await client.get("/", headers=bearer(sign(claims())))).status == 403


# -- the query-string token -------------------------------------------------------------------------------


async def ws_whoami(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(request[CLAIMS]["sub"])
    await ws.close()
    return ws


async def test_query_token_is_accepted_on_websocket_upgrade(auth_client: AuthClient) -> None:
    client = await auth_client(websocket=True, handler=ws_whoami)
    async with client.ws_connect(f"/chat?access_token={sign(claims())}") as ws:
        assert await ws.receive_str() == "alice"


async def test_invalid_query_token_on_upgrade_is_401(auth_client: AuthClient) -> None:
    client = await auth_client(websocket=True, handler=ws_whoami)
    with pytest.raises(aiohttp.WSServerHandshakeError) as error:
        await client.ws_connect("/chat?access_token=garbage")
    assert error.value.status == 401


async def test_query_token_is_ignored_on_plain_requests(auth_client: AuthClient) -> None:
    client = await auth_client(websocket=True)
    response = await client.get("/", params={"access_token": sign(claims())})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE


async def test_query_token_is_ignored_when_route_is_not_websocket(auth_client: AuthClient) -> None:
    client = await auth_client(websocket=False, handler=ws_whoami)
    with pytest.raises(aiohttp.WSServerHandshakeError) as error:
        await client.ws_connect(f"/chat?access_token={sign(claims())}")
    assert error.value.status == 401


# -- JWKS ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Jwks:
    """One JWKS server, and KeySources on it that are closed at teardown."""

    def __init__(self, backend: JwksBackend, url: str, session: aiohttp.ClientSession, clock: FakeClock) -> None:
        self.backend, self.url, self._session, self._clock = backend, url, session, clock
        self._sources: list[KeySource] = []

    def settings(self, algorithms: set[str] | None = None, **overrides: Any) -> JwtSettings:
        return JwtSettings(
            algorithms=frozenset(algorithms or {"RS256"}), jwks_url=self.url, jwks_cooldown=30.0, **overrides
        )

    async def keys(self, settings: JwtSettings | None = None) -> KeySource:
        source = KeySource(settings or self.settings(), session=self._session, clock=self._clock)
        self._sources.append(source)
        await source.start()
        return source

    async def aclose(self) -> None:
        for source in self._sources:
            await source.aclose()


@pytest.fixture
async def jwks(
    aiohttp_server: Any, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> AsyncIterator[Jwks]:
    backend = JwksBackend(keys=[public_jwk(rsa_key, "k1")])
    server = await aiohttp_server(backend.app())
    holder = Jwks(backend, str(server.make_url(JWKS_PATH)), session, clock)
    yield holder
    await holder.aclose()


def rs256(key: rsa.RSAPrivateKey, kid: str | None, **overrides: Any) -> dict[str, str]:
    headers = {"kid": kid} if kid is not None else {}
    return bearer(sign(claims(**overrides), key=key, algorithm="RS256", **headers))


async def test_jwks_key_verifies_token(auth_client: AuthClient, jwks: Jwks, rsa_key: rsa.RSAPrivateKey) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    assert (await client.get("/", headers=rs256(rsa_key, "k1"))).status == 200


async def test_jwks_token_without_kid_uses_the_only_key(
    auth_client: AuthClient, jwks: Jwks, rsa_key: rsa.RSAPrivateKey
) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    assert (await client.get("/", headers=rs256(rsa_key, None))).status == 200


@pytest.mark.parametrize(
    ("key_fixture", "algorithm"),
    [pytest.param("ec_key", "ES256", id="EC P-256"), pytest.param("ed_key", "EdDSA", id="Ed25519")],
)
async def test_jwks_serves_other_key_types(
    auth_client: AuthClient, jwks: Jwks, request: pytest.FixtureRequest, key_fixture: str, algorithm: str
) -> None:
    private = request.getfixturevalue(key_fixture)
    jwks.backend.keys = [public_jwk(private, "k9")]
    client = await auth_client(jwks.settings({algorithm}), keys=await jwks.keys(jwks.settings({algorithm})))
    token = sign(claims(), key=private, algorithm=algorithm, kid="k9")
    assert (await client.get("/", headers=bearer(token))).status == 200


async def test_jwks_is_cached(auth_client: AuthClient, jwks: Jwks, rsa_key: rsa.RSAPrivateKey) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    for _ in range(10):
        assert (await client.get("/", headers=rs256(rsa_key, "k1"))).status == 200
    assert jwks.backend.fetches == 1


async def test_jwks_rotation_is_picked_up_on_unknown_kid(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    jwks.backend.keys = [public_jwk(rsa_key2, "k2")]  # the IdP rotates: k1 retired
    clock.now += 31  # past the cooldown
    assert (await client.get("/", headers=rs256(rsa_key2, "k2"))).status == 200
    response = await client.get("/", headers=rs256(rsa_key, "k1"))
    assert response.headers["WWW-Authenticate"] == invalid("the token is signed with an unknown key")
    assert jwks.backend.fetches == 2


async def test_concurrent_tokens_with_a_new_kid_share_one_refetch(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key2: rsa.RSAPrivateKey
) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    jwks.backend.keys = [public_jwk(rsa_key2, "k2")]
    jwks.backend.delay = 0.05
    clock.now += 31
    statuses = await asyncio.gather(*(client.get("/", headers=rs256(rsa_key2, "k2")) for _ in range(20)))
    assert {response.status for response in statuses} == {200}  # all waited for the one fetch
    assert jwks.backend.fetches == 2


async def test_unknown_kid_within_cooldown_does_not_refetch(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    clock.now += 10
    response = await client.get("/", headers=rs256(rsa_key, "nope"))
    assert response.headers["WWW-Authenticate"] == invalid("the token is signed with an unknown key")
    assert jwks.backend.fetches == 1


async def test_unknown_kid_flood_costs_one_fetch(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    jwks.backend.delay = 0.05  # the fetch is in flight while the flood arrives
    clock.now += 31

    async def attempt() -> int:
        return (await client.get("/", headers=rs256(rsa_key, uuid.uuid4().hex))).status

    first = await asyncio.gather(*(attempt() for _ in range(50)))
    second = await asyncio.gather(*(attempt() for _ in range(50)))
    assert set(first) == set(second) == {401}
    assert jwks.backend.fetches == 2  # the startup fetch and one shared refetch


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param({"down": True}, id="503"),
        pytest.param({"body": b"<html>oops</html>"}, id="not json"),
        pytest.param({"body": b'{"keys": []}'}, id="no keys"),
        pytest.param({"body": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, id="no usable keys"),
    ],
)
async def test_jwks_failure_keeps_last_good_keys(
    auth_client: AuthClient,
    jwks: Jwks,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
    failure: dict[str, Any],
) -> None:
    jwks.backend.max_age = 60
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    for name, value in failure.items():
        setattr(jwks.backend, name, value)
    clock.now += 3600  # stale, and past the cooldown
    with caplog.at_level(logging.WARNING, logger="middleware.jwks"):
        unknown = await client.get("/", headers=rs256(rsa_key, "nope"))  # waits for the failing refetch
        known = await client.get("/", headers=rs256(rsa_key, "k1"))
    assert unknown.status == 401
    assert known.status == 200
    assert jwks.backend.fetches == 2
    assert "JWKS fetch from" in caplog.text and "keeping the last 1 keys" in caplog.text


async def test_jwks_unreachable_at_startup_does_not_fail_and_recovers(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks.backend.down = True
    client = await auth_client(jwks.settings(), keys=await jwks.keys())  # logs, does not raise
    assert (await client.get("/", headers=rs256(rsa_key, "k1"))).status == 401
    jwks.backend.down = False
    clock.now += 31
    assert (await client.get("/", headers=rs256(rsa_key, "k1"))).status == 200


async def test_stale_jwks_is_refreshed_after_max_age(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks.backend.max_age = 120
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    clock.now += 100
    assert (await client.get("/", headers=rs256(rsa_key, "k1"))).status == 200
    assert jwks.backend.fetches == 1  # still fresh
    jwks.backend.keys = [public_jwk(rsa_key2, "k2")]  # k1 revoked
    clock.now += 100
    assert (await client.get("/", headers=rs256(rsa_key, "k1"))).status == 200  # served stale, refresh behind
    for _ in range(100):
        if jwks.backend.fetches == 2:
            break
        await asyncio.sleep(0.01)
    response = await client.get("/", headers=rs256(rsa_key, "k1"))
    assert response.status == 401
    assert jwks.backend.fetches == 2


async def test_jwks_hmac_keys_are_never_used(auth_client: AuthClient, jwks: Jwks, rsa_key: rsa.RSAPrivateKey) -> None:
    oct_secret = b"o" * 64
    jwks.backend.keys = [
        public_jwk(rsa_key, "k1"),
        {"kty": "oct", "kid": "h1", "k": b64(oct_secret)},
    ]
    settings = jwks.settings({"RS256", "HS256"}, secret=SECRET)
    client = await auth_client(settings, keys=await jwks.keys(settings))
    forged = hs256_raw({"alg": "HS256", "kid": "h1"}, claims(), secret=oct_secret)
    response = await client.get("/", headers=bearer(forged))
    assert response.headers["WWW-Authenticate"] == invalid("the token signature does not verify")


async def test_jwk_alg_restricts_what_the_key_verifies(
    auth_client: AuthClient, jwks: Jwks, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks.backend.keys = [public_jwk(rsa_key, "k1", alg="PS256")]
    settings = jwks.settings({"RS256", "PS256"})
    client = await auth_client(settings, keys=await jwks.keys(settings))
    assert (await client.get("/", headers=rs256(rsa_key, "k1"))).status == 401
    token = sign(claims(), key=rsa_key, algorithm="PS256", kid="k1")
    assert (await client.get("/", headers=bearer(token))).status == 200


# -- the verified-token cache -----------------------------------------------------------------------------------


class Decodes:
    """Counts signature checks (pyjwt decodes): one per full verification, none for a cache hit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = jwt.PyJWT.decode

        def counting(pyjwt: jwt.PyJWT, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(pyjwt, *args, **kwargs)

        monkeypatch.setattr(jwt.PyJWT, "decode", counting)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Decodes:
    return Decodes(monkeypatch)


HS_KEY = VerificationKey(SECRET.encode(), ("HS256",))


def verified(**token_claims: Any) -> Verified:
    return Verified(token_claims, "HS256", None, HS_KEY)


def cached_claims(cache: VerifiedTokens, token: str) -> dict[str, Any] | None:
    hit = cache.get(token)
    return None if hit is None else hit.claims


def test_cache_hit_returns_what_verified() -> None:
    cache = VerifiedTokens(8, clock=FakeClock())
    cache.put("t1", verified(sub="alice", exp=2000), leeway=0.0)
    assert cache.get("t1") == verified(sub="alice", exp=2000)
    assert cache.get("t2") is None


async def test_a_request_changing_its_claims_does_not_change_the_next_ones(auth_client: AuthClient) -> None:
    seen: list[dict[str, Any]] = []

    @web.middleware
    async def meddling(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(dict(request[CLAIMS]))
        request[CLAIMS]["sub"] = "mallory"
        request[CLAIMS]["admin"] = True
        return await handler(request)

    client = await auth_client(after=(meddling,))
    token = sign(claims())
    for _ in range(3):  # verified once, then remembered
        assert (await client.get("/", headers=bearer(token))).status == 200
    assert [c["sub"] for c in seen] == ["alice"] * 3
    assert not any("admin" in c for c in seen)


@pytest.mark.parametrize("leeway", [0.0, 30.0])
def test_cache_entry_is_not_used_from_exp_plus_leeway(leeway: float) -> None:
    clock = FakeClock()  # 1000
    cache = VerifiedTokens(8, clock=clock)
    cache.put("t", verified(sub="alice", exp=1010), leeway=leeway)
    clock.now = 1010 + leeway - 0.001
    assert cache.get("t") is not None
    clock.now = 1010 + leeway  # pyjwt: expired once exp <= now - leeway
    assert cache.get("t") is None
    assert len(cache) == 0


def test_cache_does_not_store_a_token_already_past_exp() -> None:
    cache = VerifiedTokens(8, clock=FakeClock())
    cache.put("t", verified(sub="alice", exp=990), leeway=5.0)  # verified within leeway a moment ago, expired now
    assert cache.get("t") is None


def test_cache_respects_nbf_and_iat_with_leeway() -> None:
    clock = FakeClock()
    cache = VerifiedTokens(8, clock=clock)
    cache.put("t", verified(sub="alice", nbf=1010, iat=1005, exp=2000), leeway=20.0)  # valid from 990
    assert cache.get("t") is not None
    clock.now = 989.0  # the wall clock stepped back before nbf - leeway
    assert cache.get("t") is None
    cache.put("early", verified(sub="alice", nbf=1100), leeway=0.0)  # not valid yet: never stored
    clock.now = 1000.0
    assert cache.get("early") is None


def test_cache_entry_lives_at_most_max_age() -> None:
    clock = FakeClock()
    cache = VerifiedTokens(8, max_age=60.0, clock=clock)
    cache.put("no-exp", verified(sub="alice"), leeway=0.0)
    clock.now = 1059.9
    assert cache.get("no-exp") is not None
    clock.now = 1060.0
    assert cache.get("no-exp") is None


def test_cache_is_bounded_and_evicts_the_least_recently_used() -> None:
    cache = VerifiedTokens(3, clock=FakeClock())
    for name in ("a", "b", "c"):
        cache.put(name, verified(sub=name), leeway=0.0)
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", verified(sub="d"), leeway=0.0)
    cache.put("e", verified(sub="e"), leeway=0.0)
    assert len(cache) == 3
    assert [name for name in "abcde" if cache.get(name) is not None] == ["a", "d", "e"]


def test_cache_skips_very_long_tokens() -> None:
    cache = VerifiedTokens(8, clock=FakeClock())
    cache.put("x" * 5000, verified(sub="alice"), leeway=0.0)
    assert len(cache) == 0


async def test_repeated_token_is_verified_once(auth_client: AuthClient, decodes: Decodes) -> None:
    client = await auth_client()
    token = sign(claims(tenant="acme"))
    for _ in range(3):
        response = await client.get("/", headers=bearer(token))
        assert response.status == 200
        assert (await response.json())["claims"]["tenant"] == "acme"
    assert decodes.count == 1


async def test_cache_off_verifies_every_time(auth_client: AuthClient, decodes: Decodes) -> None:
    client = await auth_client(hs_settings(verify_cache=0))
    token = sign(claims())
    for _ in range(3):
        assert (await client.get("/", headers=bearer(token))).status == 200
    assert decodes.count == 3


async def test_cached_token_is_refused_once_its_key_leaves_the_jwks(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    keys = await jwks.keys()
    client = await auth_client(jwks.settings(), keys=keys)
    token = rs256(rsa_key, "k1")
    assert (await client.get("/", headers=token)).status == 200  # verified and cached
    jwks.backend.keys = [public_jwk(rsa_key2, "k2")]  # k1 rotated out
    clock.now += 1000  # the JWKS is stale: this request refreshes it
    await client.get("/", headers=token)
    for _ in range(100):
        if jwks.backend.fetches == 2:
            break
        await asyncio.sleep(0.01)
    response = await client.get("/", headers=token)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == invalid("the token is signed with an unknown key")


async def test_cached_token_still_needs_the_route_scopes(auth_client: AuthClient) -> None:
    client = await auth_client(auth=policy(AuthMode.REQUIRED, "users:write"))
    token = sign(claims(scope="users:read"))
    assert (await client.get("/", headers=bearer(token))).status == 403
    assert (await client.get("/", headers=bearer(token))).status == 403


async def test_expired_token_is_not_served_from_the_cache(auth_client: AuthClient) -> None:
    client = await auth_client()
    exp = int(time.time()) + 1
    token = sign(claims(exp=exp))
    assert (await client.get("/", headers=bearer(token))).status == 200  # verified and cached
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
    response = await client.get("/", headers=bearer(token))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == invalid("the token has expired")


def test_verify_cache_setting() -> None:
    assert JwtSettings.parse(Section.single("jwt", {"secret": "s"})).verify_cache == 1024
    assert JwtSettings.parse(Section.single("jwt", {"secret": "s", "verify_cache": 0})).verify_cache == 0
    with pytest.raises(ConfigError, match=re.escape("jwt.verify_cache: must be >= 0")):
        JwtSettings.parse(Section.single("jwt", {"secret": "s", "verify_cache": -1}))


# -- claim headers for the upstream ------------------------------------------------------------------------------

CLAIM_SETTINGS = hs_settings(
    claims_headers=(("sub", "X-User-Id"), ("scp", "X-User-Scopes"), ("tenant", "X-Tenant"), ("roles", "X-Roles"))
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param({"sub": "alice"}, {"X-User-Id": "alice"}, id="string"),
        pytest.param({"scp": ["a", "b"]}, {"X-User-Scopes": "a b"}, id="list joined by space"),
        pytest.param({"sub": "alice\r\nX-Admin: yes"}, {"X-User-Id": "aliceX-Admin: yes"}, id="CRLF removed"),
        pytest.param({"sub": "a\x00b\x7fc\x85d\u2028e"}, {"X-User-Id": "abcde"}, id="controls removed"),
        pytest.param({"sub": "\r\n"}, {}, id="nothing left"),
        pytest.param({"tenant": 42}, {"X-Tenant": "42"}, id="number"),
        pytest.param({"tenant": True}, {"X-Tenant": "true"}, id="boolean"),
        pytest.param({"tenant": {"id": "t\n1"}}, {"X-Tenant": '{"id":"t\\n1"}'}, id="object as json"),
        pytest.param({"roles": [1, {"r": 2}, None]}, {"X-Roles": '1 {"r":2}'}, id="list of non-strings"),
        pytest.param({"tenant": None, "other": "x"}, {}, id="null and unmapped"),
    ],
)
def test_claim_headers(given: dict[str, Any], expected: dict[str, str]) -> None:
    assert claim_headers(CLAIM_SETTINGS, given) == expected


def test_claim_headers_without_verified_claims_are_empty() -> None:
    assert claim_headers(CLAIM_SETTINGS, None) == {}


def test_claim_header_names_are_the_configured_headers() -> None:
    assert claim_header_names(CLAIM_SETTINGS) == ("X-User-Id", "X-User-Scopes", "X-Tenant", "X-Roles")


# -- the rejected-token memory ----------------------------------------------------------------------------


def test_rejected_entry_lives_at_most_max_age() -> None:
    clock = FakeClock()
    rejected = RejectedTokens(8, max_age=60.0, clock=clock)
    rejected.put("t", Rejected("the token has expired"))
    clock.now = 1059.9
    assert rejected.get("t") == Rejected("the token has expired")
    clock.now = 1060.0
    assert rejected.get("t") is None
    assert len(rejected) == 0


def test_rejected_tokens_are_bounded_and_evict_the_least_recently_used() -> None:
    rejected = RejectedTokens(3, clock=FakeClock())
    for name in ("a", "b", "c"):
        rejected.put(name, Rejected(name))
    assert rejected.get("a") is not None  # a is now the most recently used
    rejected.put("d", Rejected("d"))
    rejected.put("e", Rejected("e"))
    assert len(rejected) == 3
    assert [name for name in "abcde" if rejected.get(name) is not None] == ["a", "d", "e"]


def test_rejected_tokens_skip_very_long_tokens() -> None:
    rejected = RejectedTokens(8, clock=FakeClock())
    rejected.put("x" * 5000, Rejected("the token is malformed"))
    assert len(rejected) == 0


@pytest.mark.parametrize(
    ("token", "description"),
    [
        pytest.param(lambda: sign(claims(exp=int(time.time()) - 60)), "the token has expired", id="expired"),
        pytest.param(
            lambda: sign(claims(), key=_other_secret()), "the token signature does not verify", id="bad signature"
        ),
        pytest.param(lambda: hs256_raw({"alg": "HS256"}, b"not json"), "the token is malformed", id="payload not json"),
    ],
)
async def test_a_token_that_failed_for_good_is_checked_once_and_refused_the_same_way_again(
    auth_client: AuthClient, decodes: Decodes, token: Callable[[], str], description: str
) -> None:
    client = await auth_client()
    bad = token()
    for _ in range(3):
        response = await client.get("/", headers=bearer(bad))
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == invalid(description)
        assert (await response.json())["detail"] == f"Invalid bearer token: {description}"
    assert decodes.count == 1


async def test_a_token_that_is_not_valid_yet_is_checked_every_time(auth_client: AuthClient, decodes: Decodes) -> None:
    client = await auth_client()
    early = sign(claims(nbf=int(time.time()) + 600))  # it will be valid: never remembered as refused
    for _ in range(3):
        response = await client.get("/", headers=bearer(early))
        assert response.headers["WWW-Authenticate"] == invalid("the token is not valid yet")
    assert decodes.count == 3


async def test_refused_tokens_are_not_remembered_with_the_cache_off(auth_client: AuthClient, decodes: Decodes) -> None:
    client = await auth_client(hs_settings(verify_cache=0))
    expired = sign(claims(exp=int(time.time()) - 60))
    for _ in range(3):
        assert (await client.get("/", headers=bearer(expired))).status == 401
    assert decodes.count == 3


async def test_a_token_whose_kid_was_unknown_verifies_once_the_jwks_has_it(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key2: rsa.RSAPrivateKey
) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    token = rs256(rsa_key2, "k2")
    response = await client.get("/", headers=token)
    assert response.headers["WWW-Authenticate"] == invalid("the token is signed with an unknown key")
    jwks.backend.keys = [public_jwk(rsa_key2, "k2")]  # the IdP publishes k2
    clock.now += 31  # past the cooldown: the unknown kid fetches the JWKS again
    assert (await client.get("/", headers=token)).status == 200


async def test_a_refused_signature_is_checked_again_once_the_jwks_gives_another_key(
    auth_client: AuthClient, jwks: Jwks, clock: FakeClock, rsa_key2: rsa.RSAPrivateKey
) -> None:
    client = await auth_client(jwks.settings(), keys=await jwks.keys())
    token = rs256(rsa_key2, "k1")  # signed with key 2 under the kid the JWKS gives key 1 for
    response = await client.get("/", headers=token)
    assert response.headers["WWW-Authenticate"] == invalid("the token signature does not verify")
    jwks.backend.keys = [public_jwk(rsa_key2, "k1")]  # the IdP puts key 2 under k1
    clock.now += 1000  # the JWKS is stale: this request refreshes it behind, still refused with key 1
    assert (await client.get("/", headers=token)).status == 401
    for _ in range(100):
        if jwks.backend.fetches == 2:
            break
        await asyncio.sleep(0.01)
    assert (await client.get("/", headers=token)).status == 200
