"""``rewardkit serve``: start the HTTP server (one uvicorn worker per replica: the model worker owns the device)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rewardkit.server.settings import Settings

log = logging.getLogger(__name__)

_FLAGS = {  # CLI flag -> Settings field
    "model": "model", "device": "device", "dtype": "dtype", "host": "host", "port": "port",
    "max_length": "max_length", "max_batch_tokens": "max_batch_tokens", "max_batch_size": "max_batch_size",
    "max_wait_ms": "max_wait_ms", "max_queue_items": "max_queue_items", "padding_side": "padding_side",
    "redis_url": "redis_url", "api_keys_file": "api_keys_file", "state_dir": "state_dir",
    "reward_token_rule": "reward_token_rule", "grace_period_s": "grace_period_s",
    "abc_layer": "abc_layer", "abc_num_layers": "abc_num_layers", "served_model_name": "served_model_name",
    "prefix_cache_mb": "prefix_cache_mb", "component": "components", "default_rewards": "default_rewards",
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="start the reward server", description=(
        "Start the reward server. Every flag also reads from REWARDKIT_<NAME> (e.g. REWARDKIT_MODEL). "
        "With no --model, serves the embedded SmolLM2-135M-Instruct reward model."))
    p.add_argument("--model", action="append", metavar="[NAME=]PATH", help=(
        "HF sequence-classification dir, rewardkit checkpoint, .gguf file, or hub id; give it again as NAME=PATH "
        "to serve more reward models (requests pick one with `model`, or combine them with `rewards`)"))
    p.add_argument("--component", action="append", metavar="NAME=KIND[:JSON]", help=(
        "a reward component requests may combine with the models (repeatable): length_penalty, regex, "
        "exact_match, numeric_match, e.g. concise=length_penalty:'{\"limit\": 400}' (docs/team.md)"))
    p.add_argument("--default-rewards", metavar="NAME=W,...", help=(
        "the composition the compatibility endpoints (/get_reward, /pooling, /classify, /v1/embeddings) return, "
        "e.g. default=1,math=0.5 (default: the first --model alone)"))
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="another name clients may send as `model` (repeatable), e.g. the path a trainer is configured with")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--max-length", type=int, help="max tokens per item (default 2048)")
    p.add_argument("--max-batch-tokens", type=int, help="padded tokens per batch (default 16384)")
    p.add_argument("--max-batch-size", type=int, help="items per batch (default 64)")
    p.add_argument("--max-wait-ms", type=float, help="batching window (default 5 ms)")
    p.add_argument("--max-queue-items", type=int, help="queue bound before 429 (default 4096)")
    p.add_argument("--padding-side", choices=["left", "right"])
    p.add_argument("--reward-token-rule", choices=["transformers", "last_attended"])
    p.add_argument("--no-truncate", action="store_true", help="reject over-long items with 422 instead of truncating")
    p.add_argument("--no-prefix-sharing", action="store_true", help="disable shared-prompt KV reuse")
    p.add_argument("--prefix-cache-mb", type=float,
                   help="MiB of prompt KV kept across requests for GRPO mates in later batches (default 256; 0: off)")
    p.add_argument("--redis-url", help="redis://host:port/db for shared state across replicas")
    p.add_argument("--api-keys-file", help="file with one API key per line (or REWARDKIT_API_KEYS)")
    p.add_argument("--state-dir", help="where R2M heads are kept (default ./rewardkit-state)")
    p.add_argument("--grace-period-s", type=float, help="SIGTERM drain time (default 30)")
    p.add_argument("--abc-layer", type=int, help="ABC: layer whose attention row gives the credit (default -1, the last)")
    p.add_argument("--abc-num-layers", type=int, help="ABC: average the rows of this many layers (default 1)")
    p.add_argument("--no-abc-renormalize", action="store_true",
                   help="ABC: keep the raw attention share instead of renormalising over the response")
    ray = p.add_argument_group("Ray Serve (with --ray; needs pip install 'rewardkit[ray]'; docs/deploy.md)")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application: N replicas behind one "
                     "HTTP address on --host/--port")
    ray.add_argument("--replicas", default=None, metavar="N|auto",
                     help="reward replicas, or auto: autoscale on ongoing requests (default 1)")
    ray.add_argument("--min-replicas", type=int, help="with --replicas auto (default 1)")
    ray.add_argument("--max-replicas", type=int, help="with --replicas auto (default 4)")
    ray.add_argument("--target-ongoing-requests", type=float,
                     help="with --replicas auto: ongoing requests per replica before one is added (default 16)")
    ray.add_argument("--num-gpus", type=float, help="GPUs per replica (default 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--num-cpus", type=float, help="CPUs per replica (default 1; also its torch threads)")
    ray.add_argument("--max-ongoing-requests", type=int, help="requests one replica takes at once (default 256)")
    ray.add_argument("--ray-address", help="join this Ray cluster (auto, or the head's host:port); default: start "
                     "a local Ray instance, stopped on exit")
    p.set_defaults(func=run)
    add_updater_parser(sub)


def add_updater_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("r2m-updater", help="run the R2M updater in a process of its own (docs/r2m.md)", description=(
        "Run the R2M online updater apart from the servers (their REWARDKIT_R2M_UPDATER=false), pinned to its own "
        "cores, so scoring never waits for a GREBT step. Reads the same REWARDKIT_* settings as 'serve'; needs the "
        "feedback queue in Redis."))
    p.add_argument("--model", help="the servers' model (path, HF id or embedded:NAME)")
    p.add_argument("--redis-url", help="redis://host:port/db, the servers' (or REWARDKIT_REDIS_URL)")
    p.add_argument("--state-dir", help="head store (default ./rewardkit-state; the servers' when on one host)")
    p.add_argument("--cpus", default="", help="comma-separated CPU ids to pin to, e.g. 1 or 2,3 (default: no pin)")
    p.set_defaults(func=run_updater_cli)


def run_updater_cli(args: argparse.Namespace) -> int:
    import os
    import sys

    from pydantic import ValidationError

    from rewardkit.server.r2m.process import run_updater
    from rewardkit.server.settings import Settings

    overrides = {k: getattr(args, k) for k in ("model", "redis_url", "state_dir") if getattr(args, k) is not None}
    try:
        cpus = [int(c) for c in args.cpus.split(",") if c.strip()]
        bad = sorted(set(cpus) - os.sched_getaffinity(0))
        if bad:
            raise ValueError(f"--cpus: {bad} not available here (this process may use {sorted(os.sched_getaffinity(0))})")
        settings = Settings(**overrides)
        return run_updater(settings, cpus)
    except (ValueError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the environment, overridden by the flags that were given (flags win over env vars).

    Invalid values raise :class:`SettingsError` with one line per bad setting, naming its flag and env var."""
    from pydantic import ValidationError

    from rewardkit.server.settings import Settings

    try:
        return _settings(args, Settings)
    except ValidationError as exc:
        flags = {field: flag for flag, field in _FLAGS.items()}
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            where = " / ".join(x for x in (f"--{flags[name].replace('_', '-')}" if name in flags else "",
                                           f"REWARDKIT_{name.upper()}" if name else "") if x)
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"setting {name or '?'} ({where}): {err['msg']}{got}" if name else f"settings: {err['msg']}")
        raise SettingsError(lines) from None


class SettingsError(ValueError):
    """Invalid server settings; ``lines`` has one message per bad setting."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """The Settings fields the flags set (the environment supplies the rest)."""
    overrides = {field: getattr(args, flag) for flag, field in _FLAGS.items()
                 if flag != "model" and getattr(args, flag, None) is not None}
    models = getattr(args, "model", None)
    if isinstance(models, str):  # a parser that takes one --model
        models = [models]
    if models:
        overrides["model"] = models[0]  # NAME=PATH is split by the settings
        extra: dict[str, str] = {}
        for spec in models[1:]:
            from rewardkit.server.settings import split_model_spec

            name, path = split_model_spec(spec)
            if name is None:
                raise SettingsError([f"--model {spec!r}: a second or later --model is NAME=PATH (the name requests "
                                     "use in `model` and `rewards`)"])
            if name in extra:
                raise SettingsError([f"--model {spec!r}: the name {name!r} is given twice"])
            extra[name] = path
        if extra:
            overrides["extra_models"] = extra
    if args.no_truncate:
        overrides["truncate"] = False
    if args.no_prefix_sharing:
        overrides["prefix_sharing"] = False
    if args.no_abc_renormalize:
        overrides["abc_renormalize"] = False
    return overrides


def _settings(args: argparse.Namespace, Settings: type) -> Settings:  # noqa: N803
    return Settings(**_overrides(args))  # type: ignore[no-any-return]


def _preflight_ray(settings: Settings, local: bool) -> None:
    """For a local Ray instance, what :func:`preflight` checks except the device (the replicas pick theirs); on a
    cluster the model path and the port are the nodes', not this machine's."""
    if not local:
        return
    from rewardkit.core.preflight import check_model_spec

    for path in (settings.model, *settings.extra_models.values()):
        check_model_spec(path)
    _check_port(settings)


def preflight(settings: Settings) -> None:
    """Fail before any model code: a model path that cannot be a model, a device torch would not take, a port that
    is taken (the model would otherwise load for ~50 s before the bind fails)."""
    from rewardkit.core.preflight import check_device, check_model_spec

    check_device(settings.device)
    for path in (settings.model, *settings.extra_models.values()):
        check_model_spec(path)
    _check_port(settings)


def _check_port(settings: Settings) -> None:
    import errno
    import socket

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((settings.host, settings.port))
        except OSError as exc:
            from rewardkit.core.errors import ConfigError

            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {settings.port} on {settings.host} is already in use (another rewardkit "
                                  "serve?); pick another with --port or REWARDKIT_PORT") from None
            raise ConfigError(f"cannot bind {settings.host}:{settings.port}: {exc.strerror}") from None


_RAY_ONLY = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_gpus", "num_cpus",
             "max_ongoing_requests", "ray_address")


def run(args: argparse.Namespace) -> int:
    import sys

    from rewardkit.core.errors import ConfigError

    use_ray = getattr(args, "ray", False)
    stray = [f"--{n.replace('_', '-')}" for n in _RAY_ONLY if getattr(args, n, None) is not None]
    if stray and not use_ray:
        print(f"error: {', '.join(stray)}: these flags need --ray", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        if use_ray:
            _preflight_ray(settings, local=not args.ray_address)
        else:
            preflight(settings)
    except SettingsError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not settings.is_loopback() and not settings.api_keys:
        log.warning("!!! binding %s beyond loopback WITHOUT API keys: anyone who can reach this port can use the "
                    "server. Set REWARDKIT_API_KEYS or --api-keys-file. !!!", settings.host)
    if use_ray:
        try:
            from rewardkit.server.ray_serve.launch import run_ray
        except ImportError as exc:
            print(f"error: --ray needs Ray: pip install 'rewardkit[ray]' ({exc})", file=sys.stderr)
            return 2
        return run_ray(settings, _overrides(args), args)
    import uvicorn

    from rewardkit.server.app import create_app

    # The model worker thread and the event loop share the GIL; the default 5 ms switch interval makes the loop wait
    # up to 5 ms for the worker's Python-side model code. 0.5 ms keeps HTTP parsing responsive.
    sys.setswitchinterval(0.0005)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            workers=1, access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.grace_period_s)  # type: ignore[arg-type]  # a float works
    state = app.state.rk
    server = _server_class()(config, state)
    if settings.exit_on_load_failure:
        state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.load_error:
        print(f"error: the model could not be loaded: {state.load_error}", file=sys.stderr)
        return 1
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, plus: the moment SIGTERM/SIGINT arrives, readiness says 503 and new work on connections
        that are still open is refused with 503 + Retry-After (uvicorn then stops accepting, waits up to the grace
        period for in-flight requests, and runs the app's lifespan shutdown, which drains the scheduler)."""

        def __init__(self, config: uvicorn.Config, state: object) -> None:
            super().__init__(config)
            self._rk_state = state

        def handle_exit(self, sig: int, frame: object) -> None:
            state = self._rk_state
            first = not state.shutting_down  # type: ignore[attr-defined]
            state.shutting_down = True  # type: ignore[attr-defined]
            delay = state.settings.shutdown_delay_s  # type: ignore[attr-defined]
            if not first or delay <= 0:  # a second signal: stop now
                super().handle_exit(sig, frame)  # type: ignore[arg-type]
                return
            # uvicorn closes idle kept-alive connections the moment it starts shutting down, so a request sent a few
            # ms later on one of them met a closed socket with no answer. For shutdown_delay_s the server keeps
            # serving: new work gets 503 + Retry-After + Connection: close, then uvicorn's own shutdown begins.
            import threading

            timer = threading.Timer(delay, lambda: uvicorn.Server.handle_exit(self, sig, frame))  # type: ignore[arg-type]
            timer.daemon = True
            timer.start()

    return Server

