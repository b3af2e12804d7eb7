"""The GCRA arithmetic itself (gateway/stores/gcra.py), in integer microseconds."""

from __future__ import annotations

import pytest

from gateway.stores.gcra import Decision, decide, interval_us
from middleware.base import Quota


@pytest.mark.parametrize(
    ("limit", "period", "interval"),
    [
        pytest.param(10, 1.0, 100_000, id="even"),
        pytest.param(3, 1.0, 333_333, id="uneven: rounded down"),
        pytest.param(100, 60.0, 600_000, id="per minute"),
        pytest.param(2, 0.4, 200_000, id="float period"),
        pytest.param(10**7, 1.0, 1, id="at least one microsecond"),
    ],
)
def test_interval(limit: int, period: float, interval: int) -> None:
    assert interval_us(limit, period) == interval


@pytest.mark.parametrize(
    ("limit", "period", "message"),
    [
        pytest.param(0, 1.0, "limit must be >= 1", id="zero limit"),
        pytest.param(1, 0.0, "period must be > 0", id="zero period"),
        pytest.param(1, float("nan"), "period must be > 0", id="nan period"),
        pytest.param(1, 10.0**12, "period too long", id="beyond exact doubles in Lua"),
    ],
)
def test_interval_errors(limit: int, period: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        interval_us(limit, period)


def test_fresh_key_admits_a_full_burst() -> None:
    tat = None
    decisions = []
    for _ in range(4):
        decision = decide(1_000_000, tat, 100, 3)
        tat = decision.tat or tat
        decisions.append(decision)
    assert decisions == [
        Decision(True, 2, 100, 0, 1_000_100),
        Decision(True, 1, 200, 0, 1_000_200),
        Decision(True, 0, 300, 0, 1_000_300),
        Decision(False, 0, 300, 100),  # nothing stored: a rejection does not spend
    ]


def test_a_past_tat_is_a_full_budget() -> None:
    assert decide(5_000, 1_000, 100, 3) == decide(5_000, None, 100, 3)


def test_lowered_limit_never_goes_negative() -> None:
    tat = 1_000 + 10 * 100  # ten requests' worth outstanding, now the limit is 3
    assert decide(1_000, tat, 100, 3) == Decision(False, 0, 1_000, 800)
    assert decide(1_800, tat, 100, 3) == Decision(True, 0, 300, 0, 2_100)


def test_quota_in_seconds() -> None:
    assert Decision(False, 0, 400_000, 200_001).quota() == Quota(False, 0, 0.4, 0.200001)
    assert Decision(True, 1, 1, 0, 5).ttl_ms == 1  # rounded up: a TAT never expires early
