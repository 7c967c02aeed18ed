"""The app factory: builds everything and hangs it on ``app.state.rk``; no module-level state.

The model loads in a background thread after start-up so that ``/health`` answers at once and ``/ready`` says 503
until the model is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.server import compat, monitoring, routes
from rewardkit.server.deps import AppState, check_key
from rewardkit.server.errors import error_body, install_error_handlers
from rewardkit.server.metrics import Metrics
from rewardkit.server.protocol import MAX_ITEMS
from rewardkit.server.r2m import routes as r2m_routes
from rewardkit.server.serving import RewardService
from rewardkit.server.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


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
        keys = settings.key_values() if scope["type"] == "http" else []
        path = scope.get("path", "")
        if not keys or path in self.OPEN or (path == "/metrics" and not settings.metrics_require_auth) or (
                path in self.DOCS and not settings.docs_require_auth):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if check_key(keys, header):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body("unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                     None)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def build_service(state: AppState, rm: RewardModel) -> RewardService:
    service = RewardService(state.settings, rm, metrics=state.metrics)
    service.scheduler.start()
    return service


def create_app(settings: Settings | None = None, rm: RewardModel | None = None) -> FastAPI:
    """Build the app. ``rm``: an already-loaded model (tests); otherwise ``settings.model`` loads at start-up."""
    settings = settings or Settings()
    state = AppState(settings=settings)
    # metrics on the app's own registry, before the service exists (the service records batches and rewards)
    state.metrics = Metrics(CollectorRegistry())
    state.metrics.registry.register(monitoring.OperationsCollector(state))

    async def _load() -> None:
        try:
            model = rm if rm is not None else await asyncio.to_thread(
                load_reward_model, settings.model, device=settings.device, dtype=settings.dtype,
                trust_remote_code=settings.trust_remote_code, reward_token_rule=settings.reward_token_rule)
            state.service = build_service(state, model)
            await monitoring.attach_service(state)  # Redis score cache + latest published head, when configured
            await r2m_routes.attach(state)  # R2M store, feedback queue, background updater (rewardkit.server.r2m)
            log.info("ready model=%s head_version=%s head=%s", model.model_id, model.head_version,
                     ("trained" + (f" ({model.meta.description})" if model.meta.description else ""))
                     if model.meta.trained else "UNTRAINED (scores carry no preference signal)")
        except Exception as exc:  # say why where the user looks: /ready, the log's last line, the exit status
            from rewardkit.core.errors import RewardKitError

            state.load_error = str(exc) if isinstance(exc, RewardKitError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, RewardKitError):
                log.error("model load failed: %s", state.load_error)
                log.debug("model load failed", exc_info=True)
            else:  # not one of ours: the traceback is for a bug report
                log.exception("model load failed")
            if state.on_fatal is not None:
                state.on_fatal()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await monitoring.start_redis(state)  # no-op without settings.redis_url; a down Redis does not block
        if rm is not None:
            await _load()
            loader = None
        else:
            loader = asyncio.create_task(_load())
        try:
            yield
        finally:
            state.shutting_down = True
            if loader is not None and not loader.done():
                loader.cancel()
            await r2m_routes.detach(state)  # stop the updater after its update in flight is on disk
            if state.service is not None:
                await state.service.scheduler.stop(drain_timeout=settings.grace_period_s)
            await monitoring.stop_redis(state)
            log.info("shutdown complete")

    app = FastAPI(title="rewardkit", version="0.1.0", lifespan=lifespan,
                  description="Reward-model server: scalar and ABC dense rewards, R2M online alignment.")
    app.state.rk = state
    install_error_handlers(app)
    app.include_router(routes.open_router)
    app.include_router(routes.router)
    app.include_router(compat.router)
    app.include_router(monitoring.router)
    app.include_router(r2m_routes.router)
    app.add_middleware(DisconnectMiddleware)  # type: ignore[arg-type]  # inside the body limit and the metrics
    app.add_middleware(AuthMiddleware, state=state)  # type: ignore[arg-type]  # before any body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,  # type: ignore[arg-type]
                       exempt_prefixes=("/v1/r2m/feedback", "/v1/r2m/rewards"))  # r2m_max_stream_bytes applies
    app.add_middleware(monitoring.RequestMetricsMiddleware, state=state)  # type: ignore[arg-type]  # outermost: sees 413s
    return app
