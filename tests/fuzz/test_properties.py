"""Property tests (hypothesis): the config loader and the path normaliser hold their
promises for any input, not only the ones we thought of (DESIGN §3, §4)."""

from __future__ import annotations

import itertools
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.chain import RouteChain
from gateway.config import ConfigInvalid, load_text
from gateway.routing import PathRejected, RouteTable, normalise_path
from middleware.problem import Problem

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_LOCATED = re.compile(r"^.+:\d+:\d+: ")

# -- the config loader: any document loads or raises located errors, never anything else ------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 70000), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["1s", "5m", "10MiB", "off", "on", "none", "${X}", "${X:-3}", "http://h:1"]),
)  # fmt: skip
KEYS = [
    "listen", "admin", "store", "limits", "jwt", "defaults", "services", "trusted_proxies", "host", "port",
    "url", "on_error", "timeout", "max_body", "secret", "algorithms", "auth", "scopes", "rate_limit", "cache",
    "requests", "per", "key", "ttl", "upstreams", "routes", "path", "methods", "websocket", "users", "retries",
]  # fmt: skip
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=5),
    ),
    max_leaves=25,
)


def _check(text: str) -> None:
    try:
        load_text(text, env={"X": "1"})
    except ConfigInvalid as exc:
        assert exc.errors, "ConfigInvalid must carry at least one error"
        for error in exc.errors:
            assert _LOCATED.match(str(error)), str(error)


@FUZZ
@given(documents)
def test_any_yaml_document_loads_or_raises_located_errors(document: object) -> None:
    _check(yaml.safe_dump(document))


@FUZZ
@given(st.text(max_size=200))
def test_any_text_loads_or_raises_located_errors(text: str) -> None:
    _check(text)


VALID = """
jwt: {secret: s}
services:
  users:
    upstreams: [http://127.0.0.1:9001]
    rate_limit: {requests: 5, per: 1s}
    routes:
      - {path: /public/*, auth: none}
"""


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.text(max_size=3))
def test_a_mangled_valid_config_loads_or_raises_located_errors(position: int, insert: str) -> None:
    _check(VALID[:position] + insert + VALID[position:])


# -- the path normaliser: a normalised path never leaves its service prefix -----------------

SEGMENTS = st.sampled_from(
    ["a", "users", "..", ".", "", "%2e", "%2E%2e", "%2e.", "%2f", "%41", "%7e", "%", "%zz", "x%20y", "api", "svc", "\\"]
)
paths = st.lists(SEGMENTS, max_size=8).map(lambda parts: "/" + "/".join(parts))

TABLE = RouteTable(load_text("defaults: {auth: none}\nservices: {svc: {upstreams: ['http://h:1']}}").services,
                   {"svc": RouteChain(lambda request: None)})  # type: ignore[arg-type, return-value]  # fmt: skip


@FUZZ
@given(paths)
def test_normalised_paths_have_no_dot_segments_or_empty_segments(path: str) -> None:
    try:
        segments, _ = normalise_path(path)
    except PathRejected:
        return
    assert all(s not in ("", ".", "..") for s in segments)
    assert not any("%2F" in s.upper() or "/" in s for s in segments)


@FUZZ
@given(paths)
def test_a_matched_request_never_leaves_its_service(path: str) -> None:
    target = "/api/svc" + path
    try:
        match = TABLE.match("GET", target)
    except Problem as problem:
        assert problem.status == 400
        return
    if match is None:
        return
    rest = match.target.rest
    assert rest == "" or rest.startswith("/")
    # re-normalising what goes upstream gives the same segments: nothing left to resolve
    segments, _ = normalise_path("/api/svc" + (rest or "/"))
    assert segments[:2] == ["api", "svc"]
    assert ".." not in rest.split("/") and "." not in rest.split("/")


@pytest.mark.parametrize("path", ["/api/svc/%2e%2e/%2e%2e/etc", "/api/svc/..", "/api/svc/a/../../b"])
def test_known_escapes_are_400(path: str) -> None:
    with pytest.raises(Problem):
        TABLE.match("GET", path)


# -- header handling: what reaches the upstream ----------------------------------------------

_HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade"]
_OWN = ["X-User-Id", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Request-ID", "Host"]
_OTHER = ["Accept", "X-Private-Hop", "X-Custom", "Cookie", "Authorization"]
_header_name = st.sampled_from(_HOP + _OWN + _OTHER).flatmap(
    lambda name: st.sampled_from([name, name.lower(), name.upper(), name.swapcase()])
)
_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@FUZZ
@given(st.lists(st.tuples(_header_name, _header_value), max_size=12))
def test_upstream_headers_never_carry_hop_by_hop_spoofed_or_connection_named_headers(
    headers: list[tuple[str, str]],
) -> None:
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    from gateway.proxy import Forwarder
    from middleware.base import REQUEST_ID

    forwarder = Forwarder(
        trusted_proxies=(),
        max_body=1024,
        strip_headers=frozenset({"X-User-Id"}),
        claim_headers=lambda claims: {},
    )
    request = make_mocked_request("GET", "/api/svc/x", headers=CIMultiDict(headers))
    request[REQUEST_ID] = "rid"
    sent = forwarder.upstream_headers(request)
    names = [name.lower() for name, _ in sent]
    named = {t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",") if t.strip()}
    assert not {name.lower() for name in _HOP} & set(names)
    assert not named & (set(names) - {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"})
    assert "x-user-id" not in names and "host" not in names and "forwarded" not in names
    assert names.count("x-request-id") == 1 and ("X-Request-ID", "rid") in sent
    assert names.count("x-forwarded-for") == 1  # the client's own (untrusted) copies dropped, ours added
    assert all("\r" not in value and "\n" not in value for _, value in sent)


# -- the cache key: what may and may not change it -------------------------------------------


@FUZZ
@given(
    url=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30),
    unkeyed=_header_value,
    host_a=_header_value,
    host_b=_header_value,
    subject=st.one_of(st.none(), _header_value),
)
def test_cache_key_ignores_unkeyed_headers_and_keeps_keyed_ones(
    url: str, unkeyed: str, host_a: str, host_b: str, subject: str | None
) -> None:
    from aiohttp.test_utils import make_mocked_request

    from gateway.stores import MemoryStore
    from middleware.cache import CacheConfig, CacheMiddleware

    cache = CacheMiddleware(CacheConfig(), store=MemoryStore(), scope="svc", target=lambda r: ("/", None))

    def digest(headers: dict[str, str], sub: str | None) -> str:
        request = make_mocked_request("GET", "/api/svc/x", headers=headers)
        return cache._digest(request, url, sub, [b"1", None, None])  # generations and Vary names as read

    base = digest({"Host": host_a}, subject)
    assert digest({"Host": host_a, "X-Unkeyed": unkeyed, "Accept": unkeyed}, subject) == base  # no poisoning
    assert (digest({"Host": host_b}, subject) == base) == (host_a == host_b)
    other = None if subject is not None else "someone"
    assert digest({"Host": host_a}, other) != base  # alice, bob and anonymous never share an entry


# -- the WebSocket relay's frame splitting (gateway/ws_relay.py) ----------------------------------


class _Sink:
    """The other side of a Peer: what it was sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.client = False
        self._empty_pings = 0

    def send(self, data: bytes) -> None:
        self.sent.append(bytes(data))


class _RelayStub:
    """What a Peer asks of its Relay, recorded."""

    max_message = 1 << 20

    def __init__(self) -> None:
        self.ends: list[object] = []
        self.last = 0.0

    def now(self) -> float:
        return 0.0

    def admit(self, now: float) -> bool:
        return True

    def end(self, end: object) -> None:
        self.ends.append(end)

    def closed(self, peer: object) -> None:
        pass


_client_frames = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([0x1, 0x2]), st.binary(max_size=300)),  # text / binary, whole
        st.tuples(st.just(0x9), st.binary(min_size=1, max_size=125)),  # a ping with a payload
    ),
    max_size=12,
)


@FUZZ
@given(frames=_client_frames, cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8))
def test_client_frames_pass_through_byte_for_byte_however_the_reads_split_them(
    frames: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    from gateway.ws_frames import frame
    from gateway.ws_relay import Peer

    stream = b"".join(frame(opcode, payload, masked=True) for opcode, payload in frames)
    relay = _RelayStub()
    peer = Peer(relay, client=True)  # type: ignore[arg-type]
    sink = _Sink()
    peer.other = sink  # type: ignore[assignment]
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    for start, end in itertools.pairwise(points):
        peer.received(stream[start:end])
    assert b"".join(sink.sent) == stream
    assert relay.ends == []
    assert not peer.buffer


@FUZZ
@given(frames=_client_frames, split=st.integers(min_value=0, max_value=5000))
def test_a_close_frame_ends_the_relay_after_every_frame_before_it_passed(
    frames: list[tuple[int, bytes]], split: int
) -> None:
    from gateway.ws_frames import CLOSE, frame
    from gateway.ws_relay import How, Peer

    before = b"".join(frame(opcode, payload, masked=True) for opcode, payload in frames)
    stream = before + frame(CLOSE, b"\x0f\xa0bye", masked=True) + frame(0x1, b"after", masked=True)
    relay = _RelayStub()
    peer = Peer(relay, client=True)  # type: ignore[arg-type]
    sink = _Sink()
    peer.other = sink  # type: ignore[assignment]
    cut = split % (len(stream) + 1)
    peer.received(stream[:cut])
    peer.received(stream[cut:])
    assert b"".join(sink.sent) == before
    assert [(end.how, end.code, end.reason) for end in relay.ends] == [(How.CLOSED, 4000, "bye")]  # type: ignore[attr-defined]


class _RateStub(_RelayStub):
    """A relay that admits ``allowed`` messages from the client, refuses the next, and admits
    again after that (its budget refilled, as time passing refills the real one)."""

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.allowed = allowed

    def admit(self, now: float) -> bool:
        self.allowed -= 1
        return self.allowed != -1


def test_nothing_a_client_sends_after_going_over_the_rate_is_passed_on_but_its_close_is_seen() -> None:
    from gateway.ws_frames import CLOSE, TEXT, frame
    from gateway.ws_relay import How, Peer

    relay = _RateStub(allowed=2)
    peer = Peer(relay, client=True)  # type: ignore[arg-type]
    sink = _Sink()
    peer.other = sink  # type: ignore[assignment]
    two = frame(TEXT, b"one", masked=True) + frame(TEXT, b"two", masked=True)
    peer.received(two + frame(TEXT, b"three", masked=True))
    peer.received(frame(TEXT, b"four", masked=True))  # a later read, before the relay closes
    peer.received(frame(CLOSE, b"\x03\xe8", masked=True))
    assert b"".join(sink.sent) == two
    assert [(end.how, end.code) for end in relay.ends] == [(How.POLICY, 1008), (How.CLOSED, 1000)]  # type: ignore[attr-defined]
    assert peer.closed


def test_after_a_broken_frame_nothing_more_of_that_side_is_read() -> None:
    from gateway.ws_frames import TEXT, frame
    from gateway.ws_relay import How, Peer

    relay = _RelayStub()
    peer = Peer(relay, client=True)  # type: ignore[arg-type]
    sink = _Sink()
    peer.other = sink  # type: ignore[assignment]
    peer.received(frame(TEXT, b"unmasked", masked=False))
    peer.received(frame(TEXT, b"fine", masked=True))
    assert sink.sent == []
    assert [(end.how, end.code) for end in relay.ends] == [(How.BROKE, 1002)]  # type: ignore[attr-defined]


@FUZZ
@given(data=st.binary(max_size=400), cut=st.integers(min_value=0, max_value=400), client=st.booleans())
def test_any_bytes_from_a_peer_pass_on_a_prefix_of_themselves_or_end_the_relay_never_raise(
    data: bytes, cut: int, client: bool
) -> None:
    from gateway.ws_relay import Peer

    relay = _RelayStub()
    peer = Peer(relay, client=client)  # type: ignore[arg-type]
    sink = _Sink()
    sink._empty_pings = 10**9  # every empty pong answers a ping: none is dropped, so what passes is a prefix
    peer.other = sink  # type: ignore[assignment]
    cut %= len(data) + 1
    peer.received(data[:cut])
    peer.received(data[cut:])
    passed = b"".join(sink.sent)
    assert data.startswith(passed)  # whole frames as they came, in order, nothing made up
    assert len(relay.ends) <= 1
    if relay.ends:
        assert len(peer.buffer) == 0
