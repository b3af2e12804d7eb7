"""RFC 6455 on the wire, for the WebSocket benchmark's own load client and echo backend.

The relay benchmark's load side (``ws_client.py rtt`` and ``ws_echo.py``) shares one core, and
on aiohttp it saturated that core before any relay did (bench/README.md, twelfth and thirteenth
sessions): round trips a second then measured the load side. These helpers let both work on
asyncio Protocols instead, a message costing them a read and a write, no task or future. Only
what the benchmark needs: the opening handshake, whole frames split off a buffer, frames built
with or without a mask. No extensions, no fragmentation on the sending side.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import NamedTuple

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEAD = 16 * 1024  # bytes an HTTP head may take before the peer is dropped


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes  # unmasked


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def upgrade_request(host: str, port: int, path: str, key: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
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


def unmask(mask: bytes, payload: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; masked with ``mask`` (4 bytes: a client's) when given."""
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + unmask(mask, payload)  # masking and unmasking are the same XOR


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
        mask = None
        if b1 & 0x80:
            mask, head = bytes(buffer[at + head : at + head + 4]), head + 4
        end = at + head + length
        if end > size:
            break
        payload = bytes(buffer[at + head : end])
        frames.append(Frame(bool(b0 & 0x80), b0 & 0x0F, unmask(mask, payload) if mask else payload))
        at = end
    del buffer[:at]
    return frames
