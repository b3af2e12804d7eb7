"""Running the gateway as a process: sockets, signals, workers, drain (DESIGN §2, §8).

:func:`serve` runs one process, or with ``workers > 1`` supervises that many forked
workers sharing the port through SO_REUSEPORT (a crashed worker is logged and started
again, with a growing pause when it keeps crashing). Each process serves the public
listener and the admin listener (SO_REUSEPORT too, so any worker answers it; metrics are
aggregated over the workers, see :mod:`gateway.metrics`).

Connections are served by :class:`GatewayProtocol` (through :class:`GatewayRunner`):
aiohttp's HTTP/1.1 handler plus ``limits.header_timeout`` and ``limits.body_timeout`` for
slow clients, and 414/431 problems for oversized request lines and headers.

Signals: SIGHUP reloads routes.yaml (the supervisor passes it to every worker; each also
watches the file). SIGTERM or SIGINT drains: ``/readyz`` turns 503, the listeners stop
accepting, WebSockets are closed with 1001, in-flight requests get up to
``limits.drain_timeout`` seconds, and the process exits 0. uvloop is used when installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from middleware.problem import PROBLEM_JSON, Problem, problem_body, problem_response
from middleware.request_id import new_request_id

from . import __version__, reload
from .access_log import LineBatcher
from .admin import AdminState, create_admin_app
from .app import CONFIG, HIT_LANE, ROUTES, create_app, request_handler
from .config import GatewayConfig, Limits
from .hit_lane import HitLane
from .metrics import Metrics, enable_multiprocess, forget_process
from .response_writer import write_whole

__all__ = ("GatewayProtocol", "GatewayRunner", "configure_logging", "serve")

logger = logging.getLogger("gateway")

# Objects allocated, less those freed, between two collections of the youngest generation of
# Python's cycle collector (its default is 700). A proxied request allocates thousands of
# objects that reference counting frees; at 700, the collector walked the survivors of the
# requests in flight again and again: 5% of the full chain's instructions (bench/README.md).
# Higher saves a little more, but the soak's RSS then grew steadily (5,000: +14 MiB and 10,000:
# +33 MiB per 10 minutes, against +0.03 MiB at 2,000 and +0.85 MiB at Python's default).
GC_YOUNG_THRESHOLD = 2_000
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


# -- the HTTP protocol: slow clients and oversized heads ---------------------------------------

_IDLE, _HEAD, _BODY = 0, 1, 2  # what a connection is waiting for from its client
BODY_MIN_RATE = 500  # bytes a second a request body must average after its first body_timeout (Apache's)


class GatewayProtocol(RequestHandler):
    """aiohttp's HTTP/1.1 connection handler with the two limits it lacks, and honest statuses.

    - **Header timeout** (``limits.header_timeout``): from the connection's start, or from
      the first byte of a later request on a keep-alive connection, the client has that long
      to complete its request line and headers. Then it gets a 408 problem (or, when it never
      sent a byte, a plain close) and the connection is closed. Idle time between
      requests is aiohttp's keep-alive timeout, not this one.
    - **Body timeout** (``limits.body_timeout``): the longest pause between two reads of a
      request body; and the whole body gets ``body_timeout`` plus one second per
      ``BODY_MIN_RATE`` bytes received (Apache's mod_reqtimeout ``MinRate`` rule), so a body
      trickled a byte at a time is cut too. Time the gateway itself holds the client back (reading
      paused while the upstream is slow to take the body) does not count. Then the
      handler's read fails, the client gets a 408 if nothing of the response was sent yet,
      and the connection is closed, so the upstream never sees a complete body.
    - An oversized request line is a **414**, an oversized header field or too many header
      fields a **431**, any other malformed request a 400; all problem+json and one log line.
    - **The hit lane** (:mod:`gateway.hit_lane`): a request aiohttp's parser has just read on an
      idle connection is offered to the lane before aiohttp's connection loop is woken for it;
      the lane writes a fresh cache hit itself, or leaves the request to aiohttp untouched.

    One timer handle per connection: moving a deadline later only stores a float, and the
    handle reschedules itself when it fires early (aiohttp's keep-alive timer does the same),
    so a busy keep-alive connection costs one ``call_at`` per ``header_timeout``, not one
    per request.
    """

    __slots__ = (
        "_body",
        "_body_timeout",
        "_credit",
        "_deadline",
        "_head_bytes",
        "_header_timeout",
        "_lane",
        "_limits",
        "_phase",
        "_scheme",
        "_timer",
        "_timer_at",
    )  # fmt: skip

    def __init__(
        self, manager: web.Server, *, limits: Callable[[], Limits], lane: HitLane | None = None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._lane = lane
        self._scheme = "http"
        self._header_timeout = self._body_timeout = 0.0  # set per connection, in connection_made
        self._phase = _IDLE
        self._deadline = 0.0  # when the current phase times out
        self._credit = 0.0  # _BODY: when the body falls below BODY_MIN_RATE on average
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the handle fires
        self._head_bytes = False  # some bytes of the awaited head have arrived
        self._body: StreamReader | None = None  # the payload being received in _BODY

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits()  # read per connection: a reload applies to new connections
        self._header_timeout, self._body_timeout = limits.header_timeout, limits.body_timeout
        super().connection_made(transport)
        self._scheme = "https" if transport.get_extra_info("sslcontext") else "http"  # as aiohttp's request.scheme
        self._head_bytes = False
        self._expect(_HEAD, self._header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._phase = _IDLE
        self._body = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._payload_parser is not None or self._close or self._force_close:
            super().data_received(data)  # a WebSocket (its own timeouts), or a connection on its way out
            return
        phase = self._phase
        if phase == _IDLE:
            # the header timeout starts now, but most heads arrive whole: the timer is armed
            # below only when this data left the head incomplete
            self._head_bytes = True
            self._phase = _HEAD
            self._deadline = self._loop.time() + self._header_timeout
        elif phase == _HEAD:
            self._head_bytes = True
        else:
            now = self._loop.time()
            self._credit += len(data) / BODY_MIN_RATE
            self._deadline = min(now + self._body_timeout, self._credit)
        count = self._request_count
        waiter = self._waiter
        if waiter is not None:  # aiohttp's connection loop is parked, waiting for a request
            idle = not waiter.done()
        else:  # busy with a request, or not started yet: only before the first request is it idle
            idle = count == 0
        if idle and not self._messages and self._lane is not None and self._lane.open:
            self._offer_to_lane(data, waiter)
        else:
            super().data_received(data)
        if self._request_count != count:  # a head is complete: now its body, if any is still to come
            body = self._messages[-1][1] if self._messages else None
            if isinstance(body, StreamReader) and not body.is_eof():
                self._body = body
                self._expect(_BODY, self._body_timeout)
                self._credit = self._deadline
            else:
                self._idle()
        elif phase == _BODY and self._body is not None and self._body.is_eof():
            self._idle()
        elif self._phase == _HEAD and self.transport is not None:
            self._arm(self._deadline)

    def _offer_to_lane(self, data: bytes, waiter: asyncio.Future[None] | None) -> None:
        """aiohttp's data_received, with a request that completes in ``data`` offered to the hit
        lane (:mod:`gateway.hit_lane`) before aiohttp's connection loop, idle (parked on
        ``waiter``, or not started yet), is woken for it. The lane answers it or leaves it all
        to aiohttp."""
        self._waiter = None  # what aiohttp sets to wake its loop: held back while the lane looks
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        messages = self._messages
        if not messages:
            return
        if len(messages) == 1 and self._answered_by_lane(*messages[0]):
            messages.popleft()
            return
        if waiter is not None and not waiter.done():  # (a loop not started yet finds the request itself)
            waiter.set_result(None)

    def _answered_by_lane(self, message: object, payload: object) -> bool:
        transport, lane, manager = self.transport, self._lane, self._manager
        if payload is not EMPTY_PAYLOAD or not isinstance(message, RawRequestMessage) or self._upgraded:
            return False
        if transport is None or lane is None or manager is None or transport.get_write_buffer_size():
            return False  # a client that is not reading its answers gets them through aiohttp's flow control
        peer = self.peername
        try:
            response = lane.answer(message, str(peer[0]) if isinstance(peer, tuple) else peer, self._scheme)
        except Exception:  # a bug in the lane must cost the request nothing: the full chain answers it
            logger.exception("the hit lane failed on %s %s; the request goes through the full chain",
                             message.method, message.path.partition("?")[0])  # fmt: skip
            return False
        if response is None:
            return False
        transport.write(response)
        # what aiohttp's connection loop does after a response: a parser slot freed, the request
        # counted, and the keep-alive timer (re)started
        if self._parser is not None:
            self._parser.message_consumed()
        manager.requests_count += 1
        self._keepalive = True
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
        return True

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, then the request and response are emptied: aiohttp's connection loop keeps
        its last request and response referenced until the next request comes, so an idle
        keep-alive connection would hold every header of both (about 2.5 KiB a connection,
        measured with tracemalloc over 1,000 idle connections; more with large cookies). The
        attributes are aiohttp 3.14's; tests/gateway/test_idle_connections.py notices a change.

        A plain ``web.Response`` (most answers) is written by
        :func:`~gateway.response_writer.write_whole` when it can, in one step, instead of
        through aiohttp's response machinery; the same bytes either way."""
        try:
            if type(resp) is web.Response and not self._upgraded:  # most answers: written in one step
                try:
                    written = await write_whole(self, request, resp)
                except ConnectionError:  # the client went away: as aiohttp's finish_response
                    self.log_access(request, resp, start_time)
                    return resp, True
                if written:
                    request._finish()
                    self.log_access(request, resp, start_time)
                    return resp, False
            return await super().finish_response(request, resp, start_time)
        finally:
            request._state.clear()  # the middlewares' per-request state (outcome, ids, pending headers)
            request._cache.clear()  # reified properties: the URL, parsed headers
            resp._headers.clear()  # sent already; aiohttp reads only resp.keep_alive after this

    def _idle(self) -> None:
        """Nothing awaited from the client: no timer held while the connection idles (aiohttp's
        keep-alive timer covers that), which keeps an idle connection's memory small."""
        self._phase, self._body = _IDLE, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expect(self, phase: int, timeout: float) -> None:
        self._phase = phase
        self._deadline = self._loop.time() + timeout
        self._arm(self._deadline)

    def _arm(self, deadline: float) -> None:
        """Have the timer fire by ``deadline`` (it keeps a later deadline to itself, see _on_timer)."""
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase == _IDLE or self.transport is None:
            return
        now = self._loop.time()
        if self._phase == _BODY and (self._reading_paused or self._buffer_paused):
            # we are the slow one, not the client: none of this is its time
            self._credit = max(self._credit, now + self._body_timeout)
            self._deadline = now + self._body_timeout
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            self._timer_at = self._deadline
        elif self._phase == _HEAD:
            self._head_timed_out()
        else:
            self._body_timed_out()

    def _head_timed_out(self) -> None:
        self._phase = _IDLE
        if self._request_in_progress or self._messages:
            # A pipelined head trickles in behind a request still being answered: finish that
            # response, then close, rather than write into the middle of it.
            logger.warning("client %s: no complete request headers within %gs; closing after the current response",
                           self._peer(), self._header_timeout)  # fmt: skip
            self.close()
            return
        if self._head_bytes:
            logger.warning(
                "client %s: no complete request headers within %gs (408)", self._peer(), self._header_timeout
            )
            self._send_raw_problem(408, f"the request headers did not arrive within {self._header_timeout:g}s")
        else:  # an idle connection that never sent a byte: close it quietly, as nginx does
            logger.debug("client %s: idle for %gs without a request; closing", self._peer(), self._header_timeout)
        self.force_close()

    def _body_timed_out(self) -> None:
        self._phase = _IDLE
        body, self._body = self._body, None
        request = self._current_request
        detail = (
            f"the request body stalled or came too slowly (more than {self._body_timeout:g}s without data, "
            f"or under {BODY_MIN_RATE} bytes/s)"
        )
        logger.warning("client %s: %s (408)", self._peer(), detail)
        if request is not None and request.writer.output_size == 0:
            self._send_raw_problem(408, detail)
        if body is not None:  # the handler's read fails; a partial body is never passed on as complete
            body.set_exception(web.HTTPRequestTimeout(text="request body timed out"))
        self.force_close()

    def _send_raw_problem(self, status: int, detail: str) -> None:
        """A problem written straight to the socket: nothing else is writing on this connection."""
        if self.transport is None:
            return
        request_id = new_request_id()
        problem = Problem(status, detail)
        body = problem_body(problem, request_id)
        head = (
            f"HTTP/1.1 {status} {problem.title}\r\nContent-Type: {PROBLEM_JSON}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Request-ID: {request_id}\r\n"
            "Connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)

    def _peer(self) -> str:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, tuple) else str(peer)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp's parser refused: 414, 431 or 400 as problem+json, one log line."""
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        status, detail = self._classify(exc)
        if isinstance(exc, BadHttpMethod) and self._request_count == 1:
            logger.debug("client %s sent something that is not HTTP (TLS on a plain port?)", self._peer())
        else:
            logger.warning("refused a malformed request from %s (%d): %s", self._peer(), status, detail)
        request_id = new_request_id()
        response = problem_response(Problem(status, detail), request_id)
        response.headers["X-Request-ID"] = request_id
        response.force_close()
        return response

    def _classify(self, exc: HttpProcessingError) -> tuple[int, str]:
        if isinstance(exc, LineTooLong):
            if exc.args[1:2] == (self.max_line_size,):
                return 414, f"the request line is longer than {self.max_line_size} bytes"
            return 431, f"a header field is longer than {self.max_field_size} bytes"
        reason = str(exc.message).strip().splitlines()[0][:200] if exc.message else type(exc).__name__
        if reason.startswith("Too many headers"):
            return 431, f"more than {self.max_headers} header fields"
        return 400, f"malformed request: {reason}"


class GatewayRequest(web.Request):
    """aiohttp's request, with a ``get`` that does not raise and catch a ``KeyError`` when the key
    is absent, as ``Mapping.get`` does (about 1 µs each, and the chain asks for several absent
    keys per request: claims on an anonymous route, the cache's body tap, pending headers)."""

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)


class _GatewayServer(web.Server):
    """aiohttp's connection factory, making :class:`GatewayProtocol` connections, whose requests
    are :class:`GatewayRequest` objects."""

    def __init__(
        self, base: web.Server, app: web.Application, limits: Callable[[], Limits], lane: HitLane | None
    ) -> None:
        super().__init__(
            request_handler(app) or base.request_handler,  # made here, once the app is frozen
            request_factory=functools.partial(app._make_request, _cls=GatewayRequest),
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self._limits = limits
        self._lane = lane

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, loop=self._loop, limits=self._limits, lane=self._lane, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are :class:`GatewayProtocol`s, with the live limits of
    the gateway app it runs (after a reload, new connections get the new timeouts)."""

    async def _make_server(self) -> web.Server:
        app = self.app
        limits = functools.partial(current_limits, app)
        return _GatewayServer(await super()._make_server(), app, limits, app.get(HIT_LANE))


def current_limits(app: web.Application) -> Limits:
    """The ``limits`` section in force: the last config loaded, else the startup one."""
    config = app[ROUTES].config
    return (config if config is not None else app[CONFIG]).limits


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
    runner = GatewayRunner(app, access_log=None, handle_signals=False, shutdown_timeout=drain_timeout)
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
        tune_gc()
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


def tune_gc() -> None:
    """Once serving: what startup built (modules, config, app) is kept out of every later
    collection (``gc.freeze``), and the youngest generation is collected less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


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
