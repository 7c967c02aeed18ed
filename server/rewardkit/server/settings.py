"""Server configuration: one pydantic-settings object, env vars ``REWARDKIT_*``, CLI flags map onto it."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

MAX_WEIGHT = 1000.0  # largest |weight| of a composition's part


def split_model_spec(value: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a value whose part before ``=`` is not a name (or that is an existing path)
    is a plain path."""
    from rewardkit.server.compose.components import NAME_RE

    name, sep, path = value.partition("=")
    if sep and path and NAME_RE.match(name) and not Path(value).exists():
        return name, path
    return None, value


class Settings(BaseSettings):
    """Every knob of the server. Defaults are safe for a single-host RL run."""

    model_config = SettingsConfigDict(env_prefix="REWARDKIT_", extra="ignore")
    _key_runs: dict[bytes, str] = PrivateAttr(default_factory=dict)  # API key -> run prefix it is bound to

    # model
    model: str | None = Field(None, description="reward model: HF dir, rewardkit checkpoint, .gguf, hub id; None = embedded default")
    device: str = Field("auto", description="auto (CUDA+bf16 if available, else CPU fp32), cpu, cuda, cuda:N")
    dtype: str | None = Field(None, description="float32, bfloat16, float16; default by device")
    trust_remote_code: bool = Field(False, description="only if you trust the model's code")
    reward_token_rule: Literal["transformers", "last_attended"] | None = None
    exit_on_load_failure: bool = Field(True, description="exit non-zero when the model cannot be loaded; false: stay "
                                       "up, /ready answers 503 with the reason")
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra names requests may send as `model` (comma-separated), as vLLM's "
        "--served-model-name; the model id, the --model path and `default` are always accepted")
    padding_side: Literal["left", "right"] = "right"
    # several models and compositions (rewardkit.server.compose; docs/team.md "Several reward signals")
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description=(
        "the name requests may use for --model in `model` and `rewards` (`default` always works); "
        "--model NAME=PATH sets it"))
    extra_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict, description=(
        "more reward models in this server, name -> path (a 2nd, 3rd --model NAME=PATH); each has its own "
        "scheduler, all share the one torch thread; env: JSON or NAME=PATH,NAME=PATH"))
    components: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "reward components, NAME=KIND[:JSON] (repeatable --component; kinds: length_penalty, regex, exact_match, "
        "numeric_match; exact_match and numeric_match are always there); env: a JSON list"))
    default_rewards: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict, description=(
        "the composition compatibility endpoints (/get_reward, /pooling, /classify, ...) return: name -> weight "
        "over models and components; empty: the --model alone; env: JSON or NAME=W,NAME=W"))
    # formatting
    max_length: int = Field(2048, ge=8, le=1_000_000, description="max tokens per item after formatting")
    truncate: bool = Field(True, description="truncate over-long items from the left (prompt first); off: 422")
    # batching
    max_batch_tokens: int = Field(16384, ge=64, description="padded tokens per model batch")
    max_batch_size: int = Field(64, ge=1)
    max_padding_fraction: float = Field(0.25, ge=0.0, le=1.0,
                                        description="an item joins a batch only if padding stays under this share")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long the batcher waits to fill a batch")
    max_queue_items: int = Field(4096, ge=1, description="items waiting for the model before 429")
    worker_mode: Literal["auto", "inline", "thread"] = Field(
        "auto", description=("auto = thread: the forwards on the server's one torch thread, where the model was "
                              "loaded (docs/operations.md: a second torch thread slows CPU forwards ~25%); inline: "
                              "on the event-loop thread"))
    padding_free: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on CPU run each item of a batch unpadded (SDPA's causal kernel), on GPU pad")
    # ABC dense rewards (beta is per request); see docs/abc.md for why each option exists
    abc_layer: int = Field(-1, description="layer whose attention row gives the credit (negative: from the end)")
    abc_num_layers: int = Field(1, ge=1, description="average the rows of this many layers ending at abc_layer")
    abc_renormalize: bool = Field(True, description="renormalise attention over the response (the paper's code)")
    prefix_sharing: bool = Field(True, description="compute a prompt shared by several items once (KV cache)")
    prefix_cache_mb: float = Field(256.0, ge=0, le=1_048_576, description=(
        "MiB of prompt KV kept across requests (LRU), so GRPO mates arriving in later batches skip their prompt; "
        "0 disables; needs prefix_sharing"))
    # limits on what clients control
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_items_per_request: int = Field(1024, ge=1)
    max_chars_per_item: int = Field(400_000, ge=1)
    request_timeout_s: float = Field(300.0, gt=0, description="deadline of a request in the queue")
    # http
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="bearer keys (env: comma-separated or a JSON list)")
    api_keys_file: Path | None = Field(None, description=(
        "file with one API key per line; 'KEY run=PREFIX' binds a key to runs whose id starts with PREFIX"))
    metrics_require_auth: bool = False
    docs_require_auth: bool = Field(True, description="with API keys set, /docs, /redoc and /openapi.json need a key "
                                    "too; false keeps them open")
    grace_period_s: float = Field(30.0, ge=0)
    shutdown_delay_s: float = Field(1.0, ge=0, le=60, description="after SIGTERM, keep answering (503 + Connection: "
                                    "close) this long before uvicorn closes idle kept-alive connections")
    log_level: str = "INFO"
    access_log: bool = Field(False, description="uvicorn's per-request access log (costs ~10% of a tiny request)")
    # shared state
    redis_url: str | None = Field(None, description="redis://host:port/db: score cache, head sharing, fleet drift")
    cache_ttl_s: int = Field(3600, ge=0, description="TTL of cached scores in Redis; 0 disables the score cache")
    redis_namespace: str = Field("rewardkit", min_length=1, description="key prefix in Redis (one per fleet)")
    redis_op_timeout_s: float = Field(0.5, gt=0, le=30, description="a slower Redis operation counts as Redis down")
    replica_id: str | None = Field(None, description="this replica's name in Redis and in the x-rewardkit-replica "
                                   "header (default: host-pid-random)")
    # drift monitoring (see rewardkit.server.drift)
    drift_enabled: bool = Field(True, description="feed returned rewards to the drift monitor")
    drift_window: int = Field(2048, ge=2, description="rewards in the sliding drift window")
    drift_reference_size: int = Field(2048, ge=2, description="first rewards that fill the reference automatically")
    drift_bins: int = Field(10, ge=2, le=100, description="quantile bins of the PSI")
    drift_collapse_eps: float = Field(1e-3, ge=0, description="group collapse threshold, relative to the window std")
    drift_min_samples: int = Field(100, ge=2, description="statistics are null below this many rewards")
    max_runs: int = Field(32, ge=1, le=10_000, description=(
        "distinct runs (x-rewardkit-run / run_id) with their own drift monitor and Prometheus series; later runs "
        "are counted as 'other'"))
    run_weights: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict, description=(
        "runs' shares of the model when several wait at once: run-id prefix -> weight (longest prefix wins; others "
        "weigh 1); env: JSON or PREFIX=W,PREFIX=W"))
    fair_batch_size: int | None = Field(None, ge=0, description=(
        "while two or more runs are active (waiting, or seen within 1 s), a batch holds at most this many items, smallest fair-share tags first, "
        "so a run's next item waits one short batch (None: 1 on the CPU's padding-free path, where a batch is one "
        "forward per item and its time grows with its items, else max_batch_size; 0: no cap). On the padding-free "
        "path a batch formed while one named run was alone also runs in parts of this size, so a run that shows up "
        "waits one part, not the whole batch"))
    drift_sync_interval_s: float = Field(5.0, gt=0, description="how often a replica pushes its window to Redis")
    state_dir: Path = Field(Path("./rewardkit-state"), description="R2M heads and other server state")
    # -- R2M online alignment (rewardkit.server.r2m; docs/r2m.md) --
    r2m_enabled: bool = Field(True, description="serve /v1/r2m/* and run the online updater")
    r2m_policy_hidden_size: int | None = Field(None, ge=1, description="policy's hidden size D_p; None = the RM's")
    r2m_d_attn: int = Field(256, ge=1, le=65536, description="cross-attention width d (paper: 2048)")
    r2m_omega: float = Field(0.65, ge=0.0, le=1.0, description="floor of the mix weight w(t)")
    r2m_total_rounds: int = Field(1000, ge=1, description="planned RL rounds T of the w(t) schedule")
    r2m_alpha: float = Field(0.3, ge=0.0, le=1.0, description="GRE weight in GREBT")
    r2m_lr: float = Field(1e-6, gt=0, le=1.0, description="head learning rate (paper: 1e-6 dialogue)")
    r2m_steps_per_update: int = Field(1, ge=1, le=1000, description="GREBT steps per completed group batch")
    r2m_group_size: int = Field(4, ge=2, le=1024, description="K: a group is complete with K members (or a flush)")
    r2m_max_frame_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest hidden-state payload per frame")
    r2m_max_frames_per_stream: int = Field(10_000, ge=1, description="frames per feedback/rewards request")
    r2m_max_rewards_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="hidden-state bytes one "
                                       "/v1/r2m/rewards request may hold after pooling; refused (413) as soon as passed")
    r2m_max_positions: int = Field(1024, ge=1, description="frames with more positions are strided-pooled to this")
    r2m_max_stream_bytes: int = Field(4 * 1024 ** 3, ge=1024, description="body limit of streamed R2M requests")
    r2m_max_pending_groups: int = Field(4096, ge=1, description="incomplete groups held before 429")
    r2m_max_pending_frames: int = Field(65536, ge=1, description="frames of incomplete groups held before 429")
    r2m_max_pending_bytes: int = Field(2 * 1024 ** 3, ge=1024, description="hidden-state bytes of incomplete groups "
                                       "held before 429")
    r2m_max_group_size: int = Field(1024, ge=2, description="largest header.group_size a frame may declare (422)")
    r2m_keep_versions: int = Field(20, ge=0, description="head versions kept on disk (the newest N, plus the initial and the active one); 0 = all (the disk grows one file per update)")
    r2m_updater: bool = Field(True, description="run the updater here (one per fleet: others only ingest)")
    r2m_seed: int = Field(0, description="seed of the initial head's random projections")
    r2m_updater_pause: float = Field(0.0, ge=0.0, le=100.0,
                                     description="after each GREBT step, sleep this multiple of its time (yields CPU)")

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _split_names(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("run_weights", "default_rewards", "extra_models", mode="before")
    @classmethod
    def _parse_weights(cls, v: object, info: Any) -> object:
        if isinstance(v, str):
            if v.strip().startswith("{"):
                return json.loads(v)
            out: dict[str, object] = {}
            for part in (p.strip() for p in v.split(",") if p.strip()):
                key, sep, w = (part.partition("=") if info.field_name == "extra_models" else part.rpartition("="))
                if not sep or not key:
                    what = "NAME=PATH" if info.field_name == "extra_models" else (
                        "PREFIX=WEIGHT" if info.field_name == "run_weights" else "NAME=WEIGHT")
                    raise ValueError(f"{info.field_name}: expected {what}, got {part!r}")
                out[key] = w
            return out
        return v

    @field_validator("components", mode="before")
    @classmethod
    def _parse_components(cls, v: object) -> object:
        if isinstance(v, str):
            return json.loads(v) if v.strip().startswith("[") else [v] if v.strip() else []
        return v

    @field_validator("run_weights", mode="after")
    @classmethod
    def _check_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for prefix, w in v.items():
            if not (0.001 <= w <= 1000):
                raise ValueError(f"run_weights[{prefix!r}]: a weight is in [0.001, 1000], got {w}")
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.api_keys_file is not None:
            if not self.api_keys_file.is_file():
                raise ValueError(f"api_keys_file {self.api_keys_file} does not exist")
            extra = [line.strip() for line in self.api_keys_file.read_text().splitlines() if line.strip()
                     and not line.startswith("#")]
            for i, line in enumerate(extra):
                key, *opts = line.split()
                for opt in opts:
                    name, _, value = opt.partition("=")
                    if name != "run" or not value:
                        raise ValueError(f"api_keys_file line {i + 1}: unknown option {opt!r} (expected run=PREFIX)")
                    self._key_runs[key.encode()] = value
                extra[i] = key
            self.api_keys = [*self.api_keys, *(SecretStr(k) for k in extra)]
        for k in self.api_keys:
            if len(k.get_secret_value()) < 8:
                raise ValueError("api keys must be at least 8 characters")
        self._check_models()
        if self.max_batch_tokens < self.max_length:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_length ({self.max_length}) "
                             "or a single long item could never be scheduled")
        return self

    def _check_models(self) -> None:
        """``--model NAME=PATH``; names unique over models and components; default_rewards names what exists."""
        from rewardkit.server.compose.components import NAME_RE, ConfigError, build_components

        if self.model and self.model_name is None:
            name, path = split_model_spec(self.model)
            if name is not None:
                self.model, self.model_name = path, name
        for name, path in self.extra_models.items():
            if not NAME_RE.match(name):
                raise ValueError(f"extra_models: model name {name!r} must match {NAME_RE.pattern}")
            if not path:
                raise ValueError(f"extra_models[{name!r}]: empty path")
        try:
            comps = build_components(self.components)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        models = self.model_names_configured()
        if len(set(models)) != len(models):
            raise ValueError(f"model names must differ: {models}")
        clash = sorted(set(models) & set(comps))
        if clash:
            raise ValueError(f"{clash}: a name is a model or a component, not both")
        for name, w in self.default_rewards.items():
            if name not in models and name not in comps:
                raise ValueError(f"default_rewards: {name!r} is neither a model ({', '.join(models)}) nor a "
                                 f"component ({', '.join(sorted(comps))})")
            if not (math.isfinite(w) and abs(w) <= MAX_WEIGHT):
                raise ValueError(f"default_rewards[{name!r}]: a weight is finite and within +-{MAX_WEIGHT:g}, got {w}")

    def model_names_configured(self) -> list[str]:
        """The names of the served models as configured: the first ``--model`` (``default`` and its name) first."""
        return ["default", *([self.model_name] if self.model_name else []), *self.extra_models]

    def run_weight(self, run: str | None) -> float:
        """A run's share of the model: the weight of the longest ``run_weights`` prefix it starts with, else 1."""
        best, weight = -1, 1.0
        for prefix, w in self.run_weights.items():
            if run is not None and run.startswith(prefix) and len(prefix) > best:
                best, weight = len(prefix), w
        return weight

    def key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]

    def key_run_prefix(self, key: bytes) -> str | None:
        """The run prefix a key is bound to (``KEY run=PREFIX`` in the keys file), or None."""
        return self._key_runs.get(key)

    def is_loopback(self) -> bool:
        if self.host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
