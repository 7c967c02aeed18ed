"""``rewardkit serve --ray``: run the rewardkit Serve application until SIGTERM or SIGINT.

Without ``--ray-address`` a local Ray instance is started (and stopped on exit, with everything it started); with
one, the application joins that cluster and on exit only this application is deleted.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class _Stop(Exception):
    """SIGTERM/SIGINT before the application was up: unwind serve.run and clean up."""


def run_ray(settings: Any, overrides: dict[str, Any], args: Any) -> int:
    """Start (or join) Ray, run the application on ``settings.host:port``, block until a signal. Exit status."""
    from rewardkit.server.ray_serve.deployment import APP_NAME, Scale, parse_replicas

    try:
        scale_kw: dict[str, Any] = {"replicas": parse_replicas(args.replicas)}
        for name in ("min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus", "max_ongoing_requests"):
            if getattr(args, name, None) is not None:
                scale_kw[name] = getattr(args, name)
        Scale(**scale_kw, num_gpus=args.num_gpus or 0.0)  # validate before Ray starts (the default GPUs: the cluster's)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    stop = threading.Event()
    up = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if not up.is_set():
            raise _Stop

    local = not args.ray_address
    rc = 0
    previous: dict[int, Any] = {}
    try:
        if local:  # the proxy actor inherits this: 503, not 500, for requests whose replica died
            from rewardkit.server.ray_serve import proxy

            os.environ.setdefault(proxy.ENV, proxy.CALLBACK)
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=args.ray_address, log_to_driver=True)
        # after ray.init: Ray's core worker installs its own SIGTERM handler (it dies without cleaning up)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        gpus = float(ray.cluster_resources().get("GPU", 0))
        num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
        scale = Scale(**scale_kw, num_gpus=num_gpus)
        rc = _serve(serve, APP_NAME, overrides, scale, settings, stop, up)
    except _Stop:
        log.info("ray serve: stopped before the application was up")
    except (RuntimeError, ValueError, ConnectionError) as exc:  # a replica that cannot start, a cluster not found
        print(f"error: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr)
        log.debug("ray serve failed", exc_info=True)
        rc = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _shutdown(ray, serve, APP_NAME, local)
    return rc


def _serve(serve: Any, app_name: str, overrides: dict[str, Any], scale: Any, settings: Any,
           stop: threading.Event, up: threading.Event) -> int:
    from rewardkit.server.ray_serve.deployment import build_application

    serve.start(http_options={"host": settings.host, "port": settings.port})
    t0 = time.monotonic()
    serve.run(build_application(overrides, scale), name=app_name, route_prefix="/", blocking=False)
    up.set()
    what = f"{scale.replicas} replicas" if scale.replicas else \
        f"autoscaling {scale.min_replicas}-{scale.max_replicas} replicas (target {scale.target_ongoing_requests:g})"
    log.info("ready (ray serve) url=http://%s:%d %s num_gpus=%g num_cpus=%g in %.1f s", settings.host,
             settings.port, what, scale.num_gpus, scale.num_cpus, time.monotonic() - t0)
    last = None
    while not stop.wait(2.0):
        status = serve.status().applications.get(app_name)
        now = getattr(status, "status", None)
        if now != last and last is not None:
            log.warning("ray serve application %s: %s", app_name, now)
        last = now
    log.info("ray serve: signal received, shutting down")
    return 0


def _shutdown(ray: Any, serve: Any, app_name: str, local: bool) -> None:
    """Delete the application (its replicas drain: lifespan shutdown); a local Ray instance is stopped too."""
    try:
        if ray.is_initialized():
            if local:
                serve.shutdown()
            else:
                serve.delete(app_name)
    except Exception:  # the cluster may already be gone; nothing left to stop then
        log.warning("ray serve shutdown incomplete", exc_info=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        log.info("shutdown complete (ray)")
