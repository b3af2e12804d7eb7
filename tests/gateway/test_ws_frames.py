"""RFC 6455 on the wire (gateway/ws_frames.py): keys, masking, the frames the gateway writes
itself, close payloads and the upstream's handshake response head."""

from __future__ import annotations

import struct

import pytest

from gateway.ws_frames import CLOSE, PING, TEXT, accept_key, close_frame, frame, mask, read_close, response_head

KEY = b"\x37\xfa\x21\x3d"


def parse(data: bytes) -> tuple[int, int, bytes | None, bytes]:
    """First byte, payload length, masking key (None: unmasked) and payload (still masked) of one
    frame, read by hand; the frame must be exactly ``data``."""
    b0, b1 = data[0], data[1]
    length, at = b1 & 0x7F, 2
    if length == 126:
        (length,), at = struct.unpack("!H", data[2:4]), 4
    elif length == 127:
        (length,), at = struct.unpack("!Q", data[2:10]), 10
    key = None
    if b1 & 0x80:
        key, at = data[at : at + 4], at + 4
    payload = data[at:]
    assert len(payload) == length
    return b0, length, key, payload


def close_payload(data: bytes) -> bytes:
    b0, _, key, payload = parse(data)
    assert b0 == 0x80 | CLOSE
    return payload if key is None else bytes(b ^ key[i % 4] for i, b in enumerate(payload))


# -- the handshake key -------------------------------------------------------------------------


def test_accept_key_is_the_rfc_6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 1000])
def test_mask_is_its_own_inverse(size: int) -> None:
    payload = bytes(range(256)) * 4
    payload = payload[:size]
    masked = mask(KEY, payload)
    assert len(masked) == size
    assert mask(KEY, masked) == payload


def test_mask_xors_the_repeated_key() -> None:
    payload = b"Hello, world"
    assert mask(KEY, payload) == bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))


# -- frames the gateway writes -------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(
    ("size", "length_field", "head"),
    [(0, 0, 2), (125, 125, 2), (126, 126, 4), (65535, 126, 4), (65536, 127, 10)],
)
def test_frame_header_length_encoding(size: int, length_field: int, head: int, masked: bool) -> None:
    payload = bytes(i % 251 for i in range(size))
    data = frame(TEXT, payload, masked=masked)
    assert data[0] == 0x80 | TEXT  # final, no reserved bit
    assert data[1] == (0x80 if masked else 0) | length_field
    assert len(data) == head + (4 if masked else 0) + size
    _, length, key, body = parse(data)
    assert length == size
    assert (key is not None) == masked
    assert (body if key is None else mask(key, body)) == payload


def test_masked_frames_get_a_fresh_key_each() -> None:
    keys = {parse(frame(PING, b"", masked=True))[2] for _ in range(20)}
    assert len(keys) > 1


def test_close_frame_carries_code_and_reason() -> None:
    assert close_payload(close_frame(4001, "bye now", masked=False)) == struct.pack("!H", 4001) + b"bye now"
    assert close_payload(close_frame(1001, "going", masked=True)) == struct.pack("!H", 1001) + b"going"


@pytest.mark.parametrize("code", [1005, 1006, 999])
def test_close_frame_replaces_an_unsendable_code_with_1000(code: int) -> None:
    payload = close_payload(close_frame(code, "why", masked=False))
    assert payload == struct.pack("!H", 1000) + b"why"


def test_close_frame_cuts_a_long_reason_to_125_bytes_at_a_character_boundary() -> None:
    reason = "é" * 100  # 200 bytes; 123 would split the 62nd character
    payload = close_payload(close_frame(1000, reason, masked=False))
    assert len(payload) <= 125
    assert payload[:2] == struct.pack("!H", 1000)
    kept = payload[2:].decode()  # strict: no half character left at the end
    assert kept == "é" * 61


def test_close_frame_keeps_a_reason_that_fits_exactly() -> None:
    payload = close_payload(close_frame(1000, "x" * 123, masked=True))
    assert payload == struct.pack("!H", 1000) + b"x" * 123


# -- close payloads -----------------------------------------------------------------------------


def test_read_close_of_an_empty_payload_is_1005_without_reason() -> None:
    assert read_close(b"") == (1005, "")


def test_read_close_of_one_byte_is_invalid() -> None:
    assert read_close(b"\x03") is None


@pytest.mark.parametrize("code", [1005, 1006, 1015, 999, 2999, 5000])
def test_read_close_of_a_code_no_endpoint_may_send_is_invalid(code: int) -> None:
    assert read_close(struct.pack("!H", code) + b"reason") is None


@pytest.mark.parametrize("code", [1000, 1001, 1011, 3000, 4999])
def test_read_close_accepts_valid_codes(code: int) -> None:
    assert read_close(struct.pack("!H", code) + "bye é".encode()) == (code, "bye é")


def test_read_close_of_a_reason_not_utf8_is_invalid() -> None:
    assert read_close(struct.pack("!H", 1000) + b"\xc3(") is None


# -- the upstream's response head ---------------------------------------------------------------


def test_response_head_gives_status_reason_and_fields() -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection:Upgrade\r\nX-Empty: "
    assert response_head(head) == (
        101,
        "Switching Protocols",
        [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("X-Empty", "")],
    )


def test_response_head_without_a_reason() -> None:
    assert response_head(b"HTTP/1.1 502\r\nContent-Length: 0") == (502, "", [("Content-Length", "0")])


@pytest.mark.parametrize("first", [b"garbage", b"HTTP/2 101 Switching", b"HTTP/1.1 1O1 Switching", b""])
def test_response_head_rejects_a_first_line_that_is_not_http(first: bytes) -> None:
    with pytest.raises(ValueError, match="status line"):
        response_head(first + b"\r\nUpgrade: websocket")


@pytest.mark.parametrize("line", [b"Upgrade websocket", b": no name", b" Upgrade: folded"])
def test_response_head_rejects_a_field_line_without_a_colon_or_name(line: bytes) -> None:
    with pytest.raises(ValueError, match="header field"):
        response_head(b"HTTP/1.1 101 Switching Protocols\r\n" + line)
