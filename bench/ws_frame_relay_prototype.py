"""A frame-level WebSocket relay on uvloop + asyncio Protocols (experiment, no aiohttp).

For each client connection: read the HTTP/1.1 upgrade request head, connect to the
upstream, send it the same upgrade (same path, Host rewritten, the client's
Sec-WebSocket-Key/Version/Protocol forwarded), and pass the upstream's 101 head back
unchanged. After that each direction parses RFC 6455 frame headers only to find frame
boundaries and opcodes; complete frames are written to the other side byte for byte
(client frames stay masked), partial frames are buffered. Complete frames found in one
``data_received`` call are written with a single ``transport.write``.

A non-upgrade request (e.g. GET /ready) is answered ``200 ok`` and closed.

    python bench/ws_frame_relay_prototype.py --upstream 127.0.0.1:19200 --port 19204

Not part of `make bench` and not the gateway: the measure of what a frame-level relay could
save (bench/README.md, twelfth session). It has no limits (one huge frame is held whole).
"""

from __future__ import annotations

import argparse
import asyncio

HIGH_WATER = 256 * 1024  # sink write buffer above this: pause reading the source
LOW_WATER = 64 * 1024
VERBOSE = False  # --verbose: log each relayed connection's frame counts when it ends
CLOSE_GRACE = 1.0  # seconds to wait for the other side's close frame
MAX_HEAD = 16 * 1024
READY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
BAD = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
FORWARDED = (b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-protocol")


class Relay:
    """The state one relayed WebSocket shares between its two protocols."""

    __slots__ = ("closed", "closes", "last_activity", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last_activity = loop.time()
        self.closes = 0  # close frames forwarded so far (either direction)
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False


class FramePump(asyncio.Protocol):
    """One side of the relay: frames read here are written to ``peer``'s transport."""

    transport: asyncio.Transport | None = None
    peer: FramePump | None = None
    relay: Relay | None = None
    framing = False  # True once the handshake is done and bytes are WebSocket frames

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = 0  # bytes the buffered partial frame needs before it is complete (0: unknown)
        self.data_frames = 0
        self.sent_close = False  # a close frame from this side was forwarded

    # -- frames --------------------------------------------------------------------

    def frames(self, data: bytes | bytearray) -> None:
        """Forward every complete frame at the front of ``self.buf + data``; keep the rest."""
        relay = self.relay
        relay.last_activity = relay.loop.time()
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return
            data = buf
        self.need = 0
        n = len(data)
        pos = 0
        close_seen = False
        count = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                head += 4
            end = pos + head + length
            if end > n:
                self.need = end - pos
                break
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2 or (opcode == 0 and b0 & 0x80):
                count += 1
            elif opcode == 8:
                close_seen = True
            pos = end
        self.data_frames += count
        if pos:
            sink = self.peer.transport
            if pos == n:
                sink.write(bytes(data) if data is buf else data)
                if buf:
                    buf.clear()
            else:
                sink.write(bytes(data[:pos]))
                if data is buf:
                    del buf[:pos]
                else:
                    buf += data[pos:]
            if close_seen:
                self.forwarded_close()
        elif data is not buf:
            buf += data

    def forwarded_close(self) -> None:
        if self.sent_close:
            return
        self.sent_close = True
        relay = self.relay
        relay.closes += 1
        if self.peer.sent_close:  # both close frames have crossed: done
            self.shutdown()
        elif relay.timer is None:
            relay.timer = relay.loop.call_later(CLOSE_GRACE, self.shutdown)

    # -- the handshake's head ----------------------------------------------------------

    def head_end(self) -> int | None:
        """Where the HTTP head buffered in ``buf`` ends (its blank line), or None while it has not
        all come; a head over MAX_HEAD ends the relay."""
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            return end
        if len(self.buf) > MAX_HEAD:
            self.shutdown()
        return None

    # -- transport plumbing ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def shutdown(self) -> None:
        relay = self.relay
        if relay is not None:
            if relay.closed:
                return
            relay.closed = True
            if relay.timer is not None:
                relay.timer.cancel()
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()  # flushes what is buffered, then closes

    def connection_lost(self, exc: Exception | None) -> None:
        if VERBOSE and isinstance(self, Client) and self.relay is not None:
            upstream_frames = self.peer.data_frames if self.peer is not None else 0
            print(f"closed: data frames client->upstream {self.data_frames}, upstream->client {upstream_frames}, "
                  f"close frames forwarded {self.relay.closes}", flush=True)  # fmt: skip
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()
        if self.relay is not None and self.relay.timer is not None:
            self.relay.timer.cancel()

    def eof_received(self) -> bool:
        self.shutdown()
        return False

    def pause_writing(self) -> None:  # our write buffer passed HIGH_WATER: stop reading the peer
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class Upstream(FramePump):
    """The relay's connection to the upstream server."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.peer = client
        self.relay = client.relay
        self.raw = False  # the upstream did not answer 101: pass bytes through unparsed

    def data_received(self, data: bytes) -> None:
        if self.framing:
            self.frames(data)
            return
        if self.raw:
            self.peer.transport.write(data)
            return
        self.buf += data
        end = self.head_end()
        if end is None:
            return
        head, rest = bytes(self.buf[: end + 4]), bytes(self.buf[end + 4 :])
        self.buf.clear()
        client = self.peer
        client.transport.write(head)  # the 101 exactly as the upstream sent it
        if not head.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
            self.raw = True
            if rest:
                client.transport.write(rest)
            return
        self.framing = client.framing = True
        if rest:
            self.frames(rest)
        if client.buf:  # frames the client sent before the 101 arrived
            early = bytes(client.buf)
            client.buf.clear()
            client.frames(early)


class Client(FramePump):
    """A connection accepted from a WebSocket client."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.head_done = False

    def data_received(self, data: bytes) -> None:
        if self.framing:
            self.frames(data)
            return
        self.buf += data
        if self.head_done:  # waiting for the upstream's 101: keep early frames
            return
        end = self.head_end()
        if end is None:
            return
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        self.head_done = True
        self.handshake(head)

    def handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or parts[0] != b"GET" or headers.get(b"upgrade", b"").lower() != b"websocket":
            self.transport.write(READY)  # readiness probe (or anything not an upgrade)
            self.transport.close()
            return
        host, port = self.upstream
        out = [b"GET " + parts[1] + b" HTTP/1.1", b"Host: %s:%d" % (host.encode(), port),
               b"Upgrade: websocket", b"Connection: Upgrade"]  # fmt: skip
        out += [name + b": " + headers[name] for name in FORWARDED if name in headers]
        request = b"\r\n".join(out) + b"\r\n\r\n"
        self.relay = Relay(asyncio.get_running_loop())
        self.transport.pause_reading()  # nothing to do with client bytes until the upstream answers
        asyncio.get_running_loop().create_task(self.connect(request))

    async def connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(self), *self.upstream)
        except OSError:
            if not self.transport.is_closing():
                self.transport.write(BAD)
                self.transport.close()
            return
        if self.transport.is_closing():  # the client left meanwhile
            upstream.transport.close()
            return
        self.peer = upstream
        upstream.transport.write(request)
        self.transport.resume_reading()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default="127.0.0.1:19200", help="host:port (an http:// prefix is ignored)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=19204)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    host, _, port = args.upstream.removeprefix("http://").rstrip("/").rpartition(":")
    upstream = (host, int(port))

    import uvloop

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Client(upstream), args.host, args.port, backlog=4096)
        print(f"frame relay on {args.host}:{args.port} -> {host}:{port} (loop: {type(loop).__module__})", flush=True)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
