"""``gateway demo``: the example backends and a gateway in front of them, in one process (DESIGN §2).

Reads the same routes.yaml as ``gateway run`` (the repository's demo map by default),
starts an ``examples.users`` backend on every loopback upstream of the ``users`` service and
an ``examples.chat`` backend on those of ``chat``, then the gateway, and prints commands to
paste, with a freshly minted token.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from examples import chat, users

from . import reload
from .admin import create_admin_app
from .app import create_app
from .config import ConfigInvalid, GatewayConfig, load_file
from .server import GatewayRunner, _loop_factory, configure_logging, tune_gc
from .tokens import mint_token

__all__ = ("DEV_SECRET", "run_demo")

# What `${JWT_SECRET:-...}` falls back to in the demo routes.yaml.
DEV_SECRET = "dev-secret-change-me-not-for-production"
_LOOPBACK = ("127.0.0.1", "localhost")


def run_demo(config_path: Path, *, port: int | None = None) -> int:
    configure_logging("info")
    os.environ.setdefault("JWT_SECRET", DEV_SECRET)
    try:
        config = load_file(config_path)
    except ConfigInvalid as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            runner.run(_demo(config, config_path, port if port is not None else config.listen.port))
        except OSError as exc:
            print(f"gateway demo: cannot listen: {exc}", file=sys.stderr)
            return 1
    return 0


async def _demo(config: GatewayConfig, config_path: Path, port: int) -> None:
    runners: list[web.AppRunner] = []
    try:
        backends = await _start_backends(config, runners)
        app = create_app(config)
        reload.install(app, config_path)  # edit routes.yaml while the demo runs: it is picked up
        # the production runner: its protocol (header and body timeouts, 414/431 problems, the
        # hit lane, whole responses in one write) and request handler, as `gateway run` serves
        gateway = GatewayRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        await gateway.setup()
        runners.append(gateway)
        await web.TCPSite(gateway, config.listen.host, port).start()
        admin_url = None
        if config.admin.enabled:
            admin = web.AppRunner(create_admin_app(app), access_log=None, handle_signals=False, shutdown_timeout=1)
            await admin.setup()
            runners.append(admin)
            await web.TCPSite(admin, config.admin.host, config.admin.port).start()
            admin_url = f"http://{config.admin.host}:{config.admin.port}"
        host = "127.0.0.1" if config.listen.host in ("0.0.0.0", "::") else config.listen.host
        tune_gc()  # as `gateway run` does once serving
        print(_instructions(config, f"http://{host}:{port}", backends, admin_url), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _start_backends(config: GatewayConfig, runners: list[web.AppRunner]) -> list[str]:
    """The example app of each demo service, on each of its loopback upstreams."""
    started = []
    makers: dict[str, Callable[[], web.Application]] = {"users": users.create_app, "chat": chat.create_app}
    for name, make in makers.items():
        service = config.services.get(name)
        for url in service.upstreams if service else ():
            if url.host not in _LOOPBACK or url.port is None:
                continue
            runner = web.AppRunner(make(), access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", url.port).start()
            started.append(f"{name} http://127.0.0.1:{url.port}")
    return started


def _instructions(config: GatewayConfig, base: str, backends: list[str], admin: str | None = None) -> str:
    lines = [
        "",
        f"gateway demo: {base}  (Ctrl-C stops everything)",
        f"  example backends: {', '.join(backends) or 'none started'}",
        "",
        "Try:",
        f"  curl -i {base}/api/users/users",
        f"  curl -i {base}/api/users/users/1",
        f"  curl -si {base}/api/users/public/info | grep -i -e x-cache -e age:   # MISS, then HIT with an Age",
        f"  curl -i {base}/api/nope/                      # unknown service: 404 problem+json",
        f"  seq 15 | xargs -P15 -I{{}} curl -s -o /dev/null -w '%{{http_code}} ' {base}/api/users/users; echo"
        "  # about 10 pass at once, the rest get 429",
        f"  curl -i --path-as-is {base}/api/users/../etc  # leaves /api/users/: 400",
    ]
    if config.jwt is not None and config.jwt.secret is not None:
        token = mint_token(config, sub="alice", scopes=["users:read", "users:write"], ttl="1h")
        lines += [
            "",
            "With a token (HS256 from jwt.secret, valid 1h; mint more with `gateway token --sub bob`):",
            f"  TOKEN={token}",
            f'  curl -i -H "Authorization: Bearer $TOKEN" {base}/api/users/whoami',
            f'  curl -i -X POST -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\\n'
            f'       -d \'{{"name": "dave", "email": "dave@example.com"}}\' {base}/api/users/users',
        ]
        if "chat" in config.services:
            ws = base.replace("http://", "ws://", 1)
            lines += [
                "",
                "Chat (WebSocket through the gateway; the token names you):",
                f'  python -m websockets "{ws}/api/chat/rooms/lobby?access_token=$TOKEN"',
                f"  open {base}/api/chat/ in a browser and paste the token",
            ]
    if admin is not None:
        lines += [
            "",
            f"Operations (admin listener {admin}):",
            f"  open {admin}/ in a browser: the live dashboard",
            f"  curl -s {admin}/metrics | grep gateway_requests_total",
            f"  curl -s {admin}/readyz; curl -s {admin}/config",
            f"  curl -s '{admin}/explain?method=GET&path=/api/users/users/1'",
            f"  curl -s -X POST '{admin}/cache/purge?service=users'",
            "  edit routes.yaml: the change is picked up (or refused, with the error) without a restart",
        ]
    lines += ["", "Access log (one JSON line per request) follows:", ""]
    return "\n".join(lines)
