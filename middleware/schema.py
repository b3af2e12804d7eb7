"""Config reading shared by every section of routes.yaml (DESIGN §3).

A :class:`Section` is a strict, read-once view of one config section as one route sees
it: the ``defaults`` → service → per-path layers merged, with the dotted path of the
layer that supplied each key kept, so an error can name the exact place in the file.
Every key must be read by the section's parser; :meth:`Section.done` turns a key nobody
read into an "unknown key" error (typos never pass silently).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Final

__all__ = (
    "MISSING",
    "ConfigError",
    "Section",
    "describe",
    "is_off",
    "is_on",
    "parse_duration",
    "parse_size",
)

OFF_WORDS: Final = frozenset({"off", "none", "false", "no", "disabled"})
ON_WORDS: Final = frozenset({"on", "true", "yes", "enabled"})

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_INTEGER = re.compile(r"^\s*-?\d+\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|k|K|M|G)?\s*$")
_SIZE_UNITS: Final = {
    None: 1, "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "k": 1024, "K": 1024, "KiB": 1024,
    "M": 1024**2, "MiB": 1024**2,
    "G": 1024**3, "GiB": 1024**3,
}  # fmt: skip


class ConfigError(Exception):
    """A problem at one place in the config: ``path`` is dotted (``services.users.timeout``)."""

    def __init__(self, path: str, message: str, *, at_key: bool = False) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message
        self.at_key = at_key  # point at the key itself rather than its value (unknown keys)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


def parse_duration(value: object) -> float:
    """``250ms``, ``2s``, ``5m``, ``1h``, ``1d`` or a number of seconds → seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 2s, 5m, 1h or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError("expected a finite number of seconds")
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError("expected a duration like 250ms, 2s, 5m, 1h or a number of seconds")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """``512KiB``, ``10MiB``, ``1GiB`` (or KB/MB/GB, powers of 1000) or a number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512KiB, 10MiB or a number of bytes")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError("expected a size like 512KiB, 10MiB or a number of bytes")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < 0:
        raise ValueError("must not be negative")
    return size


def is_off(value: object) -> bool:
    """True for the words that switch a section off: ``off``, ``none``, ``false``, YAML ``false``/``null``."""
    if value is None or value is False:
        return True
    return isinstance(value, str) and value.strip().lower() in OFF_WORDS


def is_on(value: object) -> bool:
    """True for the words that switch a section on with its defaults: ``on``, ``true``, YAML ``true``."""
    if value is True:
        return True
    return isinstance(value, str) and value.strip().lower() in ON_WORDS


class Section:
    """One config section as seen by one route: layers merged, provenance kept.

    Layers are ``(dotted path, raw value)`` from least to most specific. A layer that is
    ``off`` disables the section and discards every layer below it; ``on`` (or ``true``)
    enables it with what the layers below set; a mapping layer overrides the same keys
    below it (``merge=True``) or replaces the whole section (``merge=False``, what
    :meth:`child` uses: a route's ``cache: {ttl: 5m}`` replaces the service's ``cache:``).
    """

    __slots__ = ("_history", "_name", "_off", "_off_path", "_path", "_read", "_values")

    def __init__(self, name: str, values: dict[str, tuple[str, object]], *, path: str,
                 off: bool = False, off_path: str = "",
                 history: dict[str, list[tuple[str, object]]] | None = None) -> None:  # fmt: skip
        self._name = name
        self._values = values  # key -> (dotted path of the layer that set it, raw value)
        self._path = path  # where a missing key should be reported
        self._off = off
        self._off_path = off_path
        # key -> every (path, value) the layers gave it, least specific first: what child() layers again
        self._history = history if history is not None else {k: [v] for k, v in values.items()}
        self._read: set[str] = set()

    @classmethod
    def layered(cls, name: str, layers: Sequence[tuple[str, object]], *, merge: bool = True) -> Section:
        """Merge ``layers`` (least specific first); each must be a mapping, ``off``, ``on`` or absent (MISSING)."""
        values: dict[str, tuple[str, object]] = {}
        history: dict[str, list[tuple[str, object]]] = {}
        off, off_path, path = False, "", name
        for layer_path, raw in layers:
            if raw is MISSING:
                continue
            path = layer_path
            if isinstance(raw, Mapping):
                off = False
                if not merge:
                    values.clear()
                    history.clear()
                for key, value in raw.items():
                    entry = (_join(layer_path, str(key)), value)
                    values[str(key)] = entry
                    history.setdefault(str(key), []).append(entry)
            elif is_off(raw):
                values.clear()
                history.clear()
                off, off_path = True, layer_path
            elif is_on(raw):
                off = False  # `cache: on` enables with the lower layers' (or default) settings
            else:
                raise ConfigError(layer_path, f"expected a mapping or off, got {describe(raw)}")
        return cls(name, values, path=path, off=off, off_path=off_path, history=history)

    @classmethod
    def single(cls, name: str, raw: object, *, path: str | None = None) -> Section:
        """A section from one layer; what unit tests and top-level sections use."""
        return cls.layered(name, [(path or name, raw)])

    # -- state ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> str:
        return self._path

    def is_off(self) -> bool:
        return self._off

    def has(self, key: str) -> bool:
        return key in self._values

    def keys(self) -> Iterator[str]:
        return iter(self._values)

    def path_of(self, key: str) -> str:
        entry = self._values.get(key)
        return entry[0] if entry else _join(self._path, key)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError located at the layer that set ``key`` (or where it should be)."""
        return ConfigError(self.path_of(key), message)

    def unknown(self) -> list[ConfigError]:
        """An "unknown key" error for every key that no parser read (typos, unsupported keys)."""
        unread = [key for key in self._values if key not in self._read]
        return [ConfigError(self.path_of(key), "unknown key", at_key=True) for key in unread]

    def done(self) -> None:
        """Raise ConfigError for the first key that no parser read (a typo or an unsupported key)."""
        errors = self.unknown()
        if errors:
            raise errors[0]

    # -- typed getters ----------------------------------------------------------------

    def raw(self, key: str, default: object = MISSING) -> object:
        self._read.add(key)
        entry = self._values.get(key)
        if entry is None:
            if default is MISSING:
                raise ConfigError(_join(self._path, key), "required key is missing")
            return default
        return entry[1]

    def child(self, key: str) -> Section:
        """The nested section at ``key``, layered again from every layer that set it.

        The most specific mapping replaces the ones below it as a whole; ``off`` discards
        the layers below; ``on`` keeps them. Absent everywhere: the section is off.
        """
        self._read.add(key)
        layers = self._history.get(key)
        if not layers:
            return Section(key, {}, path=_join(self._path, key), off=True)
        return Section.layered(key, layers, merge=False)

    def text(self, key: str, default: str | _Missing = MISSING, *, choices: Sequence[str] | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {describe(value)}")
        if choices is not None and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {describe(value)}")
        return value

    def boolean(self, key: str, default: bool | _Missing = MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {describe(value)}")
        return value

    def integer(
        self, key: str, default: int | _Missing = MISSING, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw(key, default)
        if isinstance(value, str) and _INTEGER.match(value):
            value = int(value)  # a quoted "${PORT}" arrives as text
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {describe(value)}")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be <= {maximum}")
        return value

    def positive_int(self, key: str, default: int | _Missing = MISSING) -> int:
        return self.integer(key, default, minimum=1)

    def duration(self, key: str, default: float | _Missing = MISSING, *, positive: bool = False) -> float:
        value = self.raw(key, default)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(key, f"{exc}, got {describe(value)}") from None
        if positive and seconds <= 0:
            raise self.error(key, "must be greater than 0")
        return seconds

    def size(self, key: str, default: int | _Missing = MISSING) -> int:
        value = self.raw(key, default)
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.error(key, f"{exc}, got {describe(value)}") from None

    def text_list(self, key: str, default: Sequence[str] | _Missing = MISSING) -> tuple[str, ...]:
        value = self.raw(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise self.error(key, f"expected a list of strings, got {describe(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.path_of(key)}.{index}", f"expected a non-empty string, got {describe(item)}")
        return tuple(value)


def describe(value: object) -> str:
    """A short description of a config value for error messages (``'abc'``, ``a list``, ``nothing``)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
