"""Running the gateway as a process: sockets, signals, workers, drain (DESIGN §2, §8).

:func:`serve` runs one process, or with ``workers > 1`` supervises that many forked
workers sharing the port through SO_REUSEPORT (a crashed worker is logged and started
again, with a growing pause when it keeps crashing). Each process serves the public
listener and the admin listener (SO_REUSEPORT too, so any worker answers it; metrics are
aggregated over the workers, see :mod:`gateway.metrics`).

Signals: SIGHUP reloads routes.yaml (the supervisor passes it to every worker; each also
watches the file). SIGTERM or SIGINT drains: ``/readyz`` turns 503, the listeners stop
accepting, WebSockets are closed with 1001, in-flight requests get up to
``limits.drain_timeout`` seconds, and the process exits 0. uvloop is used when installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import __version__, reload
from .access_log import LineBatcher
from .admin import AdminState, create_admin_app
from .app import create_app
from .config import GatewayConfig
from .metrics import Metrics, enable_multiprocess, forget_process

__all__ = ("configure_logging", "serve")

logger = logging.getLogger("gateway")

_RESTART_PAUSE = (0.5, 30.0)  # seconds before a crashed worker is started again: first, at most


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
    server_log = logging.getLogger("aiohttp.server")
    server_log.filters.clear()
    server_log.addFilter(OneLineParseErrors())


class OneLineParseErrors(logging.Filter):
    """A malformed request (smuggling shapes, oversized lines, bad chunking) is the client's
    fault: log it as one warning line, not an error with a traceback that a client could use
    to flood the log. aiohttp has already answered it with a 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            reason = str(error.message).strip().splitlines()[0] if error.message else type(error).__name__
            record.msg, record.args = "refused a malformed request (%d): %s", (error.code, reason)
            record.exc_info = record.exc_text = None
        return True


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(config: GatewayConfig, *, host: str, port: int, workers: int = 1, drain_timeout: float | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code. ``drain_timeout`` defaults to
    ``limits.drain_timeout`` from the config."""
    drain = config.limits.drain_timeout if drain_timeout is None else drain_timeout
    if workers <= 1:
        return _run_worker(config, host, port, reuse_port=False, drain_timeout=drain)
    return _supervise(config, host, port, workers, drain)


def _run_worker(
    config: GatewayConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    drain_timeout: float,
    metrics_dir: str | None = None,
) -> int:
    source = Path(config.source)
    watch = source if source.is_file() else None
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(
            _serve(
                config,
                host,
                port,
                reuse_port=reuse_port,
                drain_timeout=drain_timeout,
                metrics_dir=metrics_dir,
                watch=watch,
            )
        )
    return 0


async def _serve(
    config: GatewayConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    drain_timeout: float,
    metrics_dir: str | None,
    watch: Path | None,
) -> None:
    app = create_app(config, metrics=Metrics(multiprocess_dir=metrics_dir), access_log=LineBatcher(sys.stdout.buffer))
    reloader = reload.install(app, watch) if watch is not None else None
    state = AdminState()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=drain_timeout)
    admin = web.AppRunner(create_admin_app(app, state), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await admin.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
        await site.start()
        if config.admin.enabled:
            await _start_admin(admin, config, reuse_port=reuse_port)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        reloads: set[asyncio.Task[bool]] = set()
        if reloader is not None:

            def on_sighup() -> None:
                task = loop.create_task(reloader.reload("SIGHUP"))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        _log_startup(config, runner, loop)
        for address in admin.addresses:
            logger.info("admin listening on http://%s:%s (/healthz /readyz /metrics /config, dashboard at /)",
                        address[0], address[1])  # fmt: skip
        await stop.wait()
        state.draining = True
        logger.info("shutting down: no new connections, draining in-flight requests (up to %gs)", drain_timeout)
    finally:
        await runner.cleanup()
        await admin.cleanup()
    logger.info("stopped")


async def _start_admin(admin: web.AppRunner, config: GatewayConfig, *, reuse_port: bool) -> None:
    host, port = config.admin.host, config.admin.port
    try:
        await web.TCPSite(admin, host, port, reuse_port=reuse_port or None).start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # uvloop words it its own way
        raise OSError(exc.errno, reason, f"{host}:{port} (admin listener)") from exc


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


def _supervise(config: GatewayConfig, host: str, port: int, workers: int, drain_timeout: float) -> int:
    """Fork ``workers`` processes on one port; restart any that dies; pass SIGTERM/SIGINT/SIGHUP on."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")  # prometheus-client multiprocess mode
    try:
        return _supervise_in(config, host, port, workers, drain_timeout, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise_in(
    config: GatewayConfig, host: str, port: int, workers: int, drain_timeout: float, metrics_dir: str
) -> int:
    stopping = False
    children: dict[int, int] = {}  # pid -> worker number
    crashes: dict[int, float] = {}  # worker number -> current restart pause

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop handles it: reload
            code = 1
            try:
                enable_multiprocess(metrics_dir)
                code = _run_worker(
                    config, host, port, reuse_port=True, drain_timeout=drain_timeout, metrics_dir=metrics_dir
                )
            except BaseException:
                logger.exception("worker %d failed", number)
            finally:
                os._exit(code)
        children[pid] = number
        logger.info("worker %d started (pid %d)", number, pid)

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
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
        forget_process(metrics_dir, pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed |= code != 0
            continue
        pause = crashes.get(number, _RESTART_PAUSE[0])
        crashes[number] = min(pause * 2, _RESTART_PAUSE[1])  # a worker that keeps dying must not spin us
        logger.error("worker %d (pid %d) exited with %s; starting it again in %gs", number, pid, _describe(code), pause)
        _sleep_unless_stopping(pause, lambda: stopping)
        if not stopping:
            start(number)
    logger.info("supervisor stopped")
    return 1 if failed else 0


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _sleep_unless_stopping(seconds: float, stopping: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stopping() and time.monotonic() < deadline:
        time.sleep(min(0.1, deadline - time.monotonic()))
