"""One relayed WebSocket, frame by frame (DESIGN §7; issue 8: bench/README.md, thirteenth session).

After both opening handshakes (:mod:`gateway.websocket`), bytes from each peer are split into
frames as they arrive, checked, and the complete ones written to the other peer as they came,
in one write for all those one read brought: client frames stay masked with the client's keys,
no message is assembled, decoded or copied. That is what nginx does after an upgrade, plus the
frame checks the limits need; it costs about two thirds of the CPU of relaying through aiohttp's
``receive()`` / ``send_frame()`` (a task wake-up and a message object per frame), which relays
no better and cannot be told to pass frames on.

What a frame is checked for, and what ends the relay (every end closes both sides, each with
a close frame and a closing handshake bounded by :data:`CLOSE_TIMEOUT`):

- RFC 6455 framing: reserved bits unset (no extension is negotiated), known opcodes, control
  frames final and at most 125 bytes, continuations only inside a fragmented message, frames
  from the client masked and from the upstream not, valid close payloads. A violation: 1002
  ``protocol error`` to the peer that broke it, the other side is told it went away.
- a peer's close frame is forwarded to the other side (code and reason), whose answer is awaited,
  then echoed back;
- a peer that vanishes (TCP reset or EOF, missed heartbeat pong): the other side gets 1001
  ``client went away`` or 1014 ``upstream connection lost``;
- a message over ``max_message`` (the sum of its frames, seen from each frame's head, before its
  payload is read): 1009 on both sides;
- more than ``messages_per_second`` messages from the client (text, binary, ping and pong all
  count, a fragmented message once; a token bucket holding one second's worth): 1008 on both sides;
- no text or binary frame either way for ``idle_timeout``: 1001 ``idle timeout``;
- :meth:`Relay.stop` (the token's expiry, shutdown): both sides get its code.

Nothing more from a side whose frames ended the relay is passed on: over the rate, its frames
are still read for its close frame; after a broken frame or a message too big it is not read again.
Once the closing handshake has begun nothing more is passed on either way, and a side that flow
control had stopped reading is read again, for its close frame.

Both sides also get an empty ping after ``ping_interval`` (up to one and a half of it) without
a frame from them; no frame within half of ``ping_interval`` after it counts as the peer
vanishing. An empty pong is passed on only when it answers an empty ping passed on the other
way: the answers to the gateway's own pings are nobody else's business.

Flow control: while the client's socket has more than :data:`HIGH_WATER` bytes unsent, the
upstream is not read (and the other way round, through the upstream protocol's
``pause_writing``), so a client that does not read holds up its upstream, not the gateway's memory.
Text is not checked for UTF-8 (each end does that for what it receives).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import NamedTuple, cast

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractStreamWriter

from .config import WebSocketConfig
from .ws_frames import CLOSE, CONTINUATION, PING, PONG, close_frame, frame, mask, read_close

__all__ = ("CLOSE_TIMEOUT", "HIGH_WATER", "Relay", "UpstreamSide")

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take before the connections are cut
HIGH_WATER = 256 * 1024  # bytes waiting to be sent to the client beyond which the upstream is not read
MAX_HEAD = 16 * 1024  # bytes the upstream's handshake response head may take


class How(enum.Enum):
    CLOSED = "closed"  # the source sent a close frame: forward it, then echo it
    LOST = "lost"  # the source is gone: tell the other side
    BROKE = "broke"  # the source broke the protocol: 1002 to it, the other side told it went away
    POLICY = "policy"  # the gateway ends it: close both sides with the same code


class End(NamedTuple):
    how: How
    from_client: bool
    code: int
    reason: str


class Peer:
    """One side of a relay: what it sent is checked and passed to the other side."""

    __slots__ = (
        "_admit",
        "_empty_pings",
        "_fragmented",
        "_message",
        "_need",
        "buffer",
        "client",
        "close_sent",
        "closed",
        "gone",
        "heard",
        "muted",
        "other",
        "quiet",
        "relay",
        "transport",
    )

    def __init__(self, relay: Relay, *, client: bool) -> None:
        self.relay = relay
        self.client = client  # the client: its frames are masked, and limited
        self.transport: asyncio.Transport | None = None
        self.other: Peer = self  # set once both exist
        self.buffer = bytearray()  # the start of a frame not complete yet
        self._need = 0  # bytes that frame needs in all
        self._message = 0  # payload bytes so far of a fragmented message in progress
        self._fragmented = False
        self._empty_pings = 0  # empty pings from this side passed on and not answered yet
        self._admit: Callable[[float], bool] | None = relay.admit if client else None
        self.heard = 0  # reads since the last heartbeat
        self.quiet = 0  # heartbeats in a row with nothing heard
        self.closed = False  # its close frame came (nothing from it is passed on after that)
        self.close_sent = False  # it was sent a close frame (nothing more may follow)
        self.muted = False  # what it sends is not passed on any more (it went over the rate)
        self.gone = False  # its connection is lost or closed

    # -- reading ---------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Pass on every complete frame at the front of the buffer and ``data``; keep the rest."""
        if self.closed:
            return
        self.heard += 1
        buffer = self.buffer
        chunk: bytes | bytearray = data
        if buffer:
            buffer += data
            if len(buffer) < self._need:
                return
            chunk = buffer
        size = len(chunk)
        self._need = 0
        at = start = 0  # frames [start, at) are to be passed on
        masked = 0x80 if self.client else 0
        relay = self.relay
        limit = relay.max_message
        now = relay.now()  # one clock read for every frame of this read
        data_seen = False
        end: End | None = None
        while size - at >= 2:
            b0, b1 = chunk[at], chunk[at + 1]
            opcode, length, head = b0 & 0x0F, b1 & 0x7F, 2
            if length == 126:
                if size - at < 4:
                    break
                length, head = (chunk[at + 2] << 8) | chunk[at + 3], 4
            elif length == 127:
                if size - at < 10:
                    break
                length, head = int.from_bytes(chunk[at + 2 : at + 10], "big"), 10
            if b0 & 0x70 or b1 & 0x80 != masked:
                end = self._broke("reserved bits set" if b0 & 0x70 else "frame masked wrongly")
                break
            if opcode >= CLOSE:
                if opcode > PONG or length > 125 or not b0 & 0x80:
                    end = self._broke("bad control frame")
                    break
            elif (opcode == CONTINUATION) != self._fragmented or opcode > 2:
                end = self._broke("unexpected continuation" if self._fragmented else "bad data frame")
                break
            elif self._message + length > limit:
                end = End(How.POLICY, self.client, WSCloseCode.MESSAGE_TOO_BIG, "message too big")
                break
            frame_end = at + head + (4 if masked else 0) + length
            if frame_end > size:
                self._need = frame_end - at
                break
            if opcode < CLOSE:
                data_seen = True
                if b0 & 0x80:  # a message's last frame
                    self._message, self._fragmented = 0, False
                    if self._admit is not None and not self._admit(now):
                        end = self._over_rate()
                        break
                else:
                    self._message += length
                    self._fragmented = True
            elif opcode == CLOSE:
                payload = bytes(chunk[frame_end - length : frame_end])
                if masked:
                    payload = mask(bytes(chunk[frame_end - length - 4 : frame_end - length]), payload)
                close = read_close(payload)
                self._pass(chunk, start, at)
                start = at = frame_end
                self.closed = True
                relay.closed(self)
                end = self._broke("bad close frame") if close is None else End(How.CLOSED, self.client, *close)
                break
            else:  # ping or pong
                if self._admit is not None and not self._admit(now):
                    end = self._over_rate()
                    break
                if length == 0 and not self._empty(opcode):
                    self._pass(chunk, start, at)  # all before it; the pong itself is swallowed
                    start = frame_end
            at = frame_end
        if data_seen:
            relay.last = now
        if end is None:
            self._pass(chunk, start, at)
            if chunk is buffer:
                del buffer[:at]
            elif at < size:
                buffer[:] = chunk[at:]
        else:
            self._pass(chunk, start, at)
            buffer.clear()
            self._stop_passing(end)
            relay.end(end)

    def _stop_passing(self, end: End) -> None:
        """After what this side sent ended the relay, nothing more of it is passed on: over the
        rate, its frames are still read for its close; after a broken frame or a message too big,
        where the next frame starts is unknown, so it is read no more (its answer is not awaited)."""
        if end.how is How.CLOSED:
            return
        if end.code == WSCloseCode.POLICY_VIOLATION:
            self.muted, self._admit = True, None
        else:
            self.closed = True
            self.relay.closed(self)

    def _pass(self, chunk: bytes | bytearray, start: int, end: int) -> None:
        if end > start and not self.muted:
            whole = start == 0 and end == len(chunk) and type(chunk) is bytes
            self.other.send(chunk if whole else bytes(chunk[start:end]))  # type: ignore[arg-type]

    def _empty(self, opcode: int) -> bool:
        """An empty ping from this side is passed on (and its pong awaited from the other); an
        empty pong only when it answers one of those."""
        if opcode == PING:
            self._empty_pings += 1
            return True
        other = self.other
        if other._empty_pings == 0:
            return False  # the answer to the gateway's own heartbeat ping
        other._empty_pings -= 1
        return True

    def _broke(self, what: str) -> End:
        logger.info("WebSocket %s broke the protocol: %s", "client" if self.client else "upstream", what)
        return End(How.BROKE, self.client, WSCloseCode.PROTOCOL_ERROR, "protocol error")

    def _over_rate(self) -> End:
        return End(How.POLICY, True, WSCloseCode.POLICY_VIOLATION, "message rate exceeded")

    def lost(self) -> None:
        """Its connection is gone (EOF, reset, or closed by us)."""
        if self.gone:
            return
        self.gone = True
        self.relay.closed(self)
        self.relay.end(End(How.LOST, self.client, *self.relay.lost_code(self.client)))

    # -- writing ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.gone or self.close_sent or transport.is_closing():
            return
        transport.write(data)
        if self.client and transport.get_write_buffer_size() > HIGH_WATER:
            self.relay.client_backed_up()

    def send_close(self, code: int, reason: str) -> None:
        if not self.close_sent:
            self.send(close_frame(code, reason, masked=not self.client))
            self.close_sent = True

    def ping(self) -> None:
        self.send(frame(PING, b"", masked=not self.client))


class ClientFeed:
    """What aiohttp's connection hands the client's bytes to once the client is accepted
    (``RequestHandler.set_parser``, as aiohttp's own WebSocket reader is installed)."""

    __slots__ = ("_peer",)

    def __init__(self, peer: Peer) -> None:
        self._peer = peer

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._peer.received(data)
        return False, b""

    def feed_eof(self) -> None:
        self._peer.lost()


class UpstreamSide(asyncio.Protocol):
    """The upstream connection: its handshake response head first, then frames for its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None  # set when the relay starts
        self._head = bytearray()  # the response head, then what came after it until the relay starts
        self._answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not an asyncio.Transport subclass

    async def response_head(self) -> bytes:
        """The handshake response head, without its blank line (ConnectionError if it never came)."""
        return await self._answered

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.received(data)
            return
        self._head += data
        if self._answered.done():
            return
        end = self._head.find(b"\r\n\r\n")
        if end >= 0:
            self._answered.set_result(bytes(self._head[:end]))
            del self._head[: end + 4]
            assert self.transport is not None
            self.transport.pause_reading()  # until the client is accepted and the relay starts
        elif len(self._head) > MAX_HEAD:
            self._answered.set_exception(ConnectionError(f"response head over {MAX_HEAD} bytes"))

    def start(self, peer: Peer) -> None:
        """Relay from now on: what came after the head first."""
        self.peer = peer
        early, self._head = bytes(self._head), bytearray()
        if early:
            peer.received(early)
        if self._lost:
            peer.lost()
        elif self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self._answered.done():
            self._answered.set_exception(ConnectionError(f"connection closed before the response head: {exc}"))
        if self.peer is not None:
            self.peer.lost()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.relay.pause_client()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.relay.resume_client()


class Relay:
    """Both peers, the timers and the closing handshake of one relayed connection."""

    def __init__(
        self,
        request: web.Request,
        upstream: UpstreamSide,
        config: WebSocketConfig,
    ) -> None:
        self._request = request
        self._upstream_side = upstream
        self._config = config
        self.max_message = config.max_message
        self._loop = loop = asyncio.get_running_loop()
        self.now = loop.time
        self._ended: asyncio.Future[End] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._replies: dict[bool, asyncio.Future[None]] = {True: loop.create_future(), False: loop.create_future()}
        self.last = loop.time()  # of the last text/binary frame, either way
        self._tokens = float(config.messages_per_second)  # the client's message budget, as counted
        self._tokens_at = self.last
        self._timers: list[asyncio.TimerHandle] = []
        self._writer: AbstractStreamWriter | None = None
        self._draining: asyncio.Task[None] | None = None
        self._closing = False  # the closing handshake has begun
        self.client = Peer(self, client=True)
        self.upstream = Peer(self, client=False)
        self.client.other, self.upstream.other = self.upstream, self.client
        self.client.transport = request.transport
        self.upstream.transport = upstream.transport

    # -- the life of it -------------------------------------------------------------------------

    def stop(self, code: int, reason: str) -> None:
        """End the relay from outside (shutdown, expiry): both sides get ``code``."""
        self.end(End(How.POLICY, False, code, reason))

    def end(self, end: End) -> None:
        if not self._ended.done():
            self._ended.set_result(end)

    async def run(self, writer: AbstractStreamWriter, expires_in: float | None) -> str | None:
        """Relay until either side goes, then close both; say why, when the gateway ended it."""
        loop, config = self._loop, self._config
        self._writer = writer
        self._timers = [
            loop.call_at(self.last + config.idle_timeout, self._check_idle),
            loop.call_at(self.last + config.ping_interval / 2, self._heartbeat),
        ]
        if expires_in is not None:
            self._timers.append(loop.call_later(expires_in, self.stop, WSCloseCode.POLICY_VIOLATION, "token expired"))
        try:
            self._request.protocol.set_parser(ClientFeed(self.client))  # type: ignore[arg-type]
            self._upstream_side.start(self.upstream)
            end = await self._ended
            await self._close(end)
            return f"websocket closed {end.code}: {end.reason}" if end.how is How.POLICY else None
        except asyncio.CancelledError:  # aiohttp gave up on the client (gone, or a shutdown out of time)
            self.upstream.send_close(WSCloseCode.GOING_AWAY, "client went away")
            raise
        finally:
            for timer in self._timers:
                timer.cancel()
            if self._draining is not None:
                self._draining.cancel()
            self._hang_up()
            self.finished.set_result(None)

    async def _close(self, end: End) -> None:
        client, upstream = self.client, self.upstream
        # From here on the peers' close frames are awaited, not their messages: what either sends is
        # no longer passed on, and both are read again if flow control had paused one.
        self._closing = True  # and flow control stops pausing either
        if self._draining is not None:
            self._draining.cancel()
        for peer in (client, upstream):
            peer.muted = True
            if peer.transport is not None and not peer.transport.is_closing():
                peer.transport.resume_reading()
        source, other = (client, upstream) if end.from_client else (upstream, client)
        if end.how is How.POLICY:
            client.send_close(end.code, end.reason)
            upstream.send_close(end.code, end.reason)
            await self._replied(client, upstream)
        elif end.how is How.BROKE:
            source.send_close(end.code, end.reason)
            other.send_close(*self.lost_code(end.from_client))
            await self._replied(client, upstream)
        else:
            code = 1000 if end.code == 1005 else end.code  # a close without a code is passed on as 1000
            other.send_close(code, end.reason)
            await self._replied(other)
            if end.how is How.CLOSED:
                source.send_close(code, end.reason)  # the echo

    async def _replied(self, *peers: Peer) -> None:
        """Until each of ``peers`` sent its close frame or went, within CLOSE_TIMEOUT."""
        waiting = [self._replies[peer.client] for peer in peers if not (peer.closed or peer.gone)]
        if waiting:
            await asyncio.wait(waiting, timeout=CLOSE_TIMEOUT)

    def closed(self, peer: Peer) -> None:
        """``peer`` sent its close frame or went: its answer is in."""
        reply = self._replies[peer.client]
        if not reply.done():
            reply.set_result(None)

    def _hang_up(self) -> None:
        """Close both connections; one with bytes still unsent after the closing handshake (a
        client that does not read) is cut off."""
        for peer in (self.client, self.upstream):
            transport = peer.transport
            peer.gone = True
            if transport is None or transport.is_closing():
                continue
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    @staticmethod
    def lost_code(from_client: bool) -> tuple[int, str]:
        if from_client:
            return WSCloseCode.GOING_AWAY, "client went away"
        return WSCloseCode.BAD_GATEWAY, "upstream connection lost"

    # -- limits and timers ------------------------------------------------------------------

    def admit(self, now: float) -> bool:
        """One message from the client against the token bucket; False when it is over the rate."""
        rate = self._config.messages_per_second
        tokens = self._tokens + (now - self._tokens_at) * rate
        if tokens > rate:
            tokens = rate
        if tokens < 1.0:
            return False
        self._tokens, self._tokens_at = tokens - 1.0, now
        return True

    def _heartbeat(self) -> None:
        """Every half ``ping_interval``: ping a side silent for two beats; a side still silent
        one beat after its ping has vanished."""
        for peer in (self.client, self.upstream):
            if peer.heard:
                peer.heard = peer.quiet = 0
                continue
            peer.quiet += 1
            if peer.quiet == 2:
                peer.ping()
            elif peer.quiet > 2:
                logger.info(
                    "WebSocket %s sent no frame within %gs of a ping",
                    "client" if peer.client else "upstream",
                    self._config.ping_interval / 2,
                )
                peer.lost()
        self._timers[1] = self._loop.call_at(self.now() + self._config.ping_interval / 2, self._heartbeat)

    def _check_idle(self) -> None:
        deadline = self.last + self._config.idle_timeout
        if self.now() >= deadline:
            self.stop(WSCloseCode.GOING_AWAY, "idle timeout")
        else:
            self._timers[0] = self._loop.call_at(deadline, self._check_idle)

    # -- flow control -------------------------------------------------------------------------

    def client_backed_up(self) -> None:
        """The client's socket holds more than HIGH_WATER unsent: stop reading the upstream until it drains."""
        if self._draining is not None or self._writer is None or self._closing:
            return
        upstream = self.upstream.transport
        if upstream is not None and not upstream.is_closing():
            upstream.pause_reading()
        self._draining = self._loop.create_task(self._drain_client(self._writer))

    async def _drain_client(self, writer: AbstractStreamWriter) -> None:
        try:
            await writer.drain()
        except ConnectionError:
            return
        finally:
            self._draining = None
        upstream = self.upstream.transport
        if upstream is not None and not upstream.is_closing():
            upstream.resume_reading()

    def pause_client(self) -> None:
        transport = self.client.transport
        if transport is not None and not transport.is_closing() and not self._closing:
            transport.pause_reading()

    def resume_client(self) -> None:
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
