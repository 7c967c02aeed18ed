"""parse_error: one test per status mapping, plus non-JSON and odd bodies."""

from __future__ import annotations

import builtins

import pytest

from rewardkit.client import errors as E


def body(type_: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": type_, "message": message, "field": field}}


@pytest.mark.parametrize(
    ("status", "type_", "cls"),
    [
        (400, "invalid_request", E.BadRequestError),
        (422, "invalid_request", E.BadRequestError),
        (401, "unauthorized", E.AuthenticationError),
        (403, "unauthorized", E.AuthenticationError),
        (404, "not_found", E.NotFoundError),
        (413, "payload_too_large", E.PayloadTooLargeError),
        (429, "overloaded", E.OverloadedError),
        (503, "not_ready", E.NotReadyError),
        (500, "internal", E.ServerError),
        (502, "internal", E.ServerError),
        (504, "internal", E.ServerError),
    ],
)
def test_status_mapping(status: int, type_: str, cls: type[E.APIError]) -> None:
    err = E.parse_error(status, body(type_, "why", "items[0].text"))
    assert type(err) is cls
    assert (err.status, err.type, err.message, err.field) == (status, type_, "why", "items[0].text")
    assert err.body == body(type_, "why", "items[0].text")
    assert "why" in str(err) and "items[0].text" in str(err)


def test_unknown_4xx_is_plain_api_error() -> None:
    err = E.parse_error(405, body("method_not_allowed", "use POST"))
    assert type(err) is E.APIError and err.type == "method_not_allowed"


def test_status_decides_class_even_if_type_disagrees() -> None:
    assert type(E.parse_error(429, body("internal", "x"))) is E.OverloadedError


def test_json_bytes_body() -> None:
    err = E.parse_error(413, b'{"error": {"type": "payload_too_large", "message": "257 items > 256"}}')
    assert type(err) is E.PayloadTooLargeError
    assert err.message == "257 items > 256" and err.field is None


def test_non_json_html_body() -> None:
    html = b"<html><body>502 Bad Gateway</body></html>"
    err = E.parse_error(502, html)
    assert type(err) is E.ServerError
    assert err.type == "internal" and err.message == html.decode() and err.body == html.decode()


def test_non_json_body_is_truncated() -> None:
    err = E.parse_error(500, "x" * 10_000)
    assert len(err.message) == 500


def test_empty_body_uses_status_default_type() -> None:
    err = E.parse_error(503, b"")
    assert type(err) is E.NotReadyError and err.type == "not_ready" and "empty body" in err.message


def test_invalid_utf8_body() -> None:
    err = E.parse_error(500, b"\xff\xfe oops")
    assert "oops" in err.message


def test_fastapi_detail_shape() -> None:
    err = E.parse_error(422, {"detail": [{"loc": ["body", "items"], "msg": "field required"}]})
    assert (
        type(err) is E.BadRequestError and err.type == "invalid_request" and "field required" in err.message
    )


def test_error_as_plain_string() -> None:
    err = E.parse_error(401, {"error": "Invalid API key"})
    assert type(err) is E.AuthenticationError and err.message == "Invalid API key"


def test_unrecognised_json_shape() -> None:
    err = E.parse_error(500, [1, 2])
    assert type(err) is E.ServerError and err.body == [1, 2]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0.25", 0.25),
        ("0", 0.0),
        ("-1", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after(value: str, expected: float | None) -> None:
    err = E.parse_error(429, body("overloaded", "full"), headers={"retry-after": value})
    assert err.retry_after == expected


def test_retry_after_absent() -> None:
    assert E.parse_error(429, b"").retry_after is None
    assert E.parse_retry_after(None) is None


def test_hierarchy() -> None:
    for cls in (
        E.BadRequestError,
        E.AuthenticationError,
        E.NotFoundError,
        E.PayloadTooLargeError,
        E.OverloadedError,
        E.NotReadyError,
        E.ServerError,
    ):
        assert issubclass(cls, E.APIError) and issubclass(cls, E.RewardKitError)
    assert issubclass(E.TimeoutError, E.TransportError) and issubclass(E.TimeoutError, builtins.TimeoutError)
    assert issubclass(E.TransportError, E.RewardKitError) and not issubclass(E.TransportError, E.APIError)
    assert issubclass(E.ResponseFormatError, E.RewardKitError) and not issubclass(
        E.ResponseFormatError, E.APIError
    )
    err = E.TimeoutError("slow", url="http://a", phase="connect")
    assert (err.url, err.phase, str(err)) == ("http://a", "connect", "slow")


def test_docstring_lists_every_error_class() -> None:
    doc = E.__doc__ or ""
    for name in E.__all__:
        if name[0].isupper():
            assert name in doc, name
