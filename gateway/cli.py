"""The ``gateway`` command (DESIGN §2): run, check, demo, token.

Parses arguments and calls into the package; no logic of its own. ``check`` prints its
findings on stdout (like a linter); ``run`` and ``token`` print errors on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import __version__

if TYPE_CHECKING:
    from .config import GatewayConfig

__all__ = ("main", "resolve_config_path")


def resolve_config_path(option: str | None) -> Path:
    """``-c`` if given, else ``$GATEWAY_CONFIG``, else ``./routes.yaml``."""
    return Path(option or os.environ.get("GATEWAY_CONFIG") or "routes.yaml")


def _load(option: str | None, *, out: TextIO | None = None) -> GatewayConfig | None:
    """The config, or None after printing every error (one `file:LINE:COL: path: message` line each)."""
    from .config import ConfigInvalid, load_file  # imported when needed: `--help` stays instant

    path = resolve_config_path(option)
    try:
        return load_file(path)
    except ConfigInvalid as exc:
        for error in exc.errors:
            print(error, file=out or sys.stderr)
        if not path.exists() and option is None and not os.environ.get("GATEWAY_CONFIG"):
            print("gateway: no ./routes.yaml here; pass -c FILE or set GATEWAY_CONFIG", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    from .server import configure_logging, serve

    configure_logging(args.log_level)
    config = _load(args.config)
    if config is None:
        return 1
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    try:
        return serve(config, host=host, port=port, workers=args.workers)
    except OSError as exc:  # the port is taken, the address is not ours, ...
        print(f"gateway: cannot serve on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config, out=sys.stdout)  # the errors are what `check` reports: stdout, like a linter
    if config is None:
        return 1
    print(f"ok: {len(config.services)} services")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(resolve_config_path(args.config), port=args.port)


def _token(args: argparse.Namespace) -> int:
    from .tokens import mint_token

    config = _load(args.config)
    if config is None:
        return 1
    try:
        print(mint_token(config, sub=args.sub, scopes=args.scope, ttl=args.ttl, claims=args.claim))
    except ValueError as exc:
        print(f"gateway token: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="An async API gateway and reverse proxy.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "routes.yaml to use (default: $GATEWAY_CONFIG, then ./routes.yaml)"

    run = commands.add_parser("run", help="serve the routes in routes.yaml")
    run.add_argument("-c", "--config", help=config_help)
    run.add_argument("--host", help="address to listen on (default: listen.host from the config)")
    run.add_argument("--port", type=int, help="port to listen on (default: listen.port from the config)")
    run.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    run.set_defaults(func=_run)

    check = commands.add_parser("check", help="validate routes.yaml and report every error with its line")
    check.add_argument("-c", "--config", help=config_help)
    check.set_defaults(func=_check)

    demo = commands.add_parser("demo", help="start the example backends and a gateway in front of them")
    demo.add_argument("-c", "--config", help=config_help)
    demo.add_argument("--port", type=int, default=None, help="gateway port (default: listen.port from the config)")
    demo.set_defaults(func=_demo)

    token = commands.add_parser("token", help="mint an HS256 token with the configured jwt.secret (for trying things)")
    token.add_argument("-c", "--config", help=config_help)
    token.add_argument("--sub", required=True, help="the subject (user id)")
    token.add_argument("--scope", action="append", default=[], help="a scope to grant (repeatable)")
    token.add_argument("--ttl", default="1h", help="lifetime: 30m, 1h, 1d (default 1h)")
    token.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE", help="an extra claim (repeatable)")
    token.set_defaults(func=_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
