"""RFC 6455 on the wire, for the WebSocket benchmark's own load client and echo backend.

The relay benchmark's load side (``ws_client.py rtt`` and ``ws_echo.py``) shares one core, and
on aiohttp it saturated that core before any relay did (bench/README.md, twelfth and thirteenth
sessions): round trips a second then measured the load side. These helpers let both work on
asyncio Protocols instead, a message costing them a read and a write, no task or future. Only
what the benchmark needs on top of the gateway's own RFC 6455 helpers (:mod:`gateway.ws_frames`:
keys, frames built masked or not, masking): the opening handshake's heads and whole frames split off
a buffer, unmasked. No extensions, no fragmentation on the sending side.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.ws_frames import BINARY, CLOSE, PING, PONG, TEXT, accept_key, frame, mask, new_key

__all__ = (
    "BINARY",
    "CLOSE",
    "MAX_HEAD",
    "PING",
    "PONG",
    "TEXT",
    "Frame",
    "accept_key",
    "frame",
    "header_fields",
    "new_key",
    "split_frames",
    "upgrade_request",
)

MAX_HEAD = 16 * 1024  # bytes an HTTP head may take before the peer is dropped


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes  # unmasked


def upgrade_request(host: str, port: int, path: str, key: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def header_fields(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The first line of an HTTP head and its fields (names lower-cased; a repeated one: the last)."""
    first, *lines = head.split(b"\r\n")
    fields = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().lower()] = value.strip()
    return first, fields


def split_frames(buffer: bytearray) -> list[Frame]:
    """Take every whole frame off the front of ``buffer`` (a partial one stays), unmasked."""
    frames = []
    at, size = 0, len(buffer)
    while size - at >= 2:
        b0, b1 = buffer[at], buffer[at + 1]
        length, head = b1 & 0x7F, 2
        if length == 126:
            if size - at < 4:
                break
            length, head = int.from_bytes(buffer[at + 2 : at + 4], "big"), 4
        elif length == 127:
            if size - at < 10:
                break
            length, head = int.from_bytes(buffer[at + 2 : at + 10], "big"), 10
        key = None
        if b1 & 0x80:
            key, head = bytes(buffer[at + head : at + head + 4]), head + 4
        end = at + head + length
        if end > size:
            break
        payload = bytes(buffer[at + head : end])
        frames.append(Frame(bool(b0 & 0x80), b0 & 0x0F, mask(key, payload) if key else payload))
        at = end
    del buffer[:at]
    return frames
