"""The problem+json body every error the gateway answers itself carries (RFC 9457)."""

from __future__ import annotations

import json

from middleware.problem import Problem, problem_body


def test_a_problem_body_holds_the_rfc_9457_members_and_the_request_id() -> None:
    body = json.loads(problem_body(Problem(429, "Rate limit exceeded"), "abc123"))
    assert body == {
        "type": "about:blank",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Rate limit exceeded",
        "request_id": "abc123",
    }


def test_a_status_without_a_standard_phrase_is_titled_error() -> None:
    assert json.loads(problem_body(Problem(599, "odd"), None))["title"] == "Error"


def test_a_given_title_wins_over_the_status_phrase() -> None:
    assert json.loads(problem_body(Problem(404, "x", title="No such service"), None))["title"] == "No such service"


def test_a_non_ascii_detail_is_utf8_json() -> None:
    body = problem_body(Problem(404, "No service named 'café'"), None)
    assert json.loads(body.decode("utf-8"))["detail"] == "No service named 'café'"


def test_a_detail_quoting_undecodable_bytes_still_renders() -> None:
    # bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape); plain JSON
    # encoders refuse them, so they are written as \\u escapes instead of failing the answer
    detail = "bad path /caf\udce9"
    assert json.loads(problem_body(Problem(400, detail), "r1"))["detail"] == detail
