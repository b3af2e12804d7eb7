"""Per-route rate limiting (DESIGN §6): the ``rate_limit:`` section.

This module holds the section's schema; the middleware itself arrives with the store
(issue: rate limiting on memory or Redis).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Section

__all__ = ("SECTION", "RateLimitConfig")

SECTION = "rate_limit"


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitConfig:
    requests: int  # budget per period; > 0
    per: float  # the period, in seconds ("1s", "1m" in YAML)
    key: str = "ip"  # ip | sub | header:<Name> | claim:<name>

    @classmethod
    def parse(cls, section: Section) -> RateLimitConfig | None:
        """Build from the route's ``rate_limit:`` section; None when it is ``off``."""
        if section.is_off():
            return None
        key = section.text("key", "ip")
        if key not in ("ip", "sub") and not (key.startswith(("header:", "claim:")) and key.partition(":")[2]):
            raise section.error("key", f"expected ip, sub, header:<Name> or claim:<name>, got {key!r}")
        config = cls(requests=section.positive_int("requests"), per=section.duration("per", positive=True), key=key)
        section.done()
        return config
