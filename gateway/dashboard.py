"""The live dashboard on the admin listener (DESIGN §8): one page, fed over server-sent events.

``/`` serves ``dashboard.html`` (no CDN, no build step: plain HTML, CSS and a little
JavaScript in one file shipped with the package). ``/events`` sends one JSON frame a
second, computed from two successive metric snapshots: requests/s and p50/p99 per
service, the status mix, cache hit ratio, 429s, upstream health, open WebSockets and
the last reload. Under ``--workers`` the snapshot is the aggregate of every worker.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from importlib import resources
from typing import Any

from aiohttp import web

from .metrics import METRICS, Snapshot, quantile
from .reload import RELOADER

__all__ = ("INTERVAL", "frame", "install")

INTERVAL = 1.0  # seconds between two frames
_PAGE = web.AppKey("dashboard_page", bytes)


def install(admin: web.Application, gateway: web.Application) -> None:
    """Serve the page and its event stream on ``admin``, with numbers from ``gateway``."""
    admin[_PAGE] = resources.files("gateway").joinpath("dashboard.html").read_bytes()
    admin.router.add_get("/", page)
    admin.router.add_get("/events", functools.partial(events, gateway=gateway))


async def page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_PAGE], content_type="text/html", charset="utf-8")


async def events(request: web.Request, *, gateway: web.Application) -> web.StreamResponse:
    """``text/event-stream``: a ``data:`` frame every :data:`INTERVAL` seconds until the client leaves."""
    try:
        interval = min(max(float(request.query.get("interval", INTERVAL)), 0.2), 10.0)
    except ValueError:
        raise web.HTTPBadRequest(text="interval: expected seconds, e.g. 1 or 0.5") from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    before, at = gateway[METRICS].snapshot(), time.monotonic()
    try:
        await response.write(b"retry: 2000\n\n")
        while True:
            await asyncio.sleep(interval)
            now, now_at = gateway[METRICS].snapshot(), time.monotonic()
            data = frame(before, now, now_at - at, gateway)
            await response.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
            before, at = now, now_at
    except ConnectionResetError:  # the page went away
        pass
    return response


def frame(before: Snapshot, now: Snapshot, seconds: float, gateway: web.Application | None = None) -> dict[str, Any]:
    """What changed between two snapshots ``seconds`` apart, as the page shows it."""
    seconds = max(seconds, 1e-6)
    requests_now = now.by("gateway_requests_total", "service")
    requests_before = before.by("gateway_requests_total", "service")
    services: dict[str, dict[str, Any]] = {}
    for service, total in sorted(requests_now.items()):
        delta = total - requests_before.get(service, 0.0)
        buckets = _buckets(now, service)
        old = _buckets(before, service)
        window = {le: count - old.get(le, 0.0) for le, count in buckets.items()}
        if not any(window.values()):  # nothing in this window: the whole run is the best we know
            window = buckets
        p50, p99 = quantile(0.5, window), quantile(0.99, window)
        services[service] = {
            "rps": round(delta / seconds, 2),
            "total": int(total),
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "upstream_errors": int(now.total("gateway_upstream_errors_total", service=service)),
        }
    statuses = _delta(now.by("gateway_requests_total", "status"), before.by("gateway_requests_total", "status"))
    mix: dict[str, int] = {}
    for status, count in statuses.items():
        mix[f"{status[0]}xx"] = mix.get(f"{status[0]}xx", 0) + int(count)
    cache = now.by("gateway_cache_total", "result")
    lookups = sum(cache.values())
    hits = cache.get("hit", 0.0) + cache.get("stale", 0.0)
    data: dict[str, Any] = {
        "time": time.time(),
        "rps": round(sum(_delta(requests_now, requests_before).values()) / seconds, 2),
        "services": services,
        "status_mix": dict(sorted(mix.items())),
        "cache": {"hit_ratio": round(hits / lookups, 3) if lookups else None, "lookups": int(lookups)},
        "ratelimited": {
            "total": int(now.total("gateway_ratelimit_rejected_total")),
            "per_second": round(
                (now.total("gateway_ratelimit_rejected_total") - before.total("gateway_ratelimit_rejected_total"))
                / seconds,
                2,
            ),
        },
        "websockets": int(now.total("gateway_websocket_connections")),
        "upstreams": [
            {"service": s.labels["service"], "upstream": s.labels["upstream"], "healthy": s.value >= 1}
            for s in now.samples.get("gateway_upstream_healthy", ())
        ],
        "reloads": now.by("gateway_config_reloads_total", "result"),
        "last_reload": _last_reload(gateway),
    }
    return data


def _buckets(snapshot: Snapshot, service: str) -> dict[float, float]:
    result: dict[float, float] = {}
    for sample in snapshot.samples.get("gateway_request_duration_seconds_bucket", ()):
        if sample.labels.get("service") == service:
            le = float(sample.labels["le"])
            result[le] = result.get(le, 0.0) + sample.value
    return result


def _delta(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in now.items() if v - before.get(k, 0.0) > 0}


def _last_reload(gateway: web.Application | None) -> dict[str, Any] | None:
    reloader = gateway.get(RELOADER) if gateway is not None else None
    if reloader is None:
        return None
    status = reloader.status
    return {
        "version": status.version,
        "loaded_at": status.loaded_at,
        "result": status.last_result,
        "at": status.last_attempt_at,
        "errors": status.errors[:3],
    }
