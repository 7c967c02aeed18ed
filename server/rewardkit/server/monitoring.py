"""Operations routes and glue: request metrics, ``GET /metrics``, drift routes, Redis wiring.

- `RequestMetricsMiddleware` (pure ASGI) counts every HTTP request by route *template* (``/v1/rewards``, never a
  raw path; unmatched paths count as ``other``) and status, and times it (``rewardkit_requests_total``,
  ``rewardkit_request_duration_seconds``).
- ``GET /metrics``: Prometheus text format of the app's own registry. Needs the API key when
  ``metrics_require_auth`` is set. Drift gauges, queue depth and Redis health are refreshed at scrape time, so the
  serving path pays nothing for them.
- ``GET /v1/drift?scope=local|fleet``: the drift snapshot of this replica, or of every live replica pooled
  through Redis (`drift.merge_states`). ``POST /v1/drift/reference/pin`` makes the current window the reference;
  ``POST /v1/drift/reference/reset`` drops it (it refills from the next rewards). Both act on this replica and,
  with Redis, are broadcast to the other replicas (``replicas_notified`` in the answer).
- `start_redis` / `attach_service` / `stop_redis`: what the app factory calls to wire `RedisState` in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel

from rewardkit.server.deps import AppState, app_state, get_service, require_api_key, require_metrics_key
from rewardkit.server.drift import DriftMonitor, merge_states
from rewardkit.server.errors import BadRequest, NotReady
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.state import HeadUpdate, RedisState, StateUnavailable

log = logging.getLogger(__name__)

__all__ = ["RequestMetricsMiddleware", "attach_service", "router", "start_redis", "stop_redis"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestMetricsMiddleware:
    """Count and time every HTTP request by route template and status (see module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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


class OperationsCollector(Collector):
    """Series read at scrape time from the app state: Redis health and head swaps seen by this replica."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        rs: RedisState | None = self.state.extras.get("redis")
        up = GaugeMetricFamily("rewardkit_redis_up", "1 when Redis answers; 0 when down (cache bypassed).")
        up.add_metric([], 1.0 if rs is not None and rs.available else 0.0)
        yield up
        rec = CounterMetricFamily("rewardkit_redis_reconnects", "Reconnections to Redis after an outage.")
        rec.add_metric([], float(rs.reconnects if rs is not None else 0))
        yield rec
        fail = CounterMetricFamily("rewardkit_redis_failures", "Redis outages detected (operation failed).")
        fail.add_metric([], float(rs.failures if rs is not None else 0))
        yield fail
        swaps = CounterMetricFamily("rewardkit_head_swaps", "Heads installed from another replica via Redis.")
        swaps.add_metric([], float(self.state.extras.get("head_swaps", 0)))
        yield swaps


# -- Redis wiring (called by the app factory) -------------------------------------------------------------------

async def start_redis(state: AppState) -> RedisState | None:
    """Create and connect `RedisState` when ``settings.redis_url`` is set (a down Redis does not stop start-up)."""
    s = state.settings
    if not s.redis_url:
        return None

    def drift_provider() -> tuple[str, dict[str, Any]] | None:
        svc = state.service
        if svc is None or svc.drift is None:
            return None
        return svc.rm.model_id, svc.drift.to_state()

    rs = RedisState(s.redis_url, namespace=s.redis_namespace, replica_id=s.replica_id, cache_ttl_s=s.cache_ttl_s,
                    op_timeout_s=s.redis_op_timeout_s, drift_provider=drift_provider,
                    drift_sync_interval_s=s.drift_sync_interval_s)

    def on_head(update: HeadUpdate) -> None:
        svc = state.service
        if svc is not None and svc.swap_scalar_head(update.model_id, update.version, update.weights):
            state.extras["head_swaps"] = state.extras.get("head_swaps", 0) + 1

    def on_event(event: dict[str, Any]) -> None:
        svc = state.service
        if svc is None or svc.drift is None or event.get("model_id") != svc.rm.model_id:
            return
        try:
            if event.get("kind") == "drift_pin":
                svc.drift.pin_reference()
            elif event.get("kind") == "drift_reset":
                svc.drift.reset_reference()
        except ValueError as exc:  # empty window on this replica
            log.info("drift %s from %s not applied here: %s", event.get("kind"), event.get("origin"), exc)

    rs.subscribe(on_head)
    rs.subscribe_events(on_event)
    state.extras["redis"] = rs
    await rs.connect()
    return rs


async def attach_service(state: AppState) -> None:
    """Once the model is loaded: give the service the Redis state and adopt the latest published head, if any."""
    rs: RedisState | None = state.extras.get("redis")
    svc = state.service
    if rs is None or svc is None:
        return
    svc.state = rs
    rs.track_model(svc.rm.model_id, svc.head_version)
    try:
        latest = await rs.fetch_head(svc.rm.model_id)
    except StateUnavailable:
        return  # the background task catches up after it reconnects
    if latest is not None and svc.swap_scalar_head(latest.model_id, latest.version, latest.weights):
        state.extras["head_swaps"] = state.extras.get("head_swaps", 0) + 1


async def stop_redis(state: AppState) -> None:
    rs: RedisState | None = state.extras.pop("redis", None)
    if rs is not None:
        await rs.close()


# -- routes -----------------------------------------------------------------------------------------------------

router = APIRouter(responses={code: {"model": ErrorResponse} for code in (401, 422, 503)})  # type: ignore[dict-item]


class DriftResponse(BaseModel):
    """A drift snapshot (fields: see rewardkit.server.drift) with where it comes from."""

    model: str
    head_version: str
    scope: Literal["local", "fleet"]
    replicas: int
    snapshot: dict[str, Any]


class DriftActionResponse(BaseModel):
    model: str
    action: Literal["pin", "reset"]
    replicas_notified: int
    snapshot: dict[str, Any]


def _monitor(service: Any) -> DriftMonitor:
    if service.drift is None:
        raise BadRequest("drift monitoring is disabled on this server (settings.drift_enabled=false)",
                         field="drift_enabled")
    return service.drift  # type: ignore[no-any-return]


def refresh_gauges(state: AppState) -> None:
    """Copy scrape-time values (drift snapshot, queue depth) into the metrics."""
    svc, m = state.service, state.metrics
    if svc is None or m is None:
        return
    m.set_queue_depth(svc.scheduler.queue_depth, svc.settings.max_queue_items)
    if svc.drift is not None:
        m.update_drift(svc.rm.model_id, svc.drift.snapshot())


@router.get("/metrics", dependencies=[Depends(require_metrics_key)], response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this replica (text exposition format)."""
    st = app_state(request)
    if st.metrics is None:
        raise NotReady("metrics are not configured", retry_after=5.0)
    refresh_gauges(st)
    body, content_type = st.metrics.render()
    return Response(content=body, media_type=content_type)


Service = Annotated[Any, Depends(get_service)]


@router.get("/v1/drift", response_model=DriftResponse, dependencies=[Depends(require_api_key)])
async def drift(request: Request, service: Service,
                scope: Annotated[Literal["local", "fleet"], Query(description="this replica, or all via Redis")] = "local"
                ) -> DriftResponse:
    """Reward drift and hacking signals over the sliding window (PSI, KS, shifts, length correlation, collapse)."""
    mon = _monitor(service)
    model_id = service.rm.model_id
    if scope == "local":
        return DriftResponse(model=model_id, head_version=service.head_version, scope="local", replicas=1,
                             snapshot=mon.snapshot().to_dict())
    rs: RedisState | None = app_state(request).extras.get("redis")
    if rs is None:
        raise BadRequest("scope=fleet needs Redis (settings.redis_url)", field="scope")
    try:
        await rs.push_drift(model_id, mon.to_state())  # include this replica's latest window
        states = await rs.fleet_drift_states(model_id)
    except StateUnavailable as exc:
        raise NotReady(f"fleet drift needs Redis, which is down: {exc}", retry_after=2.0) from exc
    merged = DriftMonitor.from_state(merge_states(list(states.values())), bins=mon.bins,
                                     collapse_eps=mon.collapse_eps, min_samples=mon.min_samples)
    return DriftResponse(model=model_id, head_version=service.head_version, scope="fleet", replicas=len(states),
                         snapshot=merged.snapshot().to_dict())


async def _drift_action(request: Request, service: Any, action: Literal["pin", "reset"]) -> DriftActionResponse:
    mon = _monitor(service)
    if action == "pin":
        try:
            mon.pin_reference()
        except ValueError as exc:
            raise BadRequest(f"cannot pin the drift reference: {exc}", field="reference") from exc
    else:
        mon.reset_reference()
    notified = 0
    rs: RedisState | None = app_state(request).extras.get("redis")
    if rs is not None and rs.available:
        try:
            notified = await rs.publish_event(f"drift_{action}", model_id=service.rm.model_id)
        except StateUnavailable:
            log.warning("drift %s applied locally only: redis is down", action)
    snap = mon.snapshot()
    st = app_state(request)
    if st.metrics is not None:
        st.metrics.update_drift(service.rm.model_id, snap)
    return DriftActionResponse(model=service.rm.model_id, action=action, replicas_notified=max(0, notified - 1),
                               snapshot=snap.to_dict())


@router.post("/v1/drift/reference/pin", response_model=DriftActionResponse, dependencies=[Depends(require_api_key)])
async def drift_pin(request: Request, service: Service) -> DriftActionResponse:
    """Make the current window the drift reference (e.g. after validating a new policy checkpoint)."""
    return await _drift_action(request, service, "pin")


@router.post("/v1/drift/reference/reset", response_model=DriftActionResponse, dependencies=[Depends(require_api_key)])
async def drift_reset(request: Request, service: Service) -> DriftActionResponse:
    """Drop the drift reference; it refills automatically from the next rewards."""
    return await _drift_action(request, service, "reset")
