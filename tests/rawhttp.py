"""Raw HTTP/1.1 over a socket, for requests an HTTP client would tidy up first (``..``, ``//``)
or never send (trickled heads, stalled bodies)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def raw_request(
    port: int, target: str, *, method: str = "GET", headers: str = "", body: bytes = b""
) -> RawResponse:
    """Send one request with ``target`` exactly as given; read the whole response (Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{headers}"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    """One HTTP/1.x response from raw bytes (a chunked body is de-chunked)."""
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    parsed = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    pairs = [(k, v) for k, v in parsed]
    if any(k.lower() == "transfer-encoding" and "chunked" in v for k, v in pairs):
        rest = _dechunk(rest)
    return RawResponse(status, pairs, rest)


async def read_until_closed(reader: asyncio.StreamReader, seconds: float = 10.0) -> bytes:
    """Everything the peer sends until it closes the connection (a reset counts as closed);
    ``TimeoutError`` if it is still open after ``seconds``."""
    data = bytearray()
    async with asyncio.timeout(seconds):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return bytes(data)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


async def read_response(reader: asyncio.StreamReader, seconds: float = 10.0) -> RawResponse:
    """One response from a connection that stays open (keep-alive)."""
    return parse_response(await read_raw_response(reader, seconds))


async def read_raw_response(reader: asyncio.StreamReader, seconds: float = 10.0, *, head_only: bool = False) -> bytes:
    """One response from a connection that stays open, byte for byte: its head and its
    ``Content-Length`` or chunked body (``head_only``: the head alone, as for a HEAD)."""
    async with asyncio.timeout(seconds):
        head = await reader.readuntil(b"\r\n\r\n")
        if head_only:
            return head
        if re.search(rb"\r\nTransfer-Encoding: chunked\r\n", head, re.IGNORECASE):
            return head + await reader.readuntil(b"\r\n0\r\n\r\n")
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.IGNORECASE)
        return head + await reader.readexactly(int(length.group(1)) if length else 0)
