"""R2M wiring the app factory calls: `attach` once the model is loaded (store with the initial head, feedback queue,
updater, service; heads published by other replicas installed), `detach` at shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import torch

from rewardkit.core.errors import ConfigError
from rewardkit.core.r2m import R2MConfig, R2MHead
from rewardkit.server import torch_thread
from rewardkit.server.deps import AppState
from rewardkit.server.r2m.feedback import FeedbackQueue, MemoryFeedbackQueue, RedisFeedbackQueue
from rewardkit.server.r2m.serving import R2MService
from rewardkit.server.r2m.store import HeadStore, model_slug, parse_version
from rewardkit.server.r2m.updater import R2MUpdater
from rewardkit.server.settings import Settings
from rewardkit.server.state import RedisState

log = logging.getLogger(__name__)


def _initial_head(rm: Any, cfg: R2MConfig, seed: int) -> R2MHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = R2MHead.from_scalar_head(rm.head, cfg)
    return head.to(device="cpu", dtype=torch.float32)


def build(state: AppState, loop: asyncio.AbstractEventLoop | None = None) -> R2MService:
    """Store (with the initial head on first start), queue, updater and service for the loaded model."""
    svc = state.service
    if svc is None:
        raise RuntimeError("R2M is built after the model is loaded")
    updater, queue, d_policy = make_updater(state.settings, svc.rm, state.redis, loop)
    return R2MService(state.settings, svc, updater, queue, d_policy)


def make_updater(s: Settings, rm: Any, rs: RedisState | None, loop: asyncio.AbstractEventLoop | None
                 ) -> tuple[R2MUpdater, FeedbackQueue, int]:
    """The head store (with the initial head on first start), the feedback queue and the updater for ``rm``, in
    the server or in a process of its own (``rewardkit r2m-updater``). Heads are published through ``rs`` when it
    is given (``loop``: the event loop ``rs`` runs on)."""
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

    queue: FeedbackQueue
    if s.redis_url:
        queue = RedisFeedbackQueue(s.redis_url, s.redis_namespace, model_slug(rm.model_id))
    else:
        queue = MemoryFeedbackQueue()
    publish = None
    head_model = f"{rm.model_id}:r2m"
    if rs is not None and loop is not None:
        def publish(version: str, path: Any) -> None:
            fut = asyncio.run_coroutine_threadsafe(rs.publish_head(head_model, version, path.read_bytes()), loop)
            fut.result(timeout=10)
    updater = R2MUpdater(store, queue, steps_per_update=s.r2m_steps_per_update, publish=publish, cfg_override=override,
                         pause=s.r2m_updater_pause)
    return updater, queue, d_policy


async def attach(state: AppState) -> None:
    """Build R2M for the loaded model, subscribe to heads published by other replicas, start the updater."""
    if not state.settings.r2m_enabled or state.service is None:
        return
    try:
        r2m = await torch_thread.run(build, state, asyncio.get_running_loop())
    except Exception as exc:  # R2M must not take scalar scoring down: /v1/r2m/* answers 503 with the reason
        state.r2m_error = f"R2M unavailable: {type(exc).__name__}: {exc}"
        log.exception("r2m setup failed")
        return
    rs = state.redis
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
    state.r2m = r2m
    if state.settings.r2m_updater:
        r2m.updater.start()
    log.info("r2m ready active=%s queue=%s d_policy=%d", r2m.updater.active.version, r2m.queue.kind, r2m.d_policy)


async def detach(state: AppState) -> None:
    """Stop the updater (the update in flight finishes and is written); close the queue."""
    r2m, state.r2m = state.r2m, None
    if r2m is None:
        return
    await asyncio.to_thread(r2m.updater.stop)
    await r2m.queue.aclose()
    r2m.queue.close()
    log.info("r2m stopped active=%s", r2m.updater.active.version)
