"""The app factory: builds everything and hangs it on ``app.state.rk``; no module-level state.

The model loads in a background thread after start-up so that ``/health`` answers at once and ``/ready`` says 503
until the model is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.server import torch_thread
from rewardkit.server.compose.serving import ModelRegistry
from rewardkit.server.deps import AppState
from rewardkit.server.errors import install_error_handlers
from rewardkit.server.metrics import Metrics
from rewardkit.server.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    DisconnectMiddleware,
    ReplicaHeaderMiddleware,
    RequestMetricsMiddleware,
)
from rewardkit.server.native import router as native
from rewardkit.server.openrlhf import router as openrlhf
from rewardkit.server.ops import redis as ops_redis
from rewardkit.server.ops import router as ops
from rewardkit.server.ops.collector import OperationsCollector
from rewardkit.server.r2m import router as r2m
from rewardkit.server.r2m import wiring as r2m_wiring
from rewardkit.server.service import RewardService
from rewardkit.server.settings import Settings
from rewardkit.server.state import default_replica_id
from rewardkit.server.vllm import router as vllm

log = logging.getLogger(__name__)

async def load_extra_models(state: AppState, settings: Settings) -> dict[str, RewardService]:
    """The 2nd, 3rd ``--model NAME=PATH``: one service (scheduler) each, on the one torch thread, each with its own
    drift monitor and per-run monitors, and the Redis score cache (ops.redis.attach_service). R2M and adopting
    heads published through Redis stay with the first model."""
    extra = {}
    for name, path in settings.extra_models.items():
        xrm = await torch_thread.run(
            load_reward_model, path, device=settings.device, dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code, reward_token_rule=settings.reward_token_rule)
        extra[name] = build_service(state, xrm, settings.model_copy(update={"model": path, "served_model_name": []}))
        log.info("loaded model name=%s id=%s path=%s", name, xrm.model_id, path)
    return extra


def build_service(state: AppState, rm: RewardModel, settings: Settings | None = None) -> RewardService:
    service = RewardService(settings or state.settings, rm, metrics=state.metrics)
    service.scheduler.start()
    return service


def create_app(settings: Settings | None = None, rm: RewardModel | None = None, *,
               load_before_ready: bool = False) -> FastAPI:
    """Build the app. ``rm``: an already-loaded model (tests); otherwise ``settings.model`` loads at start-up.

    ``load_before_ready``: the lifespan start-up waits for the model and raises when it cannot load (Ray Serve: a
    replica takes traffic only once its start-up is done, and one that fails is replaced). By default the model
    loads in the background while ``/health`` answers and ``/ready`` says 503."""
    settings = settings or Settings()
    state = AppState(settings=settings, replica_id=settings.replica_id or default_replica_id())
    # metrics on the app's own registry, before the service exists (the service records batches and rewards)
    state.metrics = Metrics(CollectorRegistry())
    state.metrics.registry.register(OperationsCollector(state))

    async def _load() -> None:
        try:
            model = rm if rm is not None else await torch_thread.run(  # the thread that will run the forwards
                load_reward_model, settings.model, device=settings.device, dtype=settings.dtype,
                trust_remote_code=settings.trust_remote_code, reward_token_rule=settings.reward_token_rule)
            extra = await load_extra_models(state, settings)
            state.service = build_service(state, model)
            state.registry = ModelRegistry(settings, state.service, extra)
            await ops_redis.attach_service(state)  # Redis score cache + latest published head, when configured
            await r2m_wiring.attach(state)  # R2M store, feedback queue, background updater (rewardkit.server.r2m)
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
        await ops_redis.start_redis(state)  # no-op without settings.redis_url; a down Redis does not block
        if rm is not None or load_before_ready:
            await _load()
            loader = None
            if state.load_error:
                await ops_redis.stop_redis(state)
                raise RuntimeError(f"the model could not be loaded: {state.load_error}")
        else:
            loader = asyncio.create_task(_load())
        try:
            yield
        finally:
            state.shutting_down = True
            if loader is not None and not loader.done():
                loader.cancel()
            await r2m_wiring.detach(state)  # stop the updater after its update in flight is on disk
            if state.registry is not None:
                await asyncio.gather(*(svc.scheduler.stop(drain_timeout=settings.grace_period_s)
                                       for svc in state.registry.extra.values()))
            if state.service is not None:
                await state.service.scheduler.stop(drain_timeout=settings.grace_period_s)
            await ops_redis.stop_redis(state)
            log.info("shutdown complete")

    app = FastAPI(title="rewardkit", version="0.1.0", lifespan=lifespan,
                  description="Reward-model server: scalar and ABC dense rewards, R2M online alignment.")
    app.state.rk = state
    install_error_handlers(app)
    for router in (native.open_router, native.router, openrlhf.router, vllm.router, ops.router, r2m.router):
        app.include_router(router)  # one package per endpoint family: protocol.py, serving.py, router.py
    app.add_middleware(DisconnectMiddleware)  # type: ignore[arg-type]  # inside the body limit and the metrics
    app.add_middleware(AuthMiddleware, state=state)  # type: ignore[arg-type]  # before any body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,  # type: ignore[arg-type]
                       exempt_prefixes=("/v1/r2m/feedback", "/v1/r2m/rewards"))  # r2m_max_stream_bytes applies
    app.add_middleware(RequestMetricsMiddleware, state=state)  # type: ignore[arg-type]  # sees 413s
    app.add_middleware(ReplicaHeaderMiddleware, replica_id=state.replica_id)  # type: ignore[arg-type]  # outermost
    return app
