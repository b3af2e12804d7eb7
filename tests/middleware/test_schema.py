"""Durations, sizes and the layered, strict :class:`Section` reader (DESIGN §3)."""

from __future__ import annotations

import re

import pytest

from middleware.schema import MISSING, ConfigError, Section, describe, is_off, is_on, parse_duration, parse_size

# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("2s", 2.0, id="seconds"),
        pytest.param("5m", 300.0, id="minutes"),
        pytest.param("1h", 3600.0, id="hours"),
        pytest.param("1d", 86400.0, id="days"),
        pytest.param("1.5s", 1.5, id="fractional"),
        pytest.param(" 30 s ", 30.0, id="spaces around and before the unit"),
        pytest.param("10", 10.0, id="bare number as text is seconds"),
        pytest.param(10, 10.0, id="integer is seconds"),
        pytest.param(0.5, 0.5, id="float is seconds"),
        pytest.param(0, 0.0, id="zero"),
    ],
)
def test_parse_duration(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param("5x", "expected a duration", id="unknown unit"),
        pytest.param("5 minutes", "expected a duration", id="spelled-out unit"),
        pytest.param("5M", "expected a duration", id="units are lower case"),
        pytest.param("-1s", "expected a duration", id="negative text"),
        pytest.param("1s500ms", "expected a duration", id="compound"),
        pytest.param("", "expected a duration", id="empty"),
        pytest.param(None, "expected a duration", id="null"),
        pytest.param(True, "expected a duration", id="boolean is not a number"),
        pytest.param([1], "expected a duration", id="list"),
        pytest.param(-1, "must not be negative", id="negative number"),
        pytest.param(float("inf"), "finite", id="infinity"),
        pytest.param(float("nan"), "finite", id="nan"),
    ],
)
def test_parse_duration_rejects(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(raw)


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        pytest.param("512KiB", 512 * 1024, id="kibibytes"),
        pytest.param("10MiB", 10 * 1024**2, id="mebibytes"),
        pytest.param("1GiB", 1024**3, id="gibibytes"),
        pytest.param("1KB", 1000, id="kilobytes are powers of 1000"),
        pytest.param("2MB", 2_000_000, id="megabytes"),
        pytest.param("3GB", 3_000_000_000, id="gigabytes"),
        pytest.param("4k", 4096, id="short k is 1024"),
        pytest.param("1.5KiB", 1536, id="fractional"),
        pytest.param("100B", 100, id="explicit bytes"),
        pytest.param("100", 100, id="bare number as text"),
        pytest.param(4096, 4096, id="integer is bytes"),
        pytest.param(0, 0, id="zero"),
    ],
)
def test_parse_size(raw: object, size: int) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param("10XB", "expected a size", id="unknown unit"),
        pytest.param("10mib", "expected a size", id="unit case matters"),
        pytest.param("ten", "expected a size", id="words"),
        pytest.param("-1KiB", "expected a size", id="negative text"),
        pytest.param("", "expected a size", id="empty"),
        pytest.param(None, "expected a size", id="null"),
        pytest.param(False, "expected a size", id="boolean"),
        pytest.param(float("inf"), "expected a size", id="infinity"),
        pytest.param(-5, "must not be negative", id="negative number"),
    ],
)
def test_parse_size_rejects(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(raw)


# -- on / off words -----------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, False, "off", "OFF", "none", "false", "no", "disabled", " off "])
def test_off_words(raw: object) -> None:
    assert is_off(raw)
    assert not is_on(raw)


@pytest.mark.parametrize("raw", [True, "on", "true", "yes", "enabled", "On"])
def test_on_words(raw: object) -> None:
    assert is_on(raw)
    assert not is_off(raw)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param(None, "nothing", id="null"),
        pytest.param(True, "true", id="boolean"),
        pytest.param({"a": 1}, "a mapping", id="mapping"),
        pytest.param([1], "a list", id="list"),
        pytest.param("abc", "'abc'", id="text"),
        pytest.param("x" * 100, "'" + "x" * 36 + "...", id="long text is cut"),
    ],
)
def test_describe(value: object, text: str) -> None:
    assert describe(value) == text


# -- Section: typed getters -----------------------------------------------------------------


def _one(key: str, value: object) -> Section:
    return Section.single("s", {key: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(5, 5, id="integer"),
        pytest.param("42", 42, id="digits as text (a quoted ${VAR})"),
        pytest.param(" 7 ", 7, id="digits with spaces"),
    ],
)
def test_integer(value: object, expected: int) -> None:
    assert _one("n", value).integer("n") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("many", "s.n: expected an integer, got 'many'", id="words"),
        pytest.param("--5", "s.n: expected an integer, got '--5'", id="double minus"),
        pytest.param(1.5, "s.n: expected an integer, got 1.5", id="float"),
        pytest.param(True, "s.n: expected an integer, got true", id="boolean"),
        pytest.param(-1, "s.n: must be >= 0", id="below minimum"),
        pytest.param(11, "s.n: must be <= 10", id="above maximum"),
    ],
)
def test_integer_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        _one("n", value).integer("n", maximum=10)


def test_integer_default_when_absent() -> None:
    assert Section.single("s", {}).integer("n", 3) == 3


def test_required_key_missing_names_the_section_path() -> None:
    with pytest.raises(ConfigError, match=r"^s\.n: required key is missing$"):
        Section.single("s", {}).integer("n")


def test_positive_int_refuses_zero() -> None:
    with pytest.raises(ConfigError, match="must be >= 1"):
        _one("n", 0).positive_int("n")


def test_text_choices() -> None:
    with pytest.raises(ConfigError, match=r"^s\.mode: expected one of a, b, got 'c'$"):
        _one("mode", "c").text("mode", choices=("a", "b"))


@pytest.mark.parametrize("value", ["", 5, None, ["a"]])
def test_text_must_be_non_empty_string(value: object) -> None:
    with pytest.raises(ConfigError, match="expected a non-empty string"):
        _one("t", value).text("t")


def test_optional_text_absent_or_null_is_none() -> None:
    assert Section.single("s", {}).optional_text("t") is None
    assert _one("t", None).optional_text("t") is None


def test_boolean_is_strict() -> None:
    assert _one("b", True).boolean("b") is True
    with pytest.raises(ConfigError, match=r"^s\.b: expected true or false, got 'yes please'$"):
        _one("b", "yes please").boolean("b")


def test_duration_errors_carry_the_path_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"^s\.timeout: expected a duration like .*, got '5x'$"):
        _one("timeout", "5x").duration("timeout")


def test_positive_duration_refuses_zero() -> None:
    with pytest.raises(ConfigError, match=r"^s\.timeout: must be greater than 0$"):
        _one("timeout", "0s").duration("timeout", positive=True)


def test_size_errors_carry_the_path_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"^s\.max_body: expected a size like .*, got '10XB'$"):
        _one("max_body", "10XB").size("max_body")


def test_text_list_accepts_one_string() -> None:
    assert _one("l", "a").text_list("l") == ("a",)


def test_text_list_points_at_the_bad_item() -> None:
    with pytest.raises(ConfigError, match=r"^s\.l\.1: expected a non-empty string, got 2$"):
        _one("l", ["a", 2]).text_list("l")


def test_text_list_refuses_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^s\.l: expected a list of strings, got a mapping$"):
        _one("l", {"a": 1}).text_list("l")


# -- Section: layering and provenance ---------------------------------------------------------


def test_more_specific_layer_overrides_keys_and_keeps_the_rest() -> None:
    section = Section.layered("route", [("defaults", {"a": 1, "b": 2}), ("services.x", {"b": 3})])
    assert (section.integer("a"), section.integer("b")) == (1, 3)
    assert section.path_of("a") == "defaults.a"
    assert section.path_of("b") == "services.x.b"


def test_error_is_reported_at_the_layer_that_set_the_key() -> None:
    section = Section.layered("route", [("defaults", {"timeout": "5x"}), ("services.x", {"retries": 1})])
    with pytest.raises(ConfigError) as caught:
        section.duration("timeout")
    assert caught.value.path == "defaults.timeout"


def test_missing_key_is_reported_at_the_most_specific_layer() -> None:
    section = Section.layered("route", [("defaults", {}), ("services.x", {})])
    with pytest.raises(ConfigError) as caught:
        section.text("path")
    assert caught.value.path == "services.x.path"


def test_absent_layers_are_skipped() -> None:
    section = Section.layered("cache", [("defaults.cache", {"ttl": 5}), ("services.x.cache", MISSING)])
    assert section.path == "defaults.cache"
    assert section.duration("ttl") == 5


@pytest.mark.parametrize(
    "off",
    [pytest.param("off", id="word"), pytest.param(False, id="yaml false"), pytest.param(None, id="null")],
)
def test_off_layer_discards_everything_below(off: object) -> None:
    section = Section.layered("cache", [("defaults.cache", {"ttl": 5}), ("services.x.cache", off)])
    assert section.is_off()
    assert not section.has("ttl")


def test_mapping_above_off_enables_again() -> None:
    section = Section.layered("cache", [("defaults.cache", "off"), ("services.x.cache", {"ttl": 5})])
    assert not section.is_off()
    assert section.duration("ttl") == 5


@pytest.mark.parametrize("on", [pytest.param("on", id="word"), pytest.param(True, id="yaml true")])
def test_on_layer_keeps_the_settings_below(on: object) -> None:
    section = Section.layered("cache", [("defaults.cache", {"ttl": 5}), ("services.x.cache", on)])
    assert not section.is_off()
    assert section.duration("ttl") == 5


def test_layer_that_is_neither_mapping_nor_switch_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^services\.x\.cache: expected a mapping or off, got 5$"):
        Section.layered("cache", [("services.x.cache", 5)])


def test_child_section_is_replaced_as_a_whole_by_the_more_specific_layer() -> None:
    route = Section.layered(
        "route",
        [
            ("services.x", {"cache": {"ttl": 30, "shared": True}}),
            ("services.x.routes.0", {"cache": {"ttl": 300}}),
        ],
    )
    cache = route.child("cache")
    assert cache.duration("ttl") == 300
    assert not cache.has("shared")
    assert cache.path_of("ttl") == "services.x.routes.0.cache.ttl"


def test_child_switched_on_inherits_the_mapping_below() -> None:
    route = Section.layered(
        "route",
        [("defaults", {"rate_limit": {"requests": 5, "per": "1s"}}), ("services.x", {"rate_limit": "on"})],
    )
    limit = route.child("rate_limit")
    assert not limit.is_off()
    assert limit.positive_int("requests") == 5
    assert limit.path_of("requests") == "defaults.rate_limit.requests"


def test_child_switched_off_at_any_layer_is_off() -> None:
    route = Section.layered(
        "route",
        [
            ("defaults", {"cache": {"ttl": 5}}),
            ("services.x", {"cache": {"ttl": 10}}),
            ("services.x.routes.0", {"cache": "off"}),
        ],
    )
    assert route.child("cache").is_off()


def test_child_switched_on_above_off_gets_no_settings_from_below_the_off() -> None:
    route = Section.layered(
        "route",
        [
            ("defaults", {"cache": {"ttl": 5}}),
            ("services.x", {"cache": "off"}),
            ("services.x.routes.0", {"cache": "on"}),
        ],
    )
    cache = route.child("cache")
    assert not cache.is_off()
    assert not cache.has("ttl")


def test_absent_child_is_off() -> None:
    child = Section.single("route", {}).child("cache")
    assert child.is_off()
    assert child.path == "route.cache"


# -- Section: done() and unknown keys ---------------------------------------------------------


def test_done_passes_when_every_key_was_read() -> None:
    section = Section.single("s", {"a": 1})
    section.integer("a")
    section.done()


def test_done_reports_an_unread_key_at_the_key() -> None:
    section = Section.layered("route", [("defaults", {"timout": "1s"}), ("services.x", {"retries": 1})])
    section.integer("retries")
    with pytest.raises(ConfigError, match=r"^defaults\.timout: unknown key$") as caught:
        section.done()
    assert caught.value.at_key


def test_unknown_lists_every_unread_key_in_order() -> None:
    section = Section.single("s", {"a": 1, "b": 2, "c": 3})
    section.integer("b")
    assert [(e.path, e.message) for e in section.unknown()] == [("s.a", "unknown key"), ("s.c", "unknown key")]


def test_reading_with_a_default_counts_as_read() -> None:
    section = Section.single("s", {"a": 1})
    section.raw("a", None)
    assert section.unknown() == []


def test_keys_of_an_off_section_are_not_unknown() -> None:
    section = Section.layered("cache", [("defaults.cache", {"bogus": 1}), ("services.x.cache", "off")])
    section.done()
