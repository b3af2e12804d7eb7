"""The demo REST "users" service behind the gateway (DESIGN §1, §3 ``services.users``).

An ordinary aiohttp app with in-memory records (one store per process, seeded with alice,
bob and carol). Every response says which instance answered in ``X-Served-By:
users@<port>``, so round-robin over two instances is visible from curl. ``/whoami`` echoes
what the gateway forwards (claim headers, ``X-Forwarded-*``, ``X-Request-ID``).

Run it with ``python -m examples.users --port 9001``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

__all__ = ["SERVED_BY", "USERS", "User", "UserDirectory", "create_app", "main"]

SERVED_BY = "X-Served-By"
MAX_LIMIT = 100  # largest page ``GET /users`` returns
DEFAULT_LIMIT = 20

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SEED = (("alice", "alice@example.com"), ("bob", "bob@example.com"), ("carol", "carol@example.com"))


@dataclass(slots=True)
class User:
    """One record; ``asdict`` gives its JSON form."""

    id: int
    name: str
    email: str


@dataclass(slots=True)
class UserDirectory:
    """The in-memory records of one process, in id order."""

    users: dict[int, User] = field(default_factory=dict)
    next_id: int = 1

    @classmethod
    def seeded(cls) -> UserDirectory:
        directory = cls()
        for name, email in _SEED:
            directory.add(name, email)
        return directory

    def add(self, name: str, email: str) -> User:
        user = User(self.next_id, name, email)
        self.users[user.id] = user
        self.next_id += 1
        return user


@dataclass(frozen=True, slots=True)
class _Service:
    name: str


USERS = web.AppKey("users", UserDirectory)
_SERVICE = web.AppKey("service", _Service)


def create_app(*, name: str = "users") -> web.Application:
    """The users app; ``name`` is the service name in ``X-Served-By`` and ``/health``."""
    app = web.Application(middlewares=[_json_errors])
    app[USERS] = UserDirectory.seeded()
    app[_SERVICE] = _Service(name)
    app.on_response_prepare.append(_served_by)
    app.router.add_get("/users", list_users)
    app.router.add_post("/users", create_user)
    app.router.add_get("/users/{id}", get_user)
    app.router.add_put("/users/{id}", replace_user)
    app.router.add_delete("/users/{id}", delete_user)
    app.router.add_get("/public/info", public_info)
    app.router.add_get("/health", health)
    app.router.add_get("/whoami", whoami)
    return app


async def list_users(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", DEFAULT_LIMIT, high=MAX_LIMIT)
    offset = _int_param(request, "offset", 0)
    users = list(request.app[USERS].users.values())
    page = [asdict(user) for user in users[offset : offset + limit]]
    return web.json_response({"users": page, "total": len(users), "limit": limit, "offset": offset})


async def get_user(request: web.Request) -> web.Response:
    return web.json_response(asdict(_lookup(request)))


async def create_user(request: web.Request) -> web.Response:
    name, email = await _user_fields(request)
    user = request.app[USERS].add(name, email)
    return web.json_response(asdict(user), status=201, headers={hdrs.LOCATION: f"/users/{user.id}"})


async def replace_user(request: web.Request) -> web.Response:
    name, email = await _user_fields(request)
    user = _lookup(request)  # after the await: the record may have been deleted meanwhile
    user.name, user.email = name, email
    return web.json_response(asdict(user))


async def delete_user(request: web.Request) -> web.Response:
    user = _lookup(request)
    del request.app[USERS].users[user.id]
    return web.Response(status=204)


async def public_info(request: web.Request) -> web.Response:
    body = {
        "service": request.app[_SERVICE].name,
        "users": len(request.app[USERS].users),
        # Changes on every upstream hit, so a cached copy is recognisable.
        "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    return web.json_response(body, headers={hdrs.CACHE_CONTROL: "public, max-age=60"})


async def health(request: web.Request) -> web.Response:
    body = {"status": "ok", "service": request.app[_SERVICE].name}
    return web.json_response(body, headers={hdrs.CACHE_CONTROL: "no-store"})


async def whoami(request: web.Request) -> web.Response:
    """What the gateway told us about the caller; ``private`` so no shared cache keeps it."""
    headers = request.headers
    scopes = headers.get("X-User-Scopes")
    body = {
        "user_id": headers.get("X-User-Id"),
        "scopes": scopes.split() if scopes is not None else [],
        "forwarded_for": headers.get(hdrs.X_FORWARDED_FOR),
        "forwarded_proto": headers.get(hdrs.X_FORWARDED_PROTO),
        "forwarded_host": headers.get(hdrs.X_FORWARDED_HOST),
        "request_id": headers.get("X-Request-ID"),
    }
    return web.json_response(body, headers={hdrs.CACHE_CONTROL: "private"})


def _lookup(request: web.Request) -> User:
    raw = request.match_info["id"]
    user = request.app[USERS].users.get(int(raw)) if raw.isdecimal() else None
    if user is None:
        raise web.HTTPNotFound(text=f"no user with id {raw!r}")
    return user


def _int_param(request: web.Request, key: str, default: int, *, high: int | None = None) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isdecimal() or (high is not None and int(raw) > high):
        bound = f" between 0 and {high}" if high is not None else " >= 0"
        raise web.HTTPBadRequest(text=f"{key} must be an integer{bound}")
    return int(raw)


async def _user_fields(request: web.Request) -> tuple[str, str]:
    """``name`` and ``email`` from a JSON object body, or 400 saying what is wrong."""
    try:
        data: Any = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be valid JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    missing = [key for key in ("name", "email") if key not in data]
    if missing:
        raise web.HTTPBadRequest(text=f"missing fields: {', '.join(missing)}")
    name, email = data["name"], data["email"]
    if not isinstance(name, str) or not name.strip():
        raise web.HTTPBadRequest(text="name must be a non-empty string")
    if not isinstance(email, str) or not _EMAIL.match(email):
        raise web.HTTPBadRequest(text="email must be an email address")
    return name.strip(), email


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render aiohttp's HTTP errors (ours, and its own 404/405) as ``{"error", "status", "detail"}``."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {k: v for k, v in exc.headers.items() if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)}
        body = {"error": exc.reason, "status": exc.status, "detail": exc.text}
        return web.json_response(body, status=exc.status, headers=kept)


async def _served_by(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[SERVED_BY] = f"{request.app[_SERVICE].name}@{_local_port(request)}"


def _local_port(request: web.Request) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[1])
    return str(request.url.port or "unix")


def main(argv: list[str] | None = None) -> None:
    """``python -m examples.users [--host H] [--port P] [--name N]``."""
    parser = argparse.ArgumentParser(prog="python -m examples.users", description="The demo users service.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9001, help="port to listen on (default: %(default)s)")
    parser.add_argument("--name", default="users", help="service name in X-Served-By (default: %(default)s)")
    args = parser.parse_args(argv)
    web.run_app(create_app(name=args.name), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
