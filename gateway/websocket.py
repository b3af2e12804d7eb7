"""WebSocket relay to ``websocket: true`` services (DESIGN §7): the ``websocket:`` key.

This module holds the key's schema; the relay itself arrives with the WebSocket issue.
Until then an upgrade request to any service is refused with a problem+json 501.
"""

from __future__ import annotations

from dataclasses import dataclass

from middleware.schema import Section

__all__ = ("WebSocketConfig",)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketConfig:
    max_message: int = 1024 * 1024  # bytes in one message; larger closes the socket with 1009
    messages_per_second: int = 100  # per direction and socket; beyond it the socket is closed with 1008
    idle_timeout: float = 300.0  # seconds without a message before the gateway closes the socket
    ping_interval: float = 30.0  # seconds between pings to an idle peer

    @classmethod
    def parse(cls, section: Section) -> WebSocketConfig | None:
        """``websocket: true`` (defaults), a mapping of the fields above, or off/absent (None)."""
        if section.is_off():
            return None
        config = cls(
            max_message=section.size("max_message", 1024 * 1024),
            messages_per_second=section.positive_int("messages_per_second", 100),
            idle_timeout=section.duration("idle_timeout", 300.0, positive=True),
            ping_interval=section.duration("ping_interval", 30.0, positive=True),
        )
        section.done()
        return config
