"""The data side of the response cache (DESIGN §6): store keys, Cache-Control, and entries.

Every key of one service starts with ``c:{<service>}:`` so that, on a Redis Cluster, a
service's entries, generations, locks and purge indexes share one slot:

- ``c:{s}:g``           the service generation (a service purge bumps it);
- ``c:{s}:p:<h(path)>`` the path generation (a successful POST/PUT/PATCH/DELETE bumps it);
- ``c:{s}:v:<h(url)>``  the request headers the URL's response varies on (``accept,accept-language``);
- ``c:{s}:e:<h>``       an entry, where ``h`` hashes both generations, the URL, the subject
  (unless shared) and the values of the varying request headers;
- ``c:{s}:l:<h>``       the fill lock of entry ``h`` (coalescing across instances);
- ``c:{s}:i``           the purge index: ``"<h> <path>"`` for every stored entry;
- ``c:{s}:t:<tag>``     the entries stored with ``Cache-Tag: <tag>``.

An entry is ``MAGIC``, a 4-byte length, JSON metadata (status, reason, headers in order with
repeats, when it was stored, how long it is fresh and may be served stale, its tags) and
the body as it came.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

from .base import Recent

__all__ = ("Entry", "Keys", "cache_control", "freshness", "tags_of", "vary_of")

MAGIC = b"GWC1"
_LENGTH = struct.Struct(">I")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:40]


class Keys:
    """The store keys of one service's cache (the fixed ones made once: a hit reads several)."""

    __slots__ = ("_entry", "_lock", "generation", "index", "prefix", "service")

    def __init__(self, service: str) -> None:
        self.service = service
        self.prefix = prefix = f"c:{{{service}}}:"
        self.generation = prefix + "g"
        self.index = prefix + "i"
        self._entry = prefix + "e:"
        self._lock = prefix + "l:"

    def path_generation(self, path: str) -> str:
        return self.prefix + "p:" + _digest(path)

    def vary(self, url: str) -> str:
        return self.prefix + "v:" + _digest(url)

    def entry(self, digest: str) -> str:
        return self._entry + digest

    def lock(self, digest: str) -> str:
        return self._lock + digest

    def tag(self, tag: str) -> str:
        return self.prefix + "t:" + _digest(tag)

    @staticmethod
    def digest(generations: Sequence[bytes | None], url: str, subject: str | None, values: Sequence[str]) -> str:
        """An entry's digest: both generations, the URL, the subject and the keyed request values,
        as one JSON array (unambiguous whatever the values hold) under SHA-256."""
        service_gen, path_gen = generations
        inputs = ((service_gen or b"0").decode(), (path_gen or b"0").decode(), url, subject, values)
        return hashlib.sha256(_dumps(inputs)).hexdigest()[:40]


def _dumps(value: object) -> bytes:
    """``value`` as JSON. A header byte that is not UTF-8 reaches us as a lone surrogate (aiohttp
    and the upstream client decode with ``surrogateescape``); orjson refuses those, so such a
    value goes through the standard library's encoder, which escapes them (``"\\udcff"``)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def _loads(data: bytes) -> Any:
    """The value :func:`_dumps` made (orjson refuses the escaped surrogates it may hold)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def cache_control(values: Iterable[str]) -> dict[str, str]:
    """``Cache-Control`` directives by lowercased name (value '' when it has none)."""
    directives: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            name, _, arg = item.strip().partition("=")
            if name:
                directives.setdefault(name.strip().lower(), arg.strip().strip('"'))
    return directives


def _seconds(value: str) -> float | None:
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        return None


def freshness(directives: dict[str, str], default: float) -> float:
    """Seconds a response is fresh: ``s-maxage``, then ``max-age``, then the configured ttl."""
    for name in ("s-maxage", "max-age"):
        if name in directives:
            seconds = _seconds(directives[name])
            if seconds is not None:
                return seconds
    return default


def vary_of(values: Iterable[str]) -> list[str] | None:
    """The lowercased header names a response varies on, sorted; None for ``Vary: *``."""
    names = {name.strip().lower() for value in values for name in value.split(",") if name.strip()}
    return None if "*" in names else sorted(names)


def tags_of(values: Iterable[str]) -> list[str]:
    """The tags in ``Cache-Tag`` header values (comma or space separated)."""
    tags = {tag for value in values for tag in value.replace(",", " ").split() if tag.isprintable()}
    return sorted(tags)


class Entry(NamedTuple):
    """One stored response (a named tuple: immutable, and made on every miss in half the time
    a frozen dataclass took: 1.4 µs against 3.0 µs, measured)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # as the upstream sent them, less hop-by-hop and Age
    body: bytes
    stored: float  # wall-clock time it was stored (instances sharing a Redis agree on it)
    age: float  # the upstream's Age when it was received
    fresh: float  # seconds of freshness from when the upstream produced it
    stale: float  # seconds after that during which it may still be served stale
    tags: tuple[str, ...] = ()

    def age_at(self, now: float) -> float:
        return max(0.0, now - self.stored) + self.age

    def encode(self) -> bytes:
        meta = _dumps(
            {
                "s": self.status,
                "r": self.reason,
                "h": self.headers,
                "t": self.stored,
                "a": self.age,
                "f": self.fresh,
                "x": self.stale,
                "g": list(self.tags),
            }
        )
        return MAGIC + _LENGTH.pack(len(meta)) + meta + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """The entry in ``data``; None when it is not one (another version, a damaged value)."""
        if not data.startswith(MAGIC) or len(data) < 8:
            return None
        (length,) = _LENGTH.unpack_from(data, 4)
        try:
            meta = _loads(data[8 : 8 + length])
            return cls(
                status=int(meta["s"]),
                reason=str(meta["r"]),
                headers=[(str(k), str(v)) for k, v in meta["h"]],
                body=data[8 + length :],
                stored=float(meta["t"]),
                age=float(meta["a"]),
                fresh=float(meta["f"]),
                stale=float(meta["x"]),
                tags=tuple(meta["g"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


class DecodedEntries:
    """Entries remembered by the stored bytes they were decoded from, so a hit on an entry
    that has not changed does not parse its metadata and copy its body again. Bounded by
    the total size of the bytes it holds (a :class:`~middleware.base.Recent` measured in
    bytes); stored bytes are immutable, so a remembered entry is never out of date."""

    def __init__(self, max_bytes: int = 8 * 1024 * 1024) -> None:
        self._entries: Recent[bytes, Entry | None] = Recent(
            entries=1 << 16, max_size=max_bytes // 16, max_total=max_bytes
        )

    def decode(self, data: bytes) -> Entry | None:
        try:
            return self._entries[data]  # the memory store hands back the same object: found by identity
        except KeyError:
            pass
        entry = Entry.decode(data)
        self._entries.keep(data, entry, len(data))
        return entry
