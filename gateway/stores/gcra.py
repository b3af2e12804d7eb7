"""GCRA, the rate-limit algorithm behind :meth:`Store.take` (DESIGN §6), written twice: in Python
for the memory store and in Lua for Redis. Both use the same integer arithmetic in microseconds,
so they give bit-identical answers for the same sequence of times.

The state is one number per key, the theoretical arrival time (TAT). With the emission interval
``T = period / limit`` and a burst tolerance of ``limit * T``, a request at ``now`` is admitted
when ``max(tat, now) + T - limit * T <= now``; admitting it stores ``max(tat, now) + T``. A full
budget (no key, or ``tat <= now``) therefore admits ``limit`` requests back to back, and a
rejected request names the exact microsecond (``retry_after``) at which one more is admitted.
"""

from __future__ import annotations

from typing import NamedTuple

from middleware.base import Quota

__all__ = ("LUA", "Decision", "decide", "interval_us", "quota")

_MAX_BURST_US = 2**53 // 4  # keeps every intermediate exact in Lua's doubles (about 71 years)

# KEYS[1]: the TAT (µs, as decimal digits). ARGV[1]: T in µs, ARGV[2]: limit, ARGV[3]: "0" to only
# look (nothing stored: explain), ARGV[4]: optional "now" in µs (tests only; the gateway always
# uses the server's clock so instances agree).
# Returns {allowed, remaining, reset_us, retry_us} like decide(). Numbers are written with
# string.format('%d') because Lua would print a 16-digit number in exponent form.
LUA = """
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local spend = ARGV[3] ~= '0'
local now = tonumber(ARGV[4])
if not now then
  if redis.replicate_commands then redis.replicate_commands() end
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local burst = interval * limit
local new_tat = tat + interval
local allow_at = new_tat - burst
if now < allow_at then
  return {0, 0, tat - now, allow_at - now}
end
if spend then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
end
return {1, math.floor((burst - (new_tat - now)) / interval), new_tat - now, 0}
"""


class Decision(NamedTuple):
    """One GCRA step in integer microseconds; ``tat`` is what to store (None: store nothing)."""

    allowed: bool
    remaining: int
    reset_us: int
    retry_us: int
    tat: int | None = None

    @property
    def ttl_ms(self) -> int:
        """How long the stored TAT matters: until the budget is full again, in whole ms (ceil)."""
        return -(-self.reset_us // 1000)

    def quota(self) -> Quota:
        return quota(self.allowed, self.remaining, self.reset_us, self.retry_us)


def interval_us(limit: int, period: float) -> int:
    """The emission interval ``period / limit`` in whole microseconds (at least 1)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not period > 0:
        raise ValueError(f"period must be > 0, got {period}")
    interval = max(1, round(period * 1_000_000) // limit)
    if interval * limit > _MAX_BURST_US:
        raise ValueError(f"period too long: {period}s")
    return interval


def decide(now: int, tat: int | None, interval: int, limit: int) -> Decision:
    """The Lua script above, in Python (memory store). All arguments in µs except ``limit``."""
    if tat is None or tat < now:
        tat = now
    burst = interval * limit
    new_tat = tat + interval
    allow_at = new_tat - burst
    if now < allow_at:
        return Decision(False, 0, tat - now, allow_at - now)
    return Decision(True, (burst - (new_tat - now)) // interval, new_tat - now, 0, new_tat)


def quota(allowed: bool | int, remaining: int, reset_us: int, retry_us: int) -> Quota:
    return Quota(bool(allowed), int(remaining), reset_us / 1_000_000, retry_us / 1_000_000)
