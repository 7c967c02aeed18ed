"""The work behind the operations routes: drift snapshots (this replica, or the fleet pooled through Redis), pin and
reset of the drift reference (broadcast to the other replicas), scrape-time gauges.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import Request

from rewardkit.server.deps import AppState, app_state
from rewardkit.server.drift import DriftMonitor, merge_states
from rewardkit.server.errors import BadRequest, NotFound, NotReady
from rewardkit.server.ops.protocol import DriftActionResponse, DriftResponse, RunList, RunSummary
from rewardkit.server.ops.redis import monitored, run_key
from rewardkit.server.runs import RUN_PREFIX, RunRegistry, RunTag, check_prefix, check_run_id
from rewardkit.server.service import RewardService
from rewardkit.server.state import RedisState, StateUnavailable

log = logging.getLogger(__name__)


def _monitor(service: RewardService) -> DriftMonitor:
    if service.drift is None:
        raise BadRequest("drift monitoring is disabled on this server (settings.drift_enabled=false)",
                         field="drift_enabled")
    return service.drift  # type: ignore[no-any-return]


def refresh_gauges(state: AppState) -> None:
    """Copy scrape-time values (drift snapshots of every served model, queue depth) into the metrics."""
    svc, m = state.service, state.metrics
    if svc is None or m is None:
        return
    m.set_queue_depth(svc.scheduler.queue_depth, svc.settings.max_queue_items)
    for label, s in monitored(state):
        if s.drift is not None:
            m.update_drift(label, s.drift.snapshot())
        if s.runs is not None:
            info = {r.run_id: r for r in s.runs.runs()}
            for name, mon in s.runs.items():
                m.update_run(label, name, mon.snapshot(), info[name].items, info[name].last_step)


def pick(request: Request, model: str | None) -> tuple[str, RewardService]:
    """(label, service) of the served model that ``model`` names (None: the first), or a 422 listing the names."""
    st = app_state(request)
    if st.registry is None or model is None:
        svc = st.service if st.registry is None else st.registry.primary
        assert svc is not None  # the route's dependency waited for the model
        return svc.rm.model_id, svc
    svc = st.registry.pick(model, "model")
    return next(lb for lb, s in st.registry.monitored() if s is svc), svc


def _runs(service: RewardService) -> RunRegistry:
    if service.runs is None:
        raise BadRequest("drift monitoring is disabled on this server (settings.drift_enabled=false)",
                         field="drift_enabled")
    return service.runs


async def run_drift(request: Request, service: RewardService, run: str, scope: str,
                    label: str | None = None) -> DriftResponse:
    """One run's drift: its rewards in the window against its own first ``drift_reference_size`` rewards; with
    ``scope=fleet``, the run's windows of every live replica pooled through Redis."""
    check_run_id(run, "run")
    check_prefix(RunTag(run), RUN_PREFIX.get(), "run")
    label = label or service.rm.model_id
    reg = _runs(service)
    mon = reg.monitor(run)
    if scope == "local":
        if mon is None:
            raise NotFound(f"run {run!r} has not been scored on this replica (GET /v1/runs lists the runs; past "
                           f"max_runs={service.settings.max_runs} new runs count as 'other')", field="run")
        return DriftResponse(model=label, head_version=service.head_version, scope="local", replicas=1,
                             snapshot=mon.snapshot().to_dict(), run=run)
    snapshot, replicas = await _pooled(request, run_key(label, run), mon, service)
    if not replicas:
        raise NotFound(f"run {run!r} has not been scored on any live replica (GET /v1/runs on each lists its runs)",
                       field="run")
    return DriftResponse(model=label, head_version=service.head_version, scope="fleet", replicas=replicas,
                         snapshot=snapshot, run=run)


async def _pooled(request: Request, key: str, mon: DriftMonitor | None, service: RewardService
                  ) -> tuple[dict[str, Any], int]:
    """The drift windows stored under ``key`` by every live replica (this one's, ``mon``, pushed first), merged:
    (snapshot dict, replicas). 422 without Redis, 503 while it is down."""
    rs: RedisState | None = app_state(request).redis
    if rs is None:
        raise BadRequest("scope=fleet needs Redis (settings.redis_url)", field="scope")
    try:
        if mon is not None:
            await rs.push_drift(key, mon.to_state())  # include this replica's latest window
        states = await rs.fleet_drift_states(key)
    except StateUnavailable as exc:
        raise NotReady(f"fleet drift needs Redis, which is down: {exc}", retry_after=2.0) from exc
    if not states:  # no live replica has this window (an unknown run)
        return {}, 0
    s = service.settings
    merged = DriftMonitor.from_state(merge_states(list(states.values())), bins=s.drift_bins,
                                     collapse_eps=s.drift_collapse_eps, min_samples=s.drift_min_samples)
    return merged.snapshot().to_dict(), len(states)


def run_list(service: RewardService) -> RunList:
    reg = _runs(service)
    prefix = RUN_PREFIX.get()
    return RunList(max_runs=reg.max_runs, runs=[
        RunSummary(run=r.run_id, items=r.items, requests=r.requests, last_step=r.last_step, first_seen=r.first_seen,
                   last_seen=r.last_seen) for r in reg.runs() if prefix is None or r.run_id.startswith(prefix)])


async def drift(request: Request, service: RewardService, scope: Literal["local", "fleet"],
                label: str | None = None) -> DriftResponse:
    """Reward drift and hacking signals over the sliding window (PSI, KS, shifts, length correlation, collapse)."""
    mon = _monitor(service)
    model_id = label or service.rm.model_id
    if scope == "local":
        return DriftResponse(model=model_id, head_version=service.head_version, scope="local", replicas=1,
                             snapshot=mon.snapshot().to_dict())
    snapshot, replicas = await _pooled(request, model_id, mon, service)
    return DriftResponse(model=model_id, head_version=service.head_version, scope="fleet", replicas=replicas,
                         snapshot=snapshot)


async def drift_action(request: Request, service: RewardService, action: Literal["pin", "reset"],
                       label: str | None = None) -> DriftActionResponse:
    mon = _monitor(service)
    model_id = label or service.rm.model_id
    if action == "pin":
        try:
            mon.pin_reference()
        except ValueError as exc:
            raise BadRequest(f"cannot pin the drift reference: {exc}", field="reference") from exc
    else:
        mon.reset_reference()
    notified = 0
    rs: RedisState | None = app_state(request).redis
    if rs is not None and rs.available:
        try:
            notified = await rs.publish_event(f"drift_{action}", model_id=model_id)
        except StateUnavailable:
            log.warning("drift %s applied locally only: redis is down", action)
    snap = mon.snapshot()
    st = app_state(request)
    if st.metrics is not None:
        st.metrics.update_drift(model_id, snap)
    return DriftActionResponse(model=model_id, action=action, replicas_notified=max(0, notified - 1),
                               snapshot=snap.to_dict())
