"""The Serve deployments of ``rewardkit serve --ray`` and the application builder.

``RewardReplica`` wraps the app ``create_app`` builds, unchanged: one model worker per replica, its own scheduler and
metrics, ``x-rewardkit-replica`` on every response (the Serve replica id). Its start-up waits for the model
(``load_before_ready``), so Serve routes to a new or restarted replica only once it can score; a model that cannot
load fails the replica's start, which Serve retries and then reports.

``R2MUpdater`` (one replica, never autoscaled) runs the GREBT updater on the Redis feedback stream, as
``rewardkit r2m-updater`` does; the reward replicas then run with ``r2m_updater=false`` and install each head it
publishes through Redis.

Settings reach the replicas two ways: the fields given on the command line (or in the builder's ``args``) as the
deployment's init argument, and the ``REWARDKIT_*`` environment of the process that builds the application, copied
into each replica's ``runtime_env`` (a replica on another node then sees what the launching shell saw).

Example (what KubeRay's ``serveConfigV2`` and ``serve run`` call)::

    serve run rewardkit.server.ray_serve.deployment:app_builder model=/models/rm replicas=2
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

log = logging.getLogger(__name__)

APP_NAME = "rewardkit"
SCALE_FIELDS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_gpus", "num_cpus",
                "max_ongoing_requests")


def parse_replicas(value: str | int | None) -> int | None:
    """``"auto"`` -> None (autoscale); a count >= 1 -> that count."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"replicas: expected a count >= 1 or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"replicas: expected a count >= 1 or 'auto', got {n}")
    return n


@dataclasses.dataclass(frozen=True)
class Scale:
    """How many reward replicas run and what each one reserves."""

    replicas: int | None = 1  # None: autoscale between min_replicas and max_replicas on ongoing requests
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 16.0  # per replica, before the autoscaler adds one
    num_gpus: float = 0.0  # per replica
    num_cpus: float = 1.0  # per replica; Ray also sets the replica's OMP threads from it
    max_ongoing_requests: int = 256  # per replica: the scheduler batches them; more wait in Serve's router

    def __post_init__(self) -> None:
        problems = []
        if self.replicas is not None and self.replicas < 1:
            problems.append(f"replicas must be >= 1 or auto (got {self.replicas})")
        if self.min_replicas < 0:
            problems.append(f"min_replicas must be >= 0 (got {self.min_replicas})")
        if self.max_replicas < max(1, self.min_replicas):
            problems.append(f"max_replicas must be >= max(1, min_replicas) (got {self.max_replicas}, "
                            f"min {self.min_replicas})")
        if self.target_ongoing_requests <= 0:
            problems.append(f"target_ongoing_requests must be > 0 (got {self.target_ongoing_requests})")
        if self.num_gpus < 0 or self.num_cpus < 0:
            problems.append(f"num_gpus and num_cpus must be >= 0 (got {self.num_gpus}, {self.num_cpus})")
        if self.max_ongoing_requests < 1:
            problems.append(f"max_ongoing_requests must be >= 1 (got {self.max_ongoing_requests})")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Scale:
        """From builder args (strings from ``serve run`` or YAML values); unknown keys are not looked at."""
        kw: dict[str, Any] = {}
        if "replicas" in args:
            kw["replicas"] = parse_replicas(args["replicas"])
        for name, cast in (("min_replicas", int), ("max_replicas", int), ("max_ongoing_requests", int),
                           ("target_ongoing_requests", float), ("num_gpus", float), ("num_cpus", float)):
            if name in args and args[name] is not None:
                try:
                    kw[name] = cast(args[name])
                except (TypeError, ValueError):
                    raise ValueError(f"{name}: expected a number, got {args[name]!r}") from None
        return cls(**kw)


def rewardkit_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``REWARDKIT_*`` variables to copy into every replica's environment."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith("REWARDKIT_")}


def replica_options(scale: Scale, grace_period_s: float, env: Mapping[str, str]) -> dict[str, Any]:
    """``serve.deployment`` options of the reward replicas."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": scale.num_gpus,
                              "runtime_env": {"env_vars": dict(env)}},
        "max_ongoing_requests": scale.max_ongoing_requests,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": max(1.0, grace_period_s),
    }
    if scale.replicas is None:
        opts["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                      "target_ongoing_requests": scale.target_ongoing_requests}
    else:
        opts["num_replicas"] = scale.replicas
    return opts


@serve.ingress()
class RewardReplica:
    """One Serve replica: the whole rewardkit app (model worker, scheduler, metrics) for this replica."""

    def __init__(self, overrides: dict[str, Any], updater: Any = None) -> None:
        self._overrides = dict(overrides)
        self._updater = updater  # the R2M updater's handle: it keeps that deployment in this application

    def __serve_build_asgi_app__(self) -> Any:
        from rewardkit.server.app import create_app
        from rewardkit.server.settings import Settings

        ctx = serve.get_replica_context()
        # each replica its own name, whatever the environment says: Redis tells replicas apart by it
        settings = Settings(**{**self._overrides, "replica_id": f"{ctx.app_name}-{ctx.replica_id.unique_id}"})
        return create_app(settings, load_before_ready=True)

    def check_health(self) -> None:
        """Serve's health check: a replica whose model worker has stopped is replaced."""
        state = self.app.state.rk  # type: ignore[attr-defined]  # set by serve.ingress
        service = state.service
        if service is None or not service.scheduler.alive:
            raise RuntimeError(f"model worker not running (load_error={state.load_error})")


class R2MUpdater:
    """The fleet's one R2M updater: reads the Redis feedback stream, trains, publishes heads through Redis."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        from rewardkit.server.r2m.process import start_updater
        from rewardkit.server.settings import Settings

        ctx = serve.get_replica_context()
        self._running = start_updater(Settings(**overrides), name=f"{ctx.app_name}-r2m-updater")

    def check_health(self) -> None:
        updater = self._running.updater
        if not updater.running:
            raise RuntimeError(f"the R2M updater thread stopped: {updater.last_error}")

    def status(self) -> dict[str, Any]:
        u = self._running.updater
        return {"active": u.active.version, "updates_applied": u.updates_applied, "groups_applied": u.groups_applied,
                "last_error": u.last_error}

    def __del__(self) -> None:
        running = getattr(self, "_running", None)
        if running is not None:
            running.stop()


def updater_wanted(overrides: Mapping[str, Any], scale: Scale) -> tuple[bool, dict[str, Any], str | None]:
    """Where the R2M updater runs: (an updater deployment?, the replicas' overrides, a warning or None).

    With Redis: one updater deployment, replicas only ingest. Without Redis one replica keeps its in-process
    updater (as plain ``serve``); several replicas cannot share one, so R2M is switched off with a warning."""
    from rewardkit.server.settings import Settings

    s = Settings(**overrides)
    if not s.r2m_enabled:
        return False, dict(overrides), None
    if s.redis_url:
        if not s.r2m_updater:  # the user runs `rewardkit r2m-updater` elsewhere
            return False, dict(overrides), None
        return True, {**overrides, "r2m_updater": False}, None
    if scale.replicas == 1:
        return False, dict(overrides), None
    return False, {**overrides, "r2m_enabled": False}, (
        "R2M is off: several replicas need one updater and a shared feedback stream, which need Redis; give "
        "--redis-url (or REWARDKIT_REDIS_URL), or --replicas 1")


def build_application(overrides: Mapping[str, Any], scale: Scale, env: Mapping[str, str] | None = None) -> Application:
    """The rewardkit Serve application: reward replicas (+ the R2M updater when it is wanted)."""
    from rewardkit.server.settings import Settings

    env = rewardkit_env() if env is None else dict(env)
    with_updater, rep_overrides, warning = updater_wanted(overrides, scale)
    if warning:
        log.warning(warning)
    updater = None
    if with_updater:
        updater_dep: Any = serve.deployment(  # Any: serve.deployment's overloads hide .bind from mypy
            R2MUpdater, name="R2MUpdater", num_replicas=1, health_check_period_s=10.0,
            ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(env)}})
        updater = updater_dep.bind(dict(overrides))
    grace = Settings(**rep_overrides).grace_period_s
    deployment: Any = serve.deployment(RewardReplica, name="RewardReplica", **replica_options(scale, grace, env))
    return deployment.bind(rep_overrides, updater)  # type: ignore[no-any-return]


def app_builder(args: dict[str, Any]) -> Application:
    """``serve run rewardkit.server.ray_serve.deployment:app_builder key=value ...`` and KubeRay's
    ``serveConfigV2.applications[].import_path``: ``args`` holds Settings fields (``model``, ``redis_url``, ...) and
    the scale fields (``replicas`` (a count or ``auto``), ``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``, ``num_gpus``, ``num_cpus``, ``max_ongoing_requests``)."""
    from rewardkit.server.settings import Settings

    args = dict(args or {})
    scale = Scale.from_args(args)
    overrides = {k: v for k, v in args.items() if k not in SCALE_FIELDS}
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown rewardkit args {unknown}: use Settings fields (docs/api.md) or {list(SCALE_FIELDS)}")
    Settings(**overrides)  # fail here, naming the field, not in every replica
    return build_application(overrides, scale)
