"""HTTP response cache (DESIGN §6): the ``cache:`` section.

This module holds the section's schema; the middleware itself arrives with the cache
issue.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Section

__all__ = ("DEFAULT_STATUSES", "SECTION", "CacheConfig")

SECTION = "cache"
DEFAULT_STATUSES = frozenset({200, 203, 204, 300, 301, 404, 410})


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    ttl: float = 60.0  # seconds an entry is fresh when the upstream says nothing; "30s", "5m"
    max_entry: int = 1024 * 1024  # bytes; a larger body is passed through, never stored
    statuses: frozenset[int] = DEFAULT_STATUSES  # which response statuses may be stored
    shared: bool = False  # true: one entry for every caller, tokens or not (RFC 9111 §3.5)
    stale_while_revalidate: float = 0.0  # seconds a stale entry may be served while refreshing
    stale_if_error: float = 0.0  # seconds a stale entry may be served when the upstream fails

    @classmethod
    def parse(cls, section: Section) -> CacheConfig | None:
        """Build from the route's ``cache:`` section; None when it is ``off`` (the default)."""
        if section.is_off():
            return None
        statuses = DEFAULT_STATUSES
        if section.has("statuses"):
            raw = section.raw("statuses")
            if not isinstance(raw, list) or not all(isinstance(s, int) and 100 <= s <= 599 for s in raw):
                raise section.error("statuses", "expected a list of HTTP status codes")
            statuses = frozenset(raw)
        config = cls(
            ttl=section.duration("ttl", 60.0),
            max_entry=section.size("max_entry", 1024 * 1024),
            statuses=statuses,
            shared=section.boolean("shared", False),
            stale_while_revalidate=section.duration("stale_while_revalidate", 0.0),
            stale_if_error=section.duration("stale_if_error", 0.0),
        )
        section.done()
        return config
