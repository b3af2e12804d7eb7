"""Running the gateway as a process: sockets, signals, workers, drain (DESIGN §2).

:func:`serve` runs one process, or with ``workers > 1`` supervises that many forked
workers sharing the port through SO_REUSEPORT (a crashed worker is started again). SIGTERM
or SIGINT stops accepting, lets in-flight requests finish for up to ``drain_timeout``
seconds, closes the upstream pool and exits 0. uvloop is used when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from aiohttp import web

from . import __version__
from .app import create_app
from .config import GatewayConfig

__all__ = ("configure_logging", "serve")

logger = logging.getLogger("gateway")

DRAIN_TIMEOUT = 10.0  # seconds in-flight requests get to finish after SIGTERM


def configure_logging(level: str = "info") -> None:
    """Human-readable lines on stderr; the JSON access log alone on stdout, one line per request."""
    root = logging.getLogger()
    root.handlers.clear()
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(errors)
    root.setLevel(level.upper())
    access = logging.getLogger("gateway.access")
    access.handlers.clear()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.propagate = False
    access.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").disabled = True


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(
    config: GatewayConfig, *, host: str, port: int, workers: int = 1, drain_timeout: float = DRAIN_TIMEOUT
) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code."""
    if workers <= 1:
        return _run_worker(config, host, port, reuse_port=False, drain_timeout=drain_timeout)
    return _supervise(config, host, port, workers, drain_timeout)


def _run_worker(config: GatewayConfig, host: str, port: int, *, reuse_port: bool, drain_timeout: float) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(config, host, port, reuse_port=reuse_port, drain_timeout=drain_timeout))
    return 0


async def _serve(config: GatewayConfig, host: str, port: int, *, reuse_port: bool, drain_timeout: float) -> None:
    runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False, shutdown_timeout=drain_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
        await site.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        _log_startup(config, runner, loop)
        await stop.wait()
        logger.info("shutting down: no new connections, draining in-flight requests (up to %gs)", drain_timeout)
    finally:
        await runner.cleanup()
    logger.info("stopped")


def _log_startup(config: GatewayConfig, runner: web.AppRunner, loop: asyncio.AbstractEventLoop) -> None:
    for address in runner.addresses:
        logger.info("gateway %s listening on http://%s:%s (pid %d, %s)", __version__, address[0], address[1],
                    os.getpid(), type(loop).__module__.split(".")[0])  # fmt: skip
    logger.info("config %s: %d services", config.source, len(config.services))
    for name, service in config.services.items():
        targets = ", ".join(str(u) for u in service.upstreams)
        default = service.routes[-1]
        extras = [f"auth {default.auth.mode.value}"]
        if default.rate_limit:
            extras.append(
                f"rate limit {default.rate_limit.requests}/{default.rate_limit.per:g}s by {default.rate_limit.key}"
            )
        if default.cache:
            extras.append(f"cache {default.cache.ttl:g}s")
        if default.websocket:
            extras.append("websocket")
        if len(service.routes) > 1:
            extras.append(f"{len(service.routes) - 1} path overrides")
        logger.info("  /api/%s/ -> %s (%s)", name, targets, ", ".join(extras))
    unenforced = sorted({f"cache on {r.name}" for s in config.services.values() for r in s.routes if r.cache})
    if unenforced:
        logger.warning("not applied by this version (parsed and validated only): %s", ", ".join(unenforced))


def _supervise(config: GatewayConfig, host: str, port: int, workers: int, drain_timeout: float) -> int:
    """Fork ``workers`` processes on one port; restart any that dies; forward SIGTERM/SIGINT."""
    stopping = False
    children: dict[int, int] = {}  # pid -> worker number

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = _run_worker(config, host, port, reuse_port=True, drain_timeout=drain_timeout)
            finally:
                os._exit(code)
        children[pid] = number

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("supervisor %d starting %d workers on %s:%d", os.getpid(), workers, host, port)
    for number in range(workers):
        start(number)
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        number = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed |= code != 0
            continue
        logger.error("worker %d (pid %d) exited with %d; starting it again", number, pid, code)
        time.sleep(0.5)  # a worker that dies at once must not spin the supervisor
        start(number)
    return 1 if failed else 0
