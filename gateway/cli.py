"""The ``gateway`` command (DESIGN §2, §8): run, check, demo, token, explain, purge.

Parses arguments and calls into the package; no logic of its own. ``check`` prints its
findings on stdout (like a linter); ``run`` and ``token`` print errors on stderr.
``explain`` asks the running gateway's admin listener when it answers (live budgets and
upstream health), else builds the routes in this process; ``purge`` needs the admin listener.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import __version__

if TYPE_CHECKING:
    from .config import GatewayConfig

__all__ = ("main", "resolve_config_path", "usable_cpus", "workers_count")

logger = logging.getLogger("gateway")


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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def workers_count(text: str) -> int:
    """``--workers``: a number of processes, at least 1, or ``auto`` (one per usable CPU, as
    nginx's ``worker_processes auto``)."""
    if text == "auto":
        return usable_cpus()
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of processes or 'auto': {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"at least 1 worker, got {count}")
    return count


def _run(args: argparse.Namespace) -> int:
    from .server import configure_logging, serve

    configure_logging(args.log_level)
    config = _load(args.config)
    if config is None:
        return 1
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    cpus = usable_cpus()
    if args.workers > cpus:
        logger.warning(
            "%d workers on %d usable CPU%s: workers take turns on a core, and each request costs more "
            "CPU than with one worker per core (about 10%% more, measured with 2 on 1: bench/README.md); "
            "--workers auto starts one per CPU",
            args.workers, cpus, "" if cpus == 1 else "s",
        )  # fmt: skip
    try:
        return serve(config, host=host, port=port, workers=args.workers)
    except OSError as exc:  # the port is taken, the address is not ours, ...
        where = exc.filename or f"{host}:{port}"  # the admin listener names itself
        print(f"gateway: cannot serve on {where}: {exc.strerror or exc}", file=sys.stderr)
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


def _admin_url(config: GatewayConfig, option: str | None) -> str | None:
    if option:
        return option.rstrip("/")
    if not config.admin.enabled:
        return None
    host = config.admin.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return f"http://[{host}]:{config.admin.port}" if ":" in host else f"http://{host}:{config.admin.port}"


def _ask_admin(url: str, *, method: str = "GET") -> tuple[int, dict[str, object]] | None:
    """(status, JSON body) from the admin listener; None when nothing answers there."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": exc.reason}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _explain(args: argparse.Namespace) -> int:
    from .explain import parse_header, render

    config = _load(args.config)
    if config is None:
        return 1
    try:
        headers = [parse_header(h) for h in args.header]
    except ValueError as exc:
        print(f"gateway explain: {exc}", file=sys.stderr)
        return 2
    query = [("method", args.method), ("path", args.path), ("client", args.client)]
    query += [("header", f"{name}: {value}") for name, value in headers]
    admin = _admin_url(config, args.admin)
    answer = _ask_admin(f"{admin}/explain?{urllib.parse.urlencode(query)}") if admin else None
    if answer is not None and answer[0] == 200:
        result, source = answer[1], f"live, from {admin}"
    else:
        from .explain import explain_offline

        result, source = explain_offline(config, args.method, args.path, headers, client=args.client), "offline"
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(render(result, source=source))
    return 0


def _purge(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    admin = _admin_url(config, args.admin)
    if admin is None:
        print("gateway purge: the admin listener is off in this config (admin: off)", file=sys.stderr)
        return 1
    query = {"service": args.service, **({"prefix": args.prefix} if args.prefix else {})}
    if args.tag:
        query["tag"] = args.tag
    answer = _ask_admin(f"{admin}/cache/purge?{urllib.parse.urlencode(query)}", method="POST")
    if answer is None:
        print(f"gateway purge: nothing answers at {admin}: is the gateway running?", file=sys.stderr)
        return 1
    status, body = answer
    if status != 200:
        print(f"gateway purge: {body.get('error', status)}", file=sys.stderr)
        return 1
    count = body["purged"]
    print(f"purged {count} cached {'entry' if count == 1 else 'entries'} of {args.service}")
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
    run.add_argument(
        "--workers",
        type=workers_count,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); auto: one per CPU this process may run on",
    )
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

    admin_help = "admin listener URL (default: admin.host/admin.port from the config)"
    explain = commands.add_parser("explain", help="show how a request would be handled, without sending it")
    explain.add_argument("method", help="GET, POST, ...")
    explain.add_argument("path", help="the request target, e.g. /api/users/1?x=y")
    explain.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'", help="(repeatable)")
    explain.add_argument("--client", default="127.0.0.1", help="the client address (for ip rate-limit keys)")
    explain.add_argument("-c", "--config", help=config_help)
    explain.add_argument("--admin", help=admin_help)
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.set_defaults(func=_explain)

    purge = commands.add_parser("purge", help="drop cached responses of a service (through the admin listener)")
    purge.add_argument("--service", required=True)
    purge.add_argument("--prefix", help="only paths below this prefix (relative to the service)")
    purge.add_argument("--tag", help="only entries the upstream tagged with Cache-Tag")
    purge.add_argument("-c", "--config", help=config_help)
    purge.add_argument("--admin", help=admin_help)
    purge.set_defaults(func=_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
