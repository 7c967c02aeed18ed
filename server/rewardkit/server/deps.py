"""Typed FastAPI dependencies: the service, API-key checks.

The dependencies are ``async def`` on purpose: they do no I/O, and FastAPI runs a plain ``def`` dependency in its
thread pool, a thread hand-off per request and per dependency that cost ~20% of the event loop's time under load
(py-spy on the tiny-model serving benchmark). ``check_service`` / ``check_api_key`` are the synchronous cores for
code that is not a dependency.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import Request

from rewardkit.server.errors import NotReady, Unauthorized
from rewardkit.server.settings import Settings

if TYPE_CHECKING:  # the state holds them; they do not import this module's state at run time
    from rewardkit.server.compose.serving import ModelRegistry
    from rewardkit.server.metrics import Metrics
    from rewardkit.server.r2m.serving import R2MService
    from rewardkit.server.service import RewardService
    from rewardkit.server.state import RedisState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AppState:
    """Everything the app owns, hung on ``app.state.rk`` (no module-level state)."""

    settings: Settings
    replica_id: str = ""  # this replica's name: the x-rewardkit-replica header, its name in Redis (create_app sets it)
    service: RewardService | None = None  # once the model is loaded
    registry: ModelRegistry | None = None  # every served model by name, the components (rewardkit.server.compose)
    shutting_down: bool = False
    load_error: str | None = None
    on_fatal: Callable[[], None] | None = None  # set by `rewardkit serve`: stops the process when the model cannot load
    metrics: Metrics | None = None
    redis: RedisState | None = None  # with settings.redis_url (rewardkit.server.ops.redis)
    head_swaps: int = 0  # scalar heads installed from another replica through Redis
    r2m: R2MService | None = None  # rewardkit.server.r2m.wiring, when R2M is enabled and set up
    r2m_error: str | None = None  # why R2M is unavailable (its routes answer 503 with it)


def app_state(request: Request) -> AppState:
    return request.app.state.rk  # type: ignore[no-any-return]


def check_service(request: Request) -> RewardService:
    """The service, or NotReady (503) while the model loads or the server shuts down."""
    st = app_state(request)
    if st.shutting_down:
        exc = NotReady("server is shutting down; retry on another replica", retry_after=5.0)
        exc.close_connection = True  # the client must not reuse this connection
        raise exc
    if st.service is None:
        msg = f"model failed to load: {st.load_error}" if st.load_error else "model is loading"
        raise NotReady(msg, retry_after=5.0)
    return st.service


def check_key(keys: list[bytes], header: str | None) -> bool:
    """Constant-time comparison against every configured key (no early exit on the first match)."""
    return matched_key(keys, header) is not None


def matched_key(keys: list[bytes], header: str | None) -> bytes | None:
    """The configured key a ``Bearer`` header carries, or None; compares against every key in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():  # the auth scheme is case-insensitive (RFC 9110 11.1)
        return None
    given = token.strip().encode()
    found: bytes | None = None
    for k in keys:
        if hmac.compare_digest(given, k):
            found = k
    return found


def check_api_key(request: Request) -> None:
    """Unauthorized (401) unless the request carries one of the configured keys (none configured: open)."""
    st = app_state(request)
    keys = st.settings.key_values()
    if not keys:
        return
    if not check_key(keys, request.headers.get("authorization")):
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")


async def get_service(request: Request) -> RewardService:
    return check_service(request)


async def get_registry(request: Request) -> ModelRegistry:
    """The served models and components (503 while loading, like :func:`get_service`)."""
    check_service(request)
    registry = app_state(request).registry
    if registry is None:
        raise NotReady("model is loading", retry_after=5.0)
    return registry


async def require_api_key(request: Request) -> None:
    check_api_key(request)


async def require_metrics_key(request: Request) -> None:
    st = app_state(request)
    if st.settings.metrics_require_auth:
        check_api_key(request)
