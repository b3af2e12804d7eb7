"""RFC 6455 on the wire, for the frame-level WebSocket relay (:mod:`gateway.ws_relay`).

Only what a relay that passes frames on as they came needs: the opening handshake's key and
heads, frames the gateway writes itself (pings, closes), a close frame's code and reason, and
masking. Frames from the peers are split and checked by the relay as they arrive; no message is
ever assembled or decoded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Final

__all__ = (
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "PING",
    "PONG",
    "TEXT",
    "accept_key",
    "close_frame",
    "frame",
    "mask",
    "new_key",
    "read_close",
    "response_head",
)

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_UNSENDABLE: Final = frozenset({1004, 1005, 1006, 1015})  # codes a close frame must not carry (RFC 6455 §7.4.1)


def new_key() -> str:
    """A ``Sec-WebSocket-Key``: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode()


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` that answers ``key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def mask(key: bytes, payload: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``key`` repeated (masking and unmasking are the same)."""
    size = len(payload)
    if not size:
        return payload
    pad = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(pad, "little")).to_bytes(size, "little")


def frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame; ``masked`` (the gateway as a client, to an upstream) with a fresh random key."""
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + mask(key, payload)


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame with ``code`` (1000 for a code a frame must not carry) and ``reason``
    (cut to fit the 125 bytes a control frame may carry, at a character boundary)."""
    if code in _UNSENDABLE or not 1000 <= code <= 4999:
        code = 1000
    reason_bytes = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return frame(CLOSE, struct.pack("!H", code) + reason_bytes, masked=masked)


def read_close(payload: bytes) -> tuple[int, str] | None:
    """A close frame's code and reason: ``(1005, "")`` when it has none (RFC 6455 §7.1.5), None
    when the payload is not a valid one (one byte, a code no endpoint may send, a reason not UTF-8)."""
    if not payload:
        return 1005, ""
    if len(payload) < 2:
        return None
    code = int.from_bytes(payload[:2], "big")
    if code < 1000 or code in _UNSENDABLE or 1016 <= code < 3000 or code > 4999:
        return None
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        return None


def response_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    """Status, reason and fields of an HTTP/1.1 response head (without its blank line).
    Raises ValueError when it is not one."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(status) != 3 or not status.isdigit():
        raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"not a header field: {line[:80]!r}")
        fields.append((name, value.strip()))
    return int(status), reason, fields
