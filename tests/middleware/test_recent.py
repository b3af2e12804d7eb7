"""The bounded memory of recent answers behind route matches and cache keys."""

from __future__ import annotations

import pytest

from middleware.base import Recent


def test_a_kept_answer_is_found_again() -> None:
    recent: Recent[str, int] = Recent()
    recent.keep("a", 1, size=1)
    assert recent.get("a") == 1 and recent["a"] == 1


def test_inputs_over_the_size_limit_are_not_kept() -> None:
    recent: Recent[str, int] = Recent(max_size=10)
    recent.keep("long", 1, size=11)
    assert recent.get("long") is None
    with pytest.raises(KeyError):
        recent["long"]


def test_a_full_memory_starts_over() -> None:
    recent: Recent[int, int] = Recent(entries=3)
    for key in range(3):
        recent.keep(key, key, size=1)
    recent.keep(3, 3, size=1)
    assert [recent.get(key) for key in range(4)] == [None, None, None, 3]


def test_a_memory_bounded_in_total_starts_over_when_the_next_answer_would_not_fit() -> None:
    recent: Recent[str, int] = Recent(max_size=10, max_total=20)
    recent.keep("a", 1, size=10)
    recent.keep("b", 2, size=10)
    recent.keep("c", 3, size=1)
    assert [recent.get(key) for key in "abc"] == [None, None, 3]
