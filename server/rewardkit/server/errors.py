"""Server exceptions and their mapping to HTTP: one JSON error schema everywhere.

Hierarchy (all carry ``type``, ``message``, ``field``)::

    ServerError (500, internal)
    ├── BadRequest (400/422, invalid_request)      includes core InputError
    ├── PayloadTooLarge (413)
    ├── Unauthorized (401)
    ├── NotFound (404)
    ├── Overloaded (429, Retry-After)
    └── NotReady (503, Retry-After)

Bare ``ValueError`` is NOT mapped to 400: an unexpected exception is our bug and answers 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rewardkit.core.errors import InputError

log = logging.getLogger(__name__)


class ServerError(Exception):
    status = 500
    type = "internal"
    close_connection = False  # answer with Connection: close (the server is going away)

    def __init__(self, message: str, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after


class BadRequest(ServerError):
    status = 422
    type = "invalid_request"


class PayloadTooLarge(ServerError):
    status = 413
    type = "payload_too_large"


class Unauthorized(ServerError):
    status = 401
    type = "unauthorized"


class Forbidden(ServerError):
    status = 403
    type = "forbidden"


class NotFound(ServerError):
    status = 404
    type = "not_found"


class Overloaded(ServerError):
    status = 429
    type = "overloaded"


class NotReady(ServerError):
    status = 503
    type = "not_ready"


def error_body(type_: str, message: str, field: str | None = None) -> dict[str, dict[str, str | None]]:
    return {"error": {"type": type_, "message": message, "field": field}}


def error_response(exc: ServerError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if exc.close_connection:
        headers["Connection"] = "close"
    return JSONResponse(error_body(exc.type, exc.message, exc.field), status_code=exc.status, headers=headers)


# Names users send for our fields (from other APIs and trainers), and the field they mean.
FIELD_ALIASES = {
    "queries": "query", "completion": "response", "output": "response", "answer": "response", "reply": "response",
    "question": "prompt", "instruction": "prompt", "inputs": "input", "texts": "text", "item": "items",
    "conversation": "messages", "messages_list": "messages", "activations": "use_activation",
}
KNOWN_FIELDS = ("items", "prompt", "response", "messages", "text", "model", "dense", "beta", "encoding_format",
                "truncate", "response_token_spans", "query", "prompts", "labels", "input", "use_activation",
                "activation", "add_special_tokens", "truncate_prompt_tokens", "request_id", "task")


def field_hint(errs: list[Any], body: Any) -> str:
    """" (did you mean 'query'?)" and the like, for a wrong field name; "" when nothing fits."""
    import difflib

    for e in errs:
        loc, kind = tuple(e.get("loc", ())), e.get("type")
        name = loc[-1] if loc else None
        if kind == "extra_forbidden" and isinstance(name, str):
            if name in ("chosen", "rejected"):
                return (" (preference pairs are not an item: send chosen and rejected as two items, "
                        "{prompt, response} each, or score the file with `rewardkit score`)")
            alt = FIELD_ALIASES.get(name) or next(iter(difflib.get_close_matches(name, KNOWN_FIELDS, 1, 0.75)), None)
            if alt:
                return f" (unknown field {name!r}: did you mean {alt!r}?)"
    for e in errs:  # a required field is missing: did the body carry it under another name?
        loc = tuple(e.get("loc", ()))
        if e.get("type") == "missing" and loc and isinstance(loc[-1], str) and isinstance(body, dict):
            for k in body:
                if FIELD_ALIASES.get(k) == loc[-1] or difflib.get_close_matches(k, [loc[-1]], 1, 0.75):
                    return f" (the body has {k!r}: did you mean {loc[-1]!r}?)"
    return ""


def _loc_to_field(loc: tuple[object, ...]) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if i == 0 and p in ("body", "query", "path"):  # the location kind, not a field (a body field may be "query")
            continue
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError) -> JSONResponse:
        if exc.status >= 500 and exc.status != 503:
            log.error("internal error: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return error_response(BadRequest(exc.message, exc.field))

    from starlette.requests import ClientDisconnect

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # The client went away mid-body (a streamed R2M request): not a server error. 499 is nginx's "client closed
        # request"; nobody reads it, but the metrics and the log then say what happened instead of a 500 traceback.
        log.info("client disconnected mid-request path=%s", request.url.path)
        return JSONResponse(error_body("client_closed_request", "the client disconnected before the body was read",
                                       "body"), status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # not JSON at all: 400, as docs/operations.md says
            loc = first.get("loc", ())
            at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            ctx = first.get("ctx")
            err = ctx.get("error", "") if isinstance(ctx, dict) else ""
            return JSONResponse(error_body("invalid_request", f"request body is not valid JSON{at}: {err}".rstrip(": "),
                                           "body"), status_code=400)
        field = _loc_to_field(tuple(first.get("loc", ("body",))))
        msg = f"{field}: {first.get('msg', 'invalid')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more errors)"
        msg += field_hint(list(errs), getattr(exc, "body", None))
        return JSONResponse(error_body("invalid_request", msg, field), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type"}.get(exc.status_code, "invalid_request")
        field = "body" if exc.status_code in (400, 413, 415) else None
        return JSONResponse(error_body(type_, str(exc.detail), field), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)
