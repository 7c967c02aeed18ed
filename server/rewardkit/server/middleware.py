"""The app's ASGI middleware, outermost first as ``create_app`` adds them:

- `ReplicaHeaderMiddleware` (outermost of all) puts ``x-rewardkit-replica`` on every response, errors included, so
  a client behind a router (Ray Serve, a load balancer) sees which replica answered.
- `RequestMetricsMiddleware` counts every HTTP request by route *template* (``/v1/rewards``, never a raw path;
  unmatched paths count as ``other``) and status, and times it (``rewardkit_requests_total``,
  ``rewardkit_request_duration_seconds``); it sees the 413s and 401s of the layers inside it.
- `BodyLimitMiddleware`: 413 before a body over ``max_body_bytes`` is buffered.
- `AuthMiddleware`: 401 before the body is read, when API keys are set; it also reads the run headers
  (``x-rewardkit-run``, ``x-rewardkit-step``: 422 when malformed) into ``runs.RUN`` and the key's run binding into
  ``runs.RUN_PREFIX``.
- `DisconnectMiddleware`: cancels a handler whose client went away (499 in the metrics).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rewardkit.server.deps import AppState, matched_key
from rewardkit.server.errors import BadRequest, error_body
from rewardkit.server.protocol import MAX_ITEMS
from rewardkit.server.runs import RUN, RUN_PREFIX, tag_from_headers

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class ReplicaHeaderMiddleware:
    """Add ``x-rewardkit-replica: <replica_id>`` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (b"x-rewardkit-replica", replica_id.encode("latin-1", "replace"))

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, tagged)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 before they are buffered (Content-Length or streamed count)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_prefixes = exempt_prefixes  # streamed routes that enforce their own limits (R2M frames)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.exempt_prefixes or ("\0",)):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        seen = 0
        rejected = False

        async def limited() -> Message:
            # A streamed (chunked) body over the limit: answer 413 here and tell the app the client is gone. (Raising
            # instead would surface in FastAPI's body parsing as a generic 400.)
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    rejected = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            if not rejected:  # the 413 already went out; drop what the app answers to the "disconnect"
                await send(msg)

        await self.app(scope, limited, guarded_send)

    async def _reject(self, send: Callable[[Message], Awaitable[None]]) -> None:
        import json

        body = json.dumps(error_body("payload_too_large",
                                     f"request body exceeds max_body_bytes={self.max_bytes}", "body")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class DisconnectMiddleware:
    """Cancel a request's handler when its client disconnects after sending the body.

    Neither uvicorn nor Starlette cancels a plain endpoint when the client goes away, so an abandoned request would
    still reach the model. Here a watcher waits on ``receive()`` once the body is read (uvicorn answers it only on a
    disconnect or when the response is complete); on a disconnect before the response is complete the handler task is
    cancelled, which cancels its queued futures, and the scheduler drops them before the model. The metrics layer
    outside sees status 499 (nginx's "client closed request") rather than a 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body_done = asyncio.Event()
        gone = asyncio.Event()
        started = finished = False

        async def wrapped_receive() -> Message:
            if body_done.is_set():  # the watcher owns receive() now
                await gone.wait()
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.disconnect":
                gone.set()
            elif not msg.get("more_body", False):
                body_done.set()
            return msg

        async def wrapped_send(msg: Message) -> None:
            nonlocal started, finished
            if msg["type"] == "http.response.start":
                started = True
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                finished = True
            await send(msg)

        handler = asyncio.ensure_future(self.app(scope, wrapped_receive, wrapped_send))

        async def watch() -> None:
            await body_done.wait()
            await receive()  # http.disconnect: the client left, or the response is complete
            gone.set()
            if not finished and not handler.done():
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if (me is not None and me.cancelling()) or not gone.is_set() or finished:
                raise  # our own task is being cancelled (server shutdown): not a client disconnect
            log.info("client disconnected; request dropped path=%s", scope.get("path"))
            if not started:
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            if not handler.done():
                handler.cancel()


class AuthMiddleware:
    """With API keys configured, refuse a request without a valid key with 401 *before* its body is read: FastAPI
    parses (and validates) a JSON body before it runs dependencies, so a 30 MB body without a key used to cost
    seconds of the event loop before its 401. Route dependencies still check too."""

    OPEN = ("/health", "/ready")
    DOCS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        settings = self.state.settings
        MAX_ITEMS.set(settings.max_items_per_request)  # read by the request schemas' count checks (this task only)
        if scope["type"] == "http":
            try:
                RUN.set(tag_from_headers(scope.get("headers", [])))  # this request's task only
            except BadRequest as exc:
                await self._answer(send, 422, error_body(exc.type, exc.message, exc.field))
                return
        keys = settings.key_values() if scope["type"] == "http" else []
        path = scope.get("path", "")
        if not keys or path in self.OPEN or (path == "/metrics" and not settings.metrics_require_auth) or (
                path in self.DOCS and not settings.docs_require_auth):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        key = matched_key(keys, header)
        if key is not None:
            RUN_PREFIX.set(settings.key_run_prefix(key))
            await self.app(scope, receive, send)
            return
        await self._answer(send, 401, error_body(
            "unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'", None),
            [(b"www-authenticate", b"Bearer")])

    @staticmethod
    async def _answer(send: Callable[[Message], Awaitable[None]], status: int, payload: dict[str, Any],
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(extra or [])]})
        await send({"type": "http.response.body", "body": body})


class RequestMetricsMiddleware:
    """Count and time every HTTP request by route template and status (see module docstring)."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or self.state.metrics is None:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception before the response started is a 500 to the client

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.state.metrics.observe_request(endpoint, status, time.perf_counter() - t0)
