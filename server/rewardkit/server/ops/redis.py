"""Redis wiring the app factory calls: `start_redis` (connect; a down Redis does not stop start-up), `attach_service`
(give the loaded service the shared state and adopt the latest published head), `stop_redis`.
"""

from __future__ import annotations

import logging
from typing import Any

from rewardkit.server.deps import AppState
from rewardkit.server.service import RewardService
from rewardkit.server.state import HeadUpdate, RedisState, StateUnavailable

log = logging.getLogger(__name__)


async def start_redis(state: AppState) -> RedisState | None:
    """Create and connect `RedisState` when ``settings.redis_url`` is set (a down Redis does not stop start-up)."""
    s = state.settings
    if not s.redis_url:
        return None

    def drift_provider() -> list[tuple[str, dict[str, Any]]]:
        out = []
        for label, svc in monitored(state):
            if svc.drift is not None:
                out.append((label, svc.drift.to_state()))
            if svc.runs is not None:  # each run's window too, for GET /v1/drift?run=...&scope=fleet
                out += [(run_key(label, run), mon.to_state()) for run, mon in svc.runs.items()]
        return out

    rs = RedisState(s.redis_url, namespace=s.redis_namespace, replica_id=state.replica_id, cache_ttl_s=s.cache_ttl_s,
                    op_timeout_s=s.redis_op_timeout_s, drift_provider=drift_provider,
                    drift_sync_interval_s=s.drift_sync_interval_s)

    def on_head(update: HeadUpdate) -> None:
        svc = state.service
        if svc is not None and svc.swap_scalar_head(update.model_id, update.version, update.weights):
            state.head_swaps += 1

    def on_event(event: dict[str, Any]) -> None:
        svc = dict(monitored(state)).get(str(event.get("model_id")))
        if svc is None or svc.drift is None:
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
    state.redis = rs
    await rs.connect()
    return rs


def run_key(label: str, run: str) -> str:
    """The Redis drift key of one run of one model (``ns:drift:<label>:run:<run>:<replica>``)."""
    return f"{label}:run:{run}"


def monitored(state: AppState) -> list[tuple[str, RewardService]]:
    """(label, service) of every served model whose drift is watched (``ModelRegistry.monitored``): the first model
    alone until the registry exists."""
    if state.registry is not None:
        return state.registry.monitored()
    return [] if state.service is None else [(state.service.rm.model_id, state.service)]


async def attach_service(state: AppState) -> None:
    """Once the models are loaded: give every service the Redis state (the score cache, keyed by model id and head
    version), and let the first model adopt the latest published head, if any."""
    rs: RedisState | None = state.redis
    svc = state.service
    if rs is None or svc is None:
        return
    for _, each in monitored(state):
        each.state = rs
    rs.track_model(svc.rm.model_id, svc.head_version)
    try:
        latest = await rs.fetch_head(svc.rm.model_id)
    except StateUnavailable:
        return  # the background task catches up after it reconnects
    if latest is not None and svc.swap_scalar_head(latest.model_id, latest.version, latest.weights):
        state.head_swaps += 1


async def stop_redis(state: AppState) -> None:
    rs, state.redis = state.redis, None
    if rs is not None:
        await rs.close()
