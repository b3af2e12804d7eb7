"""Where the gateway's JSON access-log lines go when it runs as a server: stdout, batched.

One ``write`` per event-loop turn carries every line finished in that turn, instead of a
``LogRecord``, a handler lock and a ``write`` + ``flush`` per request (about 50 µs a line
through ``logging``, measured). Lines are never held longer than the turn that finished
them, and :meth:`LineBatcher.flush` runs at app cleanup so the last ones are not lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import BinaryIO

__all__ = ("LineBatcher",)

logger = logging.getLogger(__name__)


class LineBatcher:
    """A sink for access-log lines (``RequestIdMiddleware(access_sink=...)``) writing to a binary stream."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._failed = False

    def __call__(self, line: bytes) -> None:
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a line logged outside the server): write it now
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"\n".join(self._pending) + b"\n"
        self._pending.clear()
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError) as exc:  # stdout closed or gone: keep serving, say so once
            if not self._failed:
                self._failed = True
                logger.error("the access log cannot be written (%s); lines are being dropped", exc)
