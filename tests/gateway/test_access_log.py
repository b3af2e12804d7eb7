"""The server's access-log sink: one write per event-loop turn, nothing held past it."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from gateway.access_log import LineBatcher


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


class BrokenStream(io.BytesIO):
    def write(self, data: bytes) -> int:  # type: ignore[override]
        raise BrokenPipeError("stdout is gone")


async def test_lines_of_one_turn_go_out_in_one_write_at_its_end() -> None:
    stream = CountingStream()
    lines = LineBatcher(stream)
    lines(b'{"n":1}')
    lines(b'{"n":2}')
    assert stream.getvalue() == b""
    await asyncio.sleep(0)
    assert stream.getvalue() == b'{"n":1}\n{"n":2}\n'
    assert stream.writes == 1


async def test_each_turn_writes_its_own_lines() -> None:
    stream = CountingStream()
    lines = LineBatcher(stream)
    lines(b"a")
    await asyncio.sleep(0)
    lines(b"b")
    await asyncio.sleep(0)
    assert stream.getvalue() == b"a\nb\n"
    assert stream.writes == 2


async def test_flush_writes_what_is_pending_at_once() -> None:
    stream = CountingStream()
    lines = LineBatcher(stream)
    lines(b"last")
    lines.flush()
    assert stream.getvalue() == b"last\n"
    await asyncio.sleep(0)
    assert stream.writes == 1


def test_a_line_without_a_running_loop_is_written_at_once() -> None:
    stream = CountingStream()
    LineBatcher(stream)(b"outside")
    assert stream.getvalue() == b"outside\n"


async def test_a_broken_stream_is_reported_once_and_lines_keep_being_taken(caplog: pytest.LogCaptureFixture) -> None:
    lines = LineBatcher(BrokenStream())
    with caplog.at_level(logging.ERROR, logger="gateway.access_log"):
        for _ in range(3):
            lines(b"x")
            await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.name == "gateway.access_log"]
    assert len(errors) == 1
    assert "cannot be written" in errors[0].getMessage()
