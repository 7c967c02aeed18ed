"""Middleware for Ray Serve's HTTP proxy: a request whose replica died gets 503 + Retry-After, not a bare 500.

When a replica process dies with requests in flight, Serve's proxy ends those requests without sending a response
(it only answers 408, 429 and 503 itself), and uvicorn then sends ``500 Internal Server Error``. A 500 tells a
client the request is bad or the server broken; what happened is that one replica is gone and another will answer,
which is a 503 (the rewardkit client retries those). This middleware, loaded into the proxy through Serve's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook (``launch`` sets it before starting a local Ray; on a cluster it
goes in the nodes' environment, see docs/deploy.md), answers such requests with 503. A response the app sent,
whatever its status, passes through untouched.

Imported in the proxy actor: nothing here imports torch or the rest of rewardkit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

CALLBACK = "rewardkit.server.ray_serve.proxy:middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
RETRY_AFTER_S = 1

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class ReplicaLostMiddleware:
    """503 + Retry-After for an HTTP request that ended with no response started."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            log.warning("request ended without a response (its replica died?): answering 503", exc_info=True)
        if not started:
            await _unavailable(send)


async def _unavailable(send: Callable[[Message], Awaitable[None]]) -> None:
    body = json.dumps({"error": {"type": "unavailable", "message": "the replica serving this request stopped "
                                 "before it answered; retry (another replica will take it)", "field": None}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Any]:
    """The callback Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware)]
