"""Metrics helpers change the series they should, on a private registry."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rewardkit.server.drift import DriftMonitor
from rewardkit.server.metrics import REWARD_BUCKETS, Metrics, metric_names


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(reg: CollectorRegistry) -> Metrics:
    return Metrics(reg)


def test_two_instances_do_not_collide_and_global_registry_untouched() -> None:
    before = {f.name for f in REGISTRY.collect()}
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.observe_request("/v1/rewards", 200, 0.1)
    assert (
        b.registry.get_sample_value("rewardkit_requests_total", {"endpoint": "/v1/rewards", "status": "200"})
        is None
    )
    assert not any(n.startswith("rewardkit") for n in {f.name for f in REGISTRY.collect()} - before)
    with pytest.raises(TypeError, match="registry"):
        Metrics(None)  # type: ignore[arg-type]


def test_all_names_prefixed_and_units_in_time_names(reg: CollectorRegistry, metrics: Metrics) -> None:
    families = list(reg.collect())
    assert len(families) >= 30
    for family in families:
        assert family.name.startswith("rewardkit_"), family.name
        if "duration" in family.name or "wait" in family.name:
            assert family.name.endswith("_seconds"), family.name


def test_observe_request(reg: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_request("/v1/rewards", 200, 0.02)
    metrics.observe_request("/v1/rewards", 200, 0.2)
    metrics.observe_request("/v1/rewards", 503, 3.0)
    get = reg.get_sample_value
    assert get("rewardkit_requests_total", {"endpoint": "/v1/rewards", "status": "200"}) == 2.0
    assert get("rewardkit_requests_total", {"endpoint": "/v1/rewards", "status": "503"}) == 1.0
    assert get("rewardkit_request_duration_seconds_count", {"endpoint": "/v1/rewards"}) == 3.0
    assert get("rewardkit_request_duration_seconds_sum", {"endpoint": "/v1/rewards"}) == pytest.approx(3.22)
    assert get("rewardkit_request_duration_seconds_bucket", {"endpoint": "/v1/rewards", "le": "0.025"}) == 1.0


def test_queue(reg: CollectorRegistry, metrics: Metrics) -> None:
    metrics.set_queue_depth(17, capacity=4096)
    metrics.observe_queue_wait(0.004)
    assert reg.get_sample_value("rewardkit_queue_depth") == 17.0
    assert reg.get_sample_value("rewardkit_queue_capacity") == 4096.0
    assert reg.get_sample_value("rewardkit_queue_wait_seconds_count") == 1.0
    metrics.set_queue_depth(3)
    assert reg.get_sample_value("rewardkit_queue_depth") == 3.0
    assert reg.get_sample_value("rewardkit_queue_capacity") == 4096.0


def test_observe_batch(reg: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_batch(size=8, tokens=600, padded_tokens=800, seconds=0.05)
    get = reg.get_sample_value
    assert get("rewardkit_batch_size_sum") == 8.0
    assert get("rewardkit_batch_tokens_sum") == 600.0
    assert get("rewardkit_batch_padding_fraction_sum") == pytest.approx(0.25)
    assert get("rewardkit_batch_padding_fraction_bucket", {"le": "0.2"}) == 0.0
    assert get("rewardkit_batch_padding_fraction_bucket", {"le": "0.3"}) == 1.0
    assert get("rewardkit_tokens_scored_total") == 600.0
    assert get("rewardkit_inference_duration_seconds_sum") == pytest.approx(0.05)
    with pytest.raises(ValueError, match="padded_tokens"):
        metrics.observe_batch(size=1, tokens=10, padded_tokens=5, seconds=0.1)


def test_observe_batch_stats_from_the_real_scheduler_type(reg: CollectorRegistry, metrics: Metrics) -> None:
    scheduler = pytest.importorskip("rewardkit.server.scheduler", reason="scheduler module not importable")
    stats = scheduler.BatchStats(
        size=3, tokens=90, padded_tokens=120, queue_wait_s=[0.001, 0.002, 0.5], seconds=0.04
    )
    metrics.observe_batch_stats(stats)
    get = reg.get_sample_value
    assert get("rewardkit_batch_size_sum") == 3.0
    assert get("rewardkit_batch_padding_fraction_sum") == pytest.approx(0.25)
    assert get("rewardkit_queue_wait_seconds_count") == 3.0
    assert get("rewardkit_queue_wait_seconds_bucket", {"le": "0.0025"}) == 2.0
    assert get("rewardkit_inference_duration_seconds_sum") == pytest.approx(0.04)


def test_observe_scores_reads_rewards(reg: CollectorRegistry, metrics: Metrics) -> None:
    scoring = pytest.importorskip("rewardkit.core.scoring", reason="core scoring module not importable")
    scores = [scoring.ItemScore(reward=r, num_tokens=5, truncated=False, raw_reward=r) for r in (0.1, -0.3)]
    metrics.observe_scores("rm", 2, [None, None], scores, 0.01)
    assert reg.get_sample_value("rewardkit_reward_count", {"model": "rm", "head_version": "2"}) == 2.0


def test_observe_rewards(reg: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_rewards("rm", 0, [-12.0, -1.0, 0.1, 3.0, float("nan"), float("inf")])
    labels = {"model": "rm", "head_version": "0"}
    get = reg.get_sample_value
    assert get("rewardkit_reward_count", labels) == 4.0
    # prometheus_client exposes no _sum for a histogram with negative buckets (it would not be
    # monotonic); the window mean comes from the drift gauges instead.
    assert get("rewardkit_reward_sum", labels) is None
    assert get("rewardkit_reward_bucket", {**labels, "le": "-10.0"}) == 1.0
    assert get("rewardkit_reward_bucket", {**labels, "le": "0.0"}) == 2.0
    assert get("rewardkit_rewards_nonfinite_total", {"model": "rm"}) == 2.0
    assert REWARD_BUCKETS[0] == -10.0 and REWARD_BUCKETS[-1] == 10.0


def test_reward_histogram_keeps_bounded_head_versions(reg: CollectorRegistry) -> None:
    metrics = Metrics(reg, max_head_versions=2)
    for version in range(5):
        metrics.observe_rewards("rm", version, [0.5])
    metrics.observe_rewards("rm", 4, [0.5])
    versions = {
        s.labels["head_version"]
        for f in reg.collect()
        if f.name == "rewardkit_reward"
        for s in f.samples
        if s.name == "rewardkit_reward_count"
    }
    assert versions == {"3", "4"}
    assert reg.get_sample_value("rewardkit_reward_count", {"model": "rm", "head_version": "4"}) == 2.0


def test_r2m(reg: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_feedback_frames("rm", 5)
    metrics.observe_r2m_update("rm", loss=0.42, head_version=3, group_entropy=1.1)
    metrics.observe_r2m_update("rm", loss=float("nan"), head_version=4)
    m = {"model": "rm"}
    get = reg.get_sample_value
    assert get("rewardkit_r2m_feedback_frames_total", m) == 5.0
    assert get("rewardkit_r2m_updates_total", m) == 2.0
    assert math.isnan(get("rewardkit_r2m_loss", m))
    assert get("rewardkit_r2m_active_head_version", m) == 4.0
    assert get("rewardkit_r2m_group_entropy", m) == pytest.approx(1.1)
    metrics.set_active_head_version("rm", 7)
    assert get("rewardkit_r2m_active_head_version", m) == 7.0


def test_abc_entropy(reg: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_abc_entropy([0.1, 2.2, float("nan")])
    assert reg.get_sample_value("rewardkit_abc_attention_entropy_count") == 2.0
    assert reg.get_sample_value("rewardkit_abc_attention_entropy_bucket", {"le": "0.25"}) == 1.0


def test_update_drift_from_real_snapshot(reg: CollectorRegistry, metrics: Metrics) -> None:
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(window=500, reference_size=500)
    monitor.observe(rng.normal(0, 1, 500).tolist(), rng.integers(1, 100, 500).tolist())
    monitor.observe(rng.normal(2, 1, 500).tolist(), rng.integers(1, 100, 500).tolist())
    snap = monitor.snapshot()
    metrics.update_drift("rm", snap)
    m = {"model": "rm"}
    get = reg.get_sample_value
    assert get("rewardkit_drift_psi", m) == pytest.approx(snap.psi) and snap.psi > 0.25
    assert get("rewardkit_drift_ks", m) == pytest.approx(snap.ks)
    assert get("rewardkit_drift_mean_shift", m) == pytest.approx(snap.mean_shift)
    assert get("rewardkit_drift_std_ratio", m) == pytest.approx(snap.std_ratio)
    assert get("rewardkit_drift_reward_length_correlation", m) == pytest.approx(snap.reward_length_corr)
    assert math.isnan(get("rewardkit_drift_collapsed_group_share", m))  # no groups observed
    assert get("rewardkit_drift_samples", {"model": "rm", "window": "current"}) == 500.0
    assert get("rewardkit_drift_reference_pinned", m) == 0.0
    assert get("rewardkit_reward_window_mean", m) == pytest.approx(snap.mean_current)
    assert get("rewardkit_reward_window_std", m) == pytest.approx(snap.std_current)
    # After a reset the statistics become undefined: the gauges must not keep stale values.
    monitor.reset_reference()
    metrics.update_drift("rm", monitor.snapshot())
    assert math.isnan(get("rewardkit_drift_psi", m))


def test_caches(reg: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_prefix_cache(hits=7, saved_tokens=900)
    metrics.observe_score_cache(hits=3, misses=5)
    get = reg.get_sample_value
    assert get("rewardkit_prefix_cache_hits_total") == 7.0
    assert get("rewardkit_prefix_cache_saved_tokens_total") == 900.0
    assert get("rewardkit_cache_hits_total") == 3.0
    assert get("rewardkit_cache_misses_total") == 5.0


def test_render_parses(metrics: Metrics) -> None:
    metrics.observe_request("/v1/rewards", 200, 0.01)
    metrics.observe_rewards("rm", 1, [0.3])
    metrics.observe_r2m_update("rm", loss=float("nan"), head_version=1)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["rewardkit_requests"].type == "counter"
    assert families["rewardkit_reward"].type == "histogram"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("rewardkit_requests_total", (("endpoint", "/v1/rewards"), ("status", "200")))] == 1.0
    assert math.isnan(samples[("rewardkit_r2m_loss", (("model", "rm"),))])


def test_metric_names_lists_suffixed_series(metrics: Metrics) -> None:
    names = metric_names(metrics.registry)
    assert {"rewardkit_requests_total", "rewardkit_reward_bucket", "rewardkit_queue_depth"} <= names
    assert "rewardkit_queue_depth_total" not in names


def test_concurrent_helpers(reg: CollectorRegistry, metrics: Metrics) -> None:
    def worker(i: int) -> None:
        for v in range(200):
            metrics.observe_rewards("rm", v % 4, [0.0])
            metrics.observe_request("/v1/rewards", 200, 0.001)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (
        reg.get_sample_value("rewardkit_requests_total", {"endpoint": "/v1/rewards", "status": "200"})
        == 800.0
    )
