"""The event loop a benchmark process runs on: uvloop when installed, as the gateway does
(DESIGN §2), unless asked for asyncio; shared by the bench's own servers and clients."""

from __future__ import annotations

import asyncio


def new_loop(choice: str = "auto") -> tuple[str, asyncio.AbstractEventLoop]:
    """``(name, loop)``: ``auto`` is uvloop when installed, ``uvloop`` insists on it, ``asyncio`` never uses it."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return "uvloop", uvloop.new_event_loop()
    return "asyncio", asyncio.new_event_loop()
