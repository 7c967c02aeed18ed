"""The R2M updater in a process of its own: ``rewardkit r2m-updater``.

In the server, GREBT steps and the model worker share one process, its cores and its GIL: a scoring request that
lands on a step waits for it (p99 2.4x idle, docs/results.md). The updater needs only the feedback queue (the Redis
Stream) and the head store; it publishes each new head through Redis as the in-server updater does, and every
replica installs it. So it can run apart, pinned to its own cores, with the servers started with
``REWARDKIT_R2M_UPDATER=false``:

    REWARDKIT_R2M_UPDATER=false taskset -c 0 rewardkit serve --model M --redis-url redis://host:6379/0
    rewardkit r2m-updater --model M --redis-url redis://host:6379/0 --cpus 1

It reads the same settings (``REWARDKIT_*`` env, a few flags) as ``rewardkit serve``: the R2M shapes and schedule,
the state directory, the Redis namespace. The model is loaded on CPU only for its hidden size, its id and, on the
very first start, the initial head (the frames carry the RM's reward-token state, so no forward runs here).

Crash safety is the queue's: entries are acknowledged only after the head that used them is on disk, so a kill -9
loses nothing acknowledged; the restarted process first re-reads its own pending entries (exactly once per group by
the applied-keys record). SIGTERM or SIGINT stop it after the update in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


class RunningUpdater:
    """An updater started by :func:`start_updater`: its Redis loop thread, queue and GREBT thread; ``stop()`` ends
    them after the update in flight (the CLI on SIGTERM, the Ray actor on shutdown)."""

    def __init__(self, updater: Any, queue: Any, rs: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.updater, self.queue, self.rs, self.loop = updater, queue, rs, loop

    def stop(self) -> None:
        self.updater.stop()
        self.queue.close()
        asyncio.run_coroutine_threadsafe(self.rs.close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        log.info("r2m-updater stopped active=%s updates=%d groups=%d", self.updater.active.version,
                 self.updater.updates_applied, self.updater.groups_applied)


def start_updater(settings: object, cpus: Sequence[int] = (), name: str | None = None) -> RunningUpdater:
    """Load the model on CPU, connect to Redis and start the GREBT thread on the servers' feedback stream."""
    import torch

    from rewardkit.core.loading import load_reward_model
    from rewardkit.server.r2m.wiring import make_updater
    from rewardkit.server.settings import Settings
    from rewardkit.server.state import RedisState

    assert isinstance(settings, Settings)
    if not settings.redis_url:
        raise ValueError("r2m-updater needs the feedback queue in Redis: give --redis-url or REWARDKIT_REDIS_URL "
                         "(the same as the servers')")
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(max(1, len(cpus) or 1))
    rm = load_reward_model(settings.model, device="cpu")
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="r2m-updater-redis", daemon=True)
    loop_thread.start()
    rs = RedisState(settings.redis_url, namespace=settings.redis_namespace,
                    replica_id=settings.replica_id or name or f"r2m-updater-{os.getpid()}",
                    op_timeout_s=max(settings.redis_op_timeout_s, 2.0))
    asyncio.run_coroutine_threadsafe(rs.connect(), loop).result(timeout=30)
    updater, queue, d_policy = make_updater(settings, rm, rs, loop)
    updater.start()
    log.info("r2m-updater running model=%s active=%s d_policy=%d cpus=%s stream=%s", rm.model_id,
             updater.active.version, d_policy, sorted(os.sched_getaffinity(0)), getattr(queue, "stream", "?"))
    return RunningUpdater(updater, queue, rs, loop)


def run_updater(settings: object, cpus: Sequence[int] = ()) -> int:
    """Run the updater until SIGTERM/SIGINT. Returns the exit status."""
    running = start_updater(settings, cpus)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(5.0):
            if running.updater.last_error:
                log.warning("r2m-updater last error: %s", running.updater.last_error)
    finally:
        running.stop()
    return 0
