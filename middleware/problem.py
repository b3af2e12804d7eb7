"""Errors the gateway answers itself, as RFC 9457 problem+json (DESIGN §5).

Anything in the chain raises :class:`Problem`; :class:`ProblemMiddleware` renders it
once. aiohttp's own ``HTTPException`` is rendered the same way, and any other exception
becomes a logged 500, so a client never sees a traceback or an HTML error page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus

import orjson
from aiohttp import hdrs, web

from .base import OUTCOME, REQUEST_ID, Handler

__all__ = ("PROBLEM_JSON", "Problem", "ProblemMiddleware", "problem_body", "problem_response")

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_NO_BODY_STATUSES = frozenset({204, 304})
_PHRASES = {status.value: status.phrase for status in HTTPStatus}  # a dict: HTTPStatus(n) costs an enum lookup


class Problem(Exception):
    """An error the gateway answers itself; rendered once as RFC 9457 problem+json."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str = "about:blank",
    ) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.type = type
        self.title = title or _phrase(status)
        self.headers = dict(headers or {})


def _phrase(status: int) -> str:
    return _PHRASES.get(status, "Error")


def problem_body(problem: Problem, request_id: str | None) -> bytes:
    """The RFC 9457 JSON body for ``problem``."""
    body = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "request_id": request_id,
    }
    try:  # orjson: a 429 or 404 costs about a tenth less than with the standard library's encoder
        return orjson.dumps(body)
    except TypeError:  # a lone surrogate (undecodable bytes of a path or header quoted in the detail)
        return json.dumps(body).encode()


def problem_response(problem: Problem, request_id: str | None) -> web.Response:
    """The problem+json response for ``problem``."""
    response = web.Response(
        status=problem.status,
        body=problem_body(problem, request_id),
        content_type=PROBLEM_JSON,
        headers=problem.headers,
    )
    response.headers[hdrs.CACHE_CONTROL] = "no-store"
    return response


@web.middleware
class ProblemMiddleware:
    """Render :class:`Problem`, aiohttp HTTP errors and unexpected exceptions as problem+json."""

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return self.render(request, exc)

    def render(self, request: web.Request, exc: Exception) -> web.Response:
        """The problem+json response for ``exc``, which a handler of ``request`` raised; ``exc``
        itself is raised again when it is no problem to tell (a redirect) or too late to tell (the
        status line is on the wire). Call it from an ``except`` block (the gateway's request-id
        middleware does, as its ``errors``, to spare the chain this middleware's frame)."""
        if isinstance(exc, Problem):
            return self._render(request, exc)
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc  # redirects and the like are not problems
            headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
            detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            return self._render(request, Problem(exc.status, detail or exc.reason, headers=headers))
        if request[OUTCOME].status is not None:
            raise exc  # the status line is already on the wire: nothing left to tell the client
        logger.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
        request[OUTCOME].error = type(exc).__name__
        return self._render(request, Problem(500, "The gateway failed to handle this request"))

    @staticmethod
    def _render(request: web.Request, problem: Problem) -> web.Response:
        outcome = request.get(OUTCOME)
        if outcome is not None and outcome.error is None:
            outcome.error = problem.detail
        return problem_response(problem, request.get(REQUEST_ID))
