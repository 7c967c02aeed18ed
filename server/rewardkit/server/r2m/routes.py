"""``/v1/r2m/*`` routes (thin) and the wiring the app factory calls: `attach` once the model is loaded, `detach` at
shutdown. Bodies of ``/feedback`` and ``/rewards`` are RKF1 streams (``application/octet-stream``), read with
``request.stream()`` so that memory stays bounded whatever the body size."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request, Response

from rewardkit.core.errors import ConfigError
from rewardkit.core.r2m import R2MConfig, R2MHead
from rewardkit.server.deps import AppState, app_state, check_service, require_api_key
from rewardkit.server.errors import BadRequest, NotFound, NotReady
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.r2m.feedback import MemoryFeedbackQueue, RedisFeedbackQueue
from rewardkit.server.r2m.protocol import FeedbackResponse, HeadInfo, HeadList, R2MRewardResponse, R2MStatus
from rewardkit.server.r2m.service import R2MService
from rewardkit.server.r2m.store import HeadStore, model_slug, parse_version
from rewardkit.server.r2m.updater import R2MUpdater

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/r2m", tags=["r2m"], dependencies=[Depends(require_api_key)],
                   responses={c: {"model": ErrorResponse} for c in (401, 404, 413, 415, 422, 429, 503)})  # type: ignore[dict-item]

BINARY = {"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                          "required": True}}


async def get_r2m(request: Request) -> R2MService:
    """The R2M service (a dependency: async, no I/O, so FastAPI does not hand it to its thread pool)."""
    check_service(request)  # 503 while loading / shutting down
    st = app_state(request)
    r2m = st.extras.get("r2m")
    if r2m is None:
        raise NotReady(st.extras.get("r2m_error") or "R2M is disabled on this server (REWARDKIT_R2M_ENABLED=false)",
                       retry_after=5.0)
    return r2m  # type: ignore[no-any-return]


R2M = Annotated[R2MService, Depends(get_r2m)]


def _check_binary(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/octet-stream":
        raise _UnsupportedMedia(f"send the RKF1 stream as application/octet-stream (got {ctype or 'none'!r})", "body")


class _UnsupportedMedia(BadRequest):
    status = 415
    type = "unsupported_media_type"


@router.post("/feedback", response_model=FeedbackResponse, openapi_extra=BINARY)
async def feedback(request: Request, r2m: R2M,
                   flush: Annotated[bool, Query(description="complete every group of this stream now")] = False
                   ) -> FeedbackResponse:
    """Stream policy hidden states (RKF1 frames) into the online updater."""
    _check_binary(request)
    return await r2m.ingest(request.stream(), flush=flush)


@router.post("/rewards", response_model=R2MRewardResponse, openapi_extra=BINARY)
async def rewards(request: Request, r2m: R2M, response: Response) -> R2MRewardResponse:
    """Rewards from the active R2M head for items + their policy hidden states (RKF1 frames)."""
    _check_binary(request)
    out = await r2m.rewards(request.stream())
    response.headers["x-rewardkit-model"] = out.model
    response.headers["x-rewardkit-head-version"] = out.head_version
    return out


def _head_list(r2m: R2MService) -> HeadList:
    active = r2m.updater.active.version
    heads = [HeadInfo(version=h.version, round=h.round, created_at=h.created_at, groups=len(h.applied),
                      parent=h.parent, loss=h.loss, active=h.version == active) for h in r2m.updater.store.stored()]
    return HeadList(model=r2m.model_id, active=active, heads=heads)


@router.get("/heads", response_model=HeadList)
async def heads(r2m: R2M) -> HeadList:
    """Every stored head version, oldest first, and which one is active."""
    return await asyncio.to_thread(_head_list, r2m)


@router.post("/heads/{version}/activate", response_model=HeadList)
async def activate(version: str, r2m: R2M) -> HeadList:
    """Make a stored version the active head (rollback). Unknown version: 404."""
    if parse_version(version) is None:
        raise NotFound(f"unknown head version {version!r} (versions look like 'r2m-000003')", "version")
    try:
        await asyncio.to_thread(r2m.updater.activate, version)
    except KeyError:
        raise NotFound(f"unknown head version {version!r}; GET /v1/r2m/heads lists them", "version") from None
    except OSError as exc:  # the record could not be written: nothing changed (the served head included)
        raise NotReady(f"rollback not recorded ({type(exc).__name__}: {exc}); the active head is unchanged",
                       retry_after=5.0) from exc
    return await asyncio.to_thread(_head_list, r2m)


@router.get("/status", response_model=R2MStatus)
async def status(r2m: R2M) -> R2MStatus:
    u = r2m.updater
    return R2MStatus(model=r2m.model_id, active=u.active.version, queue=r2m.queue.kind, updater_running=u.running,
                     pending_groups=u.pending_groups(), pending_frames=u.pending_frames(),
                     updates_applied=u.updates_applied, groups_applied=u.groups_applied,
                     groups_rejected=u.groups_rejected, last_error=u.last_error)


# -- wiring ------------------------------------------------------------------------------------------------------

def _initial_head(rm: Any, cfg: R2MConfig, seed: int) -> R2MHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = R2MHead.from_scalar_head(rm.head, cfg)
    return head.to(device="cpu", dtype=torch.float32)


def build(state: AppState, loop: asyncio.AbstractEventLoop | None = None) -> R2MService:
    """Store (with the initial head on first start), queue, updater and service for the loaded model."""
    s = state.settings
    svc = state.service
    rm = svc.rm
    d_policy = s.r2m_policy_hidden_size or rm.hidden_size
    cfg = R2MConfig(d_rm=rm.hidden_size, d_policy=d_policy, d_attn=s.r2m_d_attn, omega=s.r2m_omega,
                    total_rounds=s.r2m_total_rounds, alpha=s.r2m_alpha, lr=s.r2m_lr)
    store = HeadStore(s.state_dir, rm.model_id, keep=s.r2m_keep_versions)
    if not store.numbers():
        store.save(_initial_head(rm, cfg, s.r2m_seed), 0, round=0, applied=[], parent=None)

    def override(head: R2MHead) -> None:  # shapes must match; schedule and optimiser come from the settings
        c = head.cfg
        if (c.d_rm, c.d_policy, c.d_attn) != (cfg.d_rm, cfg.d_policy, cfg.d_attn):
            raise ConfigError(f"{store.dir} holds R2M heads with d_rm={c.d_rm}, d_policy={c.d_policy}, "
                              f"d_attn={c.d_attn} but the settings give {cfg.d_rm}, {cfg.d_policy}, {cfg.d_attn}: "
                              "use another --state-dir or matching REWARDKIT_R2M_* settings")
        head.cfg = dataclasses.replace(cfg)

    queue: MemoryFeedbackQueue | RedisFeedbackQueue
    if s.redis_url:
        queue = RedisFeedbackQueue(s.redis_url, s.redis_namespace, model_slug(rm.model_id))
    else:
        queue = MemoryFeedbackQueue()
    rs = state.extras.get("redis")
    publish = None
    head_model = f"{rm.model_id}:r2m"
    if rs is not None and loop is not None:
        def publish(version: str, path: Any) -> None:
            fut = asyncio.run_coroutine_threadsafe(rs.publish_head(head_model, version, path.read_bytes()), loop)
            fut.result(timeout=10)
    updater = R2MUpdater(store, queue, steps_per_update=s.r2m_steps_per_update, publish=publish, cfg_override=override,
                         pause=s.r2m_updater_pause)
    return R2MService(s, svc, updater, queue, d_policy)


async def attach(state: AppState) -> None:
    """Build R2M for the loaded model, subscribe to heads published by other replicas, start the updater."""
    if not state.settings.r2m_enabled or state.service is None:
        return
    try:
        r2m = await asyncio.to_thread(build, state, asyncio.get_running_loop())
    except Exception as exc:  # R2M must not take scalar scoring down: /v1/r2m/* answers 503 with the reason
        state.extras["r2m_error"] = f"R2M unavailable: {type(exc).__name__}: {exc}"
        log.exception("r2m setup failed")
        return
    rs = state.extras.get("redis")
    if rs is not None:
        head_model = f"{r2m.model_id}:r2m"

        def on_head(update: Any) -> None:
            if update.model_id != head_model:
                return
            number = parse_version(update.version)
            if number is None:
                return
            try:
                r2m.updater.store.write_bytes(number, update.weights)
                r2m.updater.install(update.version)
            except Exception:  # noqa: BLE001 - a bad publication must not break the subscriber
                log.exception("r2m: could not install published head %s", update.version)

        rs.subscribe(on_head)
        rs.track_model(head_model, r2m.updater.active.version)
    state.extras["r2m"] = r2m
    if state.settings.r2m_updater:
        r2m.updater.start()
    log.info("r2m ready active=%s queue=%s d_policy=%d", r2m.updater.active.version, r2m.queue.kind, r2m.d_policy)


async def detach(state: AppState) -> None:
    """Stop the updater (the update in flight finishes and is written); close the queue."""
    r2m: R2MService | None = state.extras.pop("r2m", None)
    if r2m is None:
        return
    await asyncio.to_thread(r2m.updater.stop)
    await r2m.queue.aclose()
    r2m.queue.close()
    log.info("r2m stopped active=%s", r2m.updater.active.version)
