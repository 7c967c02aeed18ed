"""Prometheus metrics of the reward server, on a registry the caller owns.

`Metrics(registry)` creates every collector on that registry (never on prometheus_client's
global one), so tests and several apps in one process do not collide. Names start with
``rewardkit_``, carry their unit (``_seconds``, ``_tokens``), and labels are few and bounded:
``endpoint`` (the route template, not the raw path), ``status`` (the HTTP code), ``model``
(the served model's name) and ``head_version`` (see `observe_rewards` for how that label is
kept bounded). docs/metrics.md lists every series and why the server runs one worker process
per replica (so no multiprocess mode).

Example::

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_request("/v1/rewards", 200, 0.012)
    body, content_type = metrics.render()
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from rewardkit.server.drift import DriftSnapshot

__all__ = ["Metrics", "REWARD_BUCKETS", "metric_names"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
REWARD_BUCKETS = (
    -10.0, -7.5, -5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.25, 0.0,
    0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0,
)  # fmt: skip
"""Rewards of common reward models live in about [-10, 10]; finer near 0 where most mass is."""
ENTROPY_BUCKETS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)
"""Attention-row entropy in nats; ln(2048) = 7.6 is a uniform row over 2048 tokens."""


class _BatchStatsLike(Protocol):
    """What `observe_batch_stats` reads (rewardkit.server.scheduler.BatchStats has these fields)."""

    size: int
    tokens: int
    padded_tokens: int
    queue_wait_s: list[float]
    seconds: float


class _ScoreLike(Protocol):
    reward: float


class Metrics:
    """Every rewardkit collector, registered on `registry`.

    The helper methods are the interface for the app; the collectors are public attributes
    for anything the helpers do not cover. All helpers are thread-safe (prometheus_client's
    collectors are; the head-version bookkeeping has its own lock).

    Args:
        registry: where the collectors live; `render()` exposes exactly this registry.
        max_head_versions: reward-histogram series kept per model; older head versions'
            series are removed so an R2M server that publishes a head every minute does not
            grow without bound.
    """

    def __init__(self, registry: CollectorRegistry, max_head_versions: int = 2) -> None:
        if not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"registry must be a prometheus_client.CollectorRegistry, got {type(registry).__name__}"
            )
        if max_head_versions < 1:
            raise ValueError(f"max_head_versions must be >= 1, got {max_head_versions}")
        self.registry = registry
        self.max_head_versions = max_head_versions
        self._lock = threading.Lock()
        self._head_versions: dict[str, list[str]] = {}
        r = registry

        # HTTP
        self.requests_total = Counter(
            "rewardkit_requests_total", "HTTP requests by route template and status code.",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.request_duration_seconds = Histogram(
            "rewardkit_request_duration_seconds", "HTTP request latency, receipt to response.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Scheduler
        self.queue_wait_seconds = Histogram(
            "rewardkit_queue_wait_seconds", "Time an item waits in the queue before its batch starts.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("rewardkit_queue_depth", "Items waiting for the model worker.", registry=r)
        self.queue_capacity = Gauge(
            "rewardkit_queue_capacity", "Items the queue accepts before answering 429.", registry=r
        )
        self.inference_duration_seconds = Histogram(
            "rewardkit_inference_duration_seconds", "Model forward time of one batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "rewardkit_batch_size", "Items per model batch.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rewardkit_batch_tokens", "Real (non-pad) tokens per model batch.",
            buckets=BATCH_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_padding_fraction = Histogram(
            "rewardkit_batch_padding_fraction", "Share of a batch's token positions that are padding.",
            buckets=FRACTION_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens_scored_total = Counter(
            "rewardkit_tokens_scored_total", "Real tokens run through the model.", registry=r
        )
        # Rewards
        self.reward = Histogram(
            "rewardkit_reward", "Rewards returned, by model and head version.",
            ["model", "head_version"], buckets=REWARD_BUCKETS, registry=r,
        )  # fmt: skip
        self.rewards_nonfinite_total = Counter(
            "rewardkit_rewards_nonfinite_total", "NaN or infinite rewards produced (a model bug).",
            ["model"], registry=r,
        )  # fmt: skip
        self.component_errors_total = Counter(
            "rewardkit_component_errors_total",
            "Items a part of a composition (rewards: {name: weight}) could not score, by part (the configured model "
            "and component names).", ["part"], registry=r,
        )  # fmt: skip
        self.abc_attention_entropy = Histogram(
            "rewardkit_abc_attention_entropy", "Entropy (nats) of the ABC attention row of an item.",
            buckets=ENTROPY_BUCKETS, registry=r,
        )  # fmt: skip
        # R2M online alignment
        self.r2m_updates_total = Counter(
            "rewardkit_r2m_updates_total", "R2M head updates published.", ["model"], registry=r
        )
        self.r2m_loss = Gauge("rewardkit_r2m_loss", "Loss of the last R2M update.", ["model"], registry=r)
        self.r2m_group_entropy = Gauge(
            "rewardkit_r2m_group_entropy",
            "Mean entropy (nats) of R2M group assignments.",
            ["model"],
            registry=r,
        )
        self.r2m_active_head_version = Gauge(
            "rewardkit_r2m_active_head_version",
            "Head version serving requests (numeric).",
            ["model"],
            registry=r,
        )
        self.r2m_feedback_frames_total = Counter(
            "rewardkit_r2m_feedback_frames_total", "Feedback frames received for R2M.", ["model"], registry=r
        )
        # Drift (from DriftSnapshot)
        self.drift_psi = Gauge(
            "rewardkit_drift_psi", "Reward PSI, window vs reference.", ["model"], registry=r
        )
        self.drift_ks = Gauge("rewardkit_drift_ks", "Reward two-sample KS statistic.", ["model"], registry=r)
        self.drift_mean_shift = Gauge(
            "rewardkit_drift_mean_shift",
            "Window mean minus reference mean, in reference stds.",
            ["model"],
            registry=r,
        )
        self.drift_std_ratio = Gauge(
            "rewardkit_drift_std_ratio", "Window reward std over reference std.", ["model"], registry=r
        )
        self.drift_reward_length_correlation = Gauge(
            "rewardkit_drift_reward_length_correlation", "Pearson correlation of reward and response length.",
            ["model"], registry=r,
        )  # fmt: skip
        self.drift_collapsed_group_share = Gauge(
            "rewardkit_drift_collapsed_group_share", "Share of groups whose rewards do not vary.",
            ["model"], registry=r,
        )  # fmt: skip
        self.drift_samples = Gauge(
            "rewardkit_drift_samples", "Observations in the drift window and reference.",
            ["model", "window"], registry=r,
        )  # fmt: skip
        self.drift_reference_pinned = Gauge(
            "rewardkit_drift_reference_pinned", "1 when the drift reference was pinned by an operator.",
            ["model"], registry=r,
        )  # fmt: skip
        self.reward_window_mean = Gauge(
            "rewardkit_reward_window_mean", "Mean reward over the drift window (the reward histogram has no _sum).",
            ["model"], registry=r,
        )  # fmt: skip
        self.reward_window_std = Gauge(
            "rewardkit_reward_window_std", "Reward std over the drift window.", ["model"], registry=r
        )
        # Caches
        self.prefix_cache_hits_total = Counter(
            "rewardkit_prefix_cache_hits_total",
            "Items whose prompt prefix was reused from a KV cache.",
            registry=r,
        )
        self.prefix_cache_saved_tokens_total = Counter(
            "rewardkit_prefix_cache_saved_tokens_total",
            "Tokens not recomputed thanks to prefix reuse.",
            registry=r,
        )
        # per run (x-rewardkit-run / run_id; at most max_runs series, then run="other"), set at scrape time
        self.run_gauges = {name: Gauge(f"rewardkit_run_{name}", doc, ["model", "run"], registry=r) for name, doc in (
            ("drift_psi", "Reward PSI of one run's window against that run's own first rewards."),
            ("drift_ks", "Reward two-sample KS statistic, one run against its own start."),
            ("drift_mean_shift", "Window mean minus the run's reference mean, in reference standard deviations."),
            ("reward_length_correlation", "Pearson correlation of reward and response length within one run."),
            ("collapsed_group_share", "Share of one run's groups whose rewards do not vary."),
            ("reward_window_mean", "Mean reward over one run's drift window."),
            ("items", "Items scored for one run (since the server started)."),
            ("step", "Last trainer step a run sent (x-rewardkit-step / step)."),
            ("drift_samples", "Rewards in one run's drift window."))}
        # prompt KV cache across requests (rewardkit.core.prefix_cache)
        kv = "rewardkit_prefix_kv_cache"
        self.kv_cache_counters = {name: Counter(f"{kv}_{name}_total", doc, registry=r) for name, doc in (
            ("hits", "Items that reused a prompt's KV stored by an earlier batch."),
            ("misses", "Items looked up in the prompt KV cache that found no stored prefix."),
            ("stores", "Prompt KV entries stored."),
            ("evictions", "Prompt KV entries evicted (least recently used) to stay under the byte budget."),
            ("tokens_saved", "Prompt tokens not recomputed thanks to the KV cache across requests."))}
        self.kv_cache_bytes = Gauge(f"{kv}_bytes", "Bytes of prompt KV held (bounded by prefix_cache_mb).", registry=r)
        self.kv_cache_entries = Gauge(f"{kv}_entries", "Prompt KV entries held.", registry=r)
        self.cache_hits_total = Counter("rewardkit_cache_hits_total", "Score-cache hits.", registry=r)
        self.cache_misses_total = Counter("rewardkit_cache_misses_total", "Score-cache misses.", registry=r)

    # -- HTTP and scheduler ----------------------------------------------------------------

    def observe_request(self, endpoint: str, status: int | str, seconds: float) -> None:
        """Count one request and its latency. `endpoint` must be the route template."""
        self.requests_total.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_duration_seconds.labels(endpoint=endpoint).observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        """Record how long one item waited before its batch started."""
        self.queue_wait_seconds.observe(seconds)

    def set_queue_depth(self, items: int, capacity: int | None = None) -> None:
        """Set the number of queued items (and the queue's capacity, when given)."""
        self.queue_depth.set(items)
        if capacity is not None:
            self.queue_capacity.set(capacity)

    def observe_batch(self, size: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        """Record one model batch.

        Args:
            size: items in the batch.
            tokens: real tokens (no padding).
            padded_tokens: token positions the forward ran over (batch x padded length),
                so ``1 - tokens / padded_tokens`` is the padding fraction.
            seconds: forward time.
        """
        if size < 0 or tokens < 0 or padded_tokens < tokens:
            raise ValueError(
                f"observe_batch: need size >= 0 and 0 <= tokens <= padded_tokens, "
                f"got size={size}, tokens={tokens}, padded_tokens={padded_tokens}"
            )
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        if padded_tokens > 0:
            self.batch_padding_fraction.observe(1.0 - tokens / padded_tokens)
        self.tokens_scored_total.inc(tokens)
        self.inference_duration_seconds.observe(seconds)

    def observe_batch_stats(self, stats: _BatchStatsLike) -> None:
        """Record a scheduler `BatchStats`: the batch (`observe_batch`) and each item's queue wait."""
        self.observe_batch(stats.size, stats.tokens, stats.padded_tokens, stats.seconds)
        for wait in stats.queue_wait_s:
            self.queue_wait_seconds.observe(wait)

    # -- rewards ---------------------------------------------------------------------------

    def observe_rewards(self, model: str, head_version: int | str, rewards: Iterable[float]) -> None:
        """Add rewards to the reward histogram of (`model`, `head_version`).

        Non-finite rewards go to ``rewardkit_rewards_nonfinite_total`` instead. The histogram
        has negative buckets, so prometheus_client exposes no ``_sum`` for it: read the mean
        from ``rewardkit_reward_window_mean`` (set by `update_drift`). Only the
        `max_head_versions` most recently seen versions of a model keep a series; a newer
        version removes the oldest (its counts stop; rate() over the new series is what a
        dashboard should read anyway).
        """
        version = str(head_version)
        self._track_head_version(model, version)
        child = self.reward.labels(model=model, head_version=version)
        bad = 0
        for value in rewards:
            v = float(value)
            if math.isfinite(v):
                child.observe(v)
            else:
                bad += 1
        if bad:
            self.rewards_nonfinite_total.labels(model=model).inc(bad)

    def observe_scores(
        self,
        model: str,
        head_version: int | str,
        encs: Sequence[object],
        scores: Sequence[_ScoreLike],
        seconds: float | None = None,
    ) -> None:
        """Record the rewards of a scored request (the serving layer's call).

        Only ``score.reward`` is read. `encs` and `seconds` are accepted so the serving layer
        can pass what it has; request latency is recorded by `observe_request`.
        """
        self.observe_rewards(model, head_version, [score.reward for score in scores])

    def _track_head_version(self, model: str, version: str) -> None:
        with self._lock:
            seen = self._head_versions.setdefault(model, [])
            if version in seen:
                return
            seen.append(version)
            while len(seen) > self.max_head_versions:
                old = seen.pop(0)
                try:
                    self.reward.remove(model, old)
                except KeyError:
                    pass  # never observed under that version

    def observe_abc_entropy(self, entropies: Iterable[float]) -> None:
        """Record the ABC attention-row entropy (nats) of each item."""
        for value in entropies:
            v = float(value)
            if math.isfinite(v):
                self.abc_attention_entropy.observe(v)

    # -- R2M -------------------------------------------------------------------------------

    def observe_r2m_update(
        self, model: str, loss: float, head_version: int, group_entropy: float | None = None
    ) -> None:
        """Record one published R2M update. A NaN loss is recorded as NaN (alerts look for it)."""
        self.r2m_updates_total.labels(model=model).inc()
        self.r2m_loss.labels(model=model).set(loss)
        self.r2m_active_head_version.labels(model=model).set(head_version)
        if group_entropy is not None:
            self.r2m_group_entropy.labels(model=model).set(group_entropy)

    def set_active_head_version(self, model: str, head_version: int) -> None:
        """Set the serving head version (e.g. after a swap published by another replica)."""
        self.r2m_active_head_version.labels(model=model).set(head_version)

    def observe_feedback_frames(self, model: str, frames: int = 1) -> None:
        """Count feedback frames received for R2M."""
        self.r2m_feedback_frames_total.labels(model=model).inc(frames)

    # -- drift and caches ------------------------------------------------------------------

    def update_drift(self, model: str, snapshot: DriftSnapshot) -> None:
        """Copy a `DriftSnapshot` into the drift gauges; undefined statistics become NaN."""
        pairs = [
            (self.drift_psi, snapshot.psi),
            (self.drift_ks, snapshot.ks),
            (self.drift_mean_shift, snapshot.mean_shift),
            (self.drift_std_ratio, snapshot.std_ratio),
            (self.drift_reward_length_correlation, snapshot.reward_length_corr),
            (self.drift_collapsed_group_share, snapshot.collapsed_group_share),
            (self.reward_window_mean, snapshot.mean_current),
            (self.reward_window_std, snapshot.std_current),
        ]
        for gauge, value in pairs:
            gauge.labels(model=model).set(math.nan if value is None else value)
        self.drift_samples.labels(model=model, window="current").set(snapshot.n_current)
        self.drift_samples.labels(model=model, window="reference").set(snapshot.n_reference)
        self.drift_reference_pinned.labels(model=model).set(1.0 if snapshot.reference_pinned else 0.0)

    def observe_prefix_cache(self, hits: int, saved_tokens: int) -> None:
        """Count items that reused a prompt's KV cache and the tokens that saved."""
        self.prefix_cache_hits_total.inc(hits)
        self.prefix_cache_saved_tokens_total.inc(saved_tokens)

    def update_run(self, model: str, run: str, snapshot: DriftSnapshot, items: int, step: int | None) -> None:
        """One run's drift snapshot and counters into the ``rewardkit_run_*`` gauges (undefined: NaN)."""
        values = {"drift_psi": snapshot.psi, "drift_ks": snapshot.ks, "drift_mean_shift": snapshot.mean_shift,
                  "reward_length_correlation": snapshot.reward_length_corr,
                  "collapsed_group_share": snapshot.collapsed_group_share, "reward_window_mean": snapshot.mean_current,
                  "items": items, "step": step, "drift_samples": snapshot.n_current}
        for name, value in values.items():
            self.run_gauges[name].labels(model=model, run=run).set(math.nan if value is None else float(value))

    def observe_kv_cache(self, before: Any, after: Any) -> None:
        """The prompt KV cache's counters moved from ``before`` to ``after`` (``KVCacheStats`` snapshots)."""
        for name, counter in self.kv_cache_counters.items():
            delta = getattr(after, name) - getattr(before, name)
            if delta > 0:
                counter.inc(delta)
        self.kv_cache_bytes.set(after.bytes)
        self.kv_cache_entries.set(after.entries)

    def observe_score_cache(self, hits: int, misses: int) -> None:
        """Count score-cache lookups."""
        self.cache_hits_total.inc(hits)
        self.cache_misses_total.inc(misses)

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every series name `registry` can expose (histograms' _bucket/_count/_sum, counters' _total).

    Used by tests that check dashboards and alert rules refer only to real metrics.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names
