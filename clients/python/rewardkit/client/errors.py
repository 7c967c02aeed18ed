"""Exceptions raised by :mod:`rewardkit.client`.

Every exception the client raises on purpose derives from :class:`RewardKitError`::

    RewardKitError
    ├── APIError(status, type, message, field, body)   the server answered 4xx/5xx
    │   ├── BadRequestError        400, 422  invalid_request     never retried
    │   ├── AuthenticationError    401, 403  unauthorized        never retried
    │   ├── NotFoundError          404       not_found           never retried
    │   ├── PayloadTooLargeError   413       payload_too_large   never retried
    │   ├── OverloadedError        429       overloaded          retried, honours Retry-After
    │   ├── NotReadyError          503       not_ready           retried, honours Retry-After
    │   └── ServerError            500 and other 5xx, internal   never retried
    ├── TransportError       no HTTP answer (refused, reset, DNS)  retried, fails over to another URL
    │   └── TimeoutError     a phase took too long; retried only when the *connect* phase timed out
    │                        (also a builtin ``TimeoutError``, so ``except TimeoutError`` catches it)
    └── ResponseFormatError  the server answered 2xx with a body the client cannot read

A 4xx status that is none of the above (405, 409, ...) gives a plain :class:`APIError`.
Errors raised after retries carry ``attempts``: how many requests were sent in all.

Calling the client wrongly (mismatched list lengths, an item with no text) raises ``ValueError`` or
``TypeError`` before any request is sent, naming the argument at fault.

Example::

    try:
        client.score(texts=["..."])
    except OverloadedError as err:   # still overloaded after max_retries
        print(err.status, err.message, err.retry_after, err.attempts)
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ResponseFormatError",
    "RewardKitError",
    "ServerError",
    "TimeoutError",
    "TransportError",
    "parse_error",
]

_MAX_MESSAGE_CHARS = 500


class RewardKitError(Exception):
    """Base class of every error raised by the rewardkit client."""

    attempts: int = 1


class APIError(RewardKitError):
    """The server answered with an HTTP error status.

    Attributes:
        status: HTTP status code.
        type: the ``error.type`` the server sent (``"overloaded"``, ...), or a type derived from the
            status when the body was not the rewardkit error shape.
        message: the server's ``error.message`` (or the start of a non-JSON body).
        field: the request field at fault, when the server named one.
        body: the decoded JSON body, or the raw text when it was not JSON.
        retry_after: seconds from the ``Retry-After`` header, if any.
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        field: str | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {message}" + (f" (field: {field})" if field else ""))
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.body = body
        self.retry_after = retry_after


class BadRequestError(APIError):
    """400/422: the request was invalid; ``field`` names what to fix."""


class AuthenticationError(APIError):
    """401/403: missing or wrong API key (``api_key=`` or ``REWARDKIT_API_KEY``)."""


class NotFoundError(APIError):
    """404: unknown path or model id."""


class PayloadTooLargeError(APIError):
    """413: too many items or too long a text; lower ``max_items_per_request``."""


class OverloadedError(APIError):
    """429: the server's queue is full; retried after ``Retry-After`` seconds."""


class NotReadyError(APIError):
    """503: the server is still loading its model; retried after ``Retry-After`` seconds."""


class ServerError(APIError):
    """500 and other 5xx: a bug or crash on the server; not retried (it would likely repeat)."""


class TransportError(RewardKitError):
    """No HTTP answer: connection refused or reset, DNS failure, protocol error.

    Attributes:
        url: the URL the request was sent to.
    """

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class TimeoutError(TransportError, builtins.TimeoutError):  # noqa: A001 - deliberate, like httpx
    """A request phase exceeded its timeout.

    Attributes:
        phase: ``"connect"``, ``"read"``, ``"write"`` or ``"pool"``. Only connect timeouts are retried:
            a read timeout means the server may still be working, and resending would add load.
    """

    def __init__(self, message: str, url: str | None = None, phase: str = "read") -> None:
        super().__init__(message, url)
        self.phase = phase


class ResponseFormatError(RewardKitError):
    """A 2xx response whose body does not follow the API contract (a server/client version mismatch)."""


_BY_STATUS: dict[int, tuple[type[APIError], str]] = {
    400: (BadRequestError, "invalid_request"),
    401: (AuthenticationError, "unauthorized"),
    403: (AuthenticationError, "unauthorized"),
    404: (NotFoundError, "not_found"),
    413: (PayloadTooLargeError, "payload_too_large"),
    422: (BadRequestError, "invalid_request"),
    429: (OverloadedError, "overloaded"),
    503: (NotReadyError, "not_ready"),
}


def _decode_body(payload: Any) -> Any:
    """Turn bytes/str into JSON when they are JSON, else into (decoded) text."""
    if isinstance(payload, bytes | bytearray):
        payload = bytes(payload).decode("utf-8", errors="replace")
    if isinstance(payload, str):
        try:
            return json.loads(payload)
        except ValueError:
            return payload
    return payload


def _message_from(body: Any, status: int) -> tuple[str | None, str, str | None]:
    """Return (type, message, field) from any body shape the server (or a proxy) may send."""
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):
            field = err.get("field")
            return (
                str(err["type"]) if err.get("type") is not None else None,
                str(err.get("message") or f"HTTP {status}"),
                str(field) if field is not None else None,
            )
        if isinstance(err, str):  # {"error": "..."} (OpenAI-style proxies, some gateways)
            return None, err, None
        if "detail" in body:  # FastAPI's default shape
            return None, str(body["detail"])[:_MAX_MESSAGE_CHARS], None
        return None, json.dumps(body)[:_MAX_MESSAGE_CHARS], None
    if isinstance(body, str) and body.strip():
        return None, body.strip()[:_MAX_MESSAGE_CHARS], None
    return None, f"HTTP {status} with an empty body", None


def parse_error(
    status: int,
    payload: Any,
    *,
    headers: Mapping[str, str] | None = None,
) -> APIError:
    """Build the typed error for an HTTP error response.

    Args:
        status: the HTTP status code (>= 400).
        payload: the response body: a decoded JSON object, or raw ``bytes``/``str`` (JSON or not,
            e.g. an HTML page from a proxy).
        headers: response headers; ``Retry-After`` (in seconds) is read from them.

    Example::

        >>> err = parse_error(429, b'{"error": {"type": "overloaded", "message": "queue full"}}')
        >>> type(err).__name__, err.message
        ('OverloadedError', 'queue full')
    """
    body = _decode_body(payload)
    err_type, message, field = _message_from(body, status)
    if status in _BY_STATUS:
        cls, default_type = _BY_STATUS[status]
    elif status >= 500:
        cls, default_type = ServerError, "internal"
    else:
        cls, default_type = APIError, "http_error"
    return cls(
        status=status,
        type=err_type or default_type,
        message=message,
        field=field,
        body=body,
        retry_after=parse_retry_after(headers),
    )


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Read ``Retry-After`` as non-negative seconds; an HTTP-date or garbage gives ``None``."""
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return seconds
