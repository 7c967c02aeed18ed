"""DriftMonitor on synthetic reward streams whose answer is known."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rewardkit.server.drift import (
    DriftMonitor,
    decode_state,
    encode_state,
    ks_statistic,
    merge_states,
    psi,
)

N = 2048


def _fill(
    monitor: DriftMonitor, rewards: np.ndarray, lengths: np.ndarray | None = None, chunk: int = 64
) -> None:
    if lengths is None:
        lengths = np.full(rewards.size, 100)
    for i in range(0, rewards.size, chunk):
        monitor.observe(rewards[i : i + chunk].tolist(), lengths[i : i + chunk].tolist())


def _monitor_with(ref: np.ndarray, cur: np.ndarray) -> DriftMonitor:
    """Reference filled from `ref`, then the window fully replaced by `cur`."""
    monitor = DriftMonitor(window=cur.size, reference_size=ref.size)
    _fill(monitor, ref)
    _fill(monitor, cur)
    return monitor


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_distribution_is_not_drift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    snap = _monitor_with(rng.normal(0.5, 2.0, N), rng.normal(0.5, 2.0, N)).snapshot()
    assert snap.psi is not None and snap.psi < 0.1
    assert snap.ks is not None and snap.ks < 0.06
    assert snap.ks_pvalue is not None and snap.ks_pvalue > 0.001
    assert snap.mean_shift is not None and abs(snap.mean_shift) < 0.15
    assert snap.std_ratio is not None and 0.9 < snap.std_ratio < 1.1
    assert snap.n_current == N and snap.n_reference == N and not snap.reference_pinned


def test_mean_shift_is_drift() -> None:
    rng = np.random.default_rng(3)
    snap = _monitor_with(rng.normal(0.0, 1.0, N), rng.normal(1.0, 1.0, N)).snapshot()
    assert snap.psi is not None and snap.psi > 0.25
    assert snap.ks is not None and snap.ks > 0.3  # true KS distance is 2*Phi(0.5)-1 = 0.383
    assert snap.ks_pvalue is not None and snap.ks_pvalue < 1e-6
    assert snap.mean_shift == pytest.approx(1.0, abs=0.1)
    assert snap.std_ratio == pytest.approx(1.0, abs=0.1)


def test_variance_change_is_seen_by_std_ratio_and_psi() -> None:
    rng = np.random.default_rng(4)
    snap = _monitor_with(rng.normal(0.0, 1.0, N), rng.normal(0.0, 3.0, N)).snapshot()
    assert snap.std_ratio == pytest.approx(3.0, rel=0.1)
    assert snap.mean_shift is not None and abs(snap.mean_shift) < 0.3
    assert snap.psi is not None and snap.psi > 0.25
    assert snap.ks is not None and snap.ks > 0.15


def test_reward_proportional_to_length_correlates() -> None:
    rng = np.random.default_rng(5)
    lengths = rng.integers(10, 500, N)
    monitor = DriftMonitor(window=N, reference_size=N)
    _fill(monitor, 0.01 * lengths + rng.normal(0.0, 0.01, N), lengths)
    snap = monitor.snapshot()
    assert snap.reward_length_corr is not None and snap.reward_length_corr > 0.99
    assert snap.reward_length_spearman is not None and snap.reward_length_spearman > 0.99


def test_reward_independent_of_length_does_not_correlate() -> None:
    rng = np.random.default_rng(6)
    monitor = DriftMonitor(window=N, reference_size=N)
    _fill(monitor, rng.normal(0.0, 1.0, N), rng.integers(10, 500, N))
    snap = monitor.snapshot()
    assert snap.reward_length_corr is not None and abs(snap.reward_length_corr) < 0.1
    assert snap.reward_length_spearman is not None and abs(snap.reward_length_spearman) < 0.1


def test_spearman_handles_ties_and_monotone_nonlinear() -> None:
    lengths = np.repeat(np.arange(1, 51), 4)  # heavy ties
    monitor = DriftMonitor(window=200, reference_size=200)
    monitor.observe(np.exp(lengths / 5.0).tolist(), lengths.tolist())
    snap = monitor.snapshot()
    assert snap.reward_length_spearman == pytest.approx(1.0, abs=1e-12)
    assert snap.reward_length_corr is not None and snap.reward_length_corr < 0.9  # Pearson sees the curve


def test_collapsed_groups_share() -> None:
    rng = np.random.default_rng(7)
    monitor = DriftMonitor(window=4096, reference_size=128)
    n_groups, group_size, n_collapsed = 100, 8, 30
    for g in range(n_groups):
        if g < n_collapsed:
            rewards = np.full(group_size, rng.normal()) + rng.normal(0.0, 1e-6, group_size)
        else:
            rewards = rng.normal(0.0, 1.0, group_size)
        monitor.observe(rewards.tolist(), [50] * group_size, [f"prompt-{g}"] * group_size)
    # Items without a group and singleton groups do not count.
    monitor.observe([0.0, 1.0, 2.0], [5, 5, 5], [None, "lonely", None])
    snap = monitor.snapshot()
    assert snap.n_groups == n_groups
    assert snap.collapsed_group_share == pytest.approx(n_collapsed / n_groups)


def test_collapse_threshold_is_relative_to_window_spread() -> None:
    # The same group-internal spread (0.01) is collapsed when prompts differ by ~1000 and not when by ~0.01.
    for scale, expect in [(1000.0, 1.0), (0.01, 0.0)]:
        rng = np.random.default_rng(8)
        monitor = DriftMonitor(window=1024, reference_size=128, collapse_eps=1e-3 * 10)
        for g in range(50):
            base = rng.normal(0.0, scale)
            monitor.observe((base + np.array([0.0, 0.01, -0.01, 0.005])).tolist(), [10] * 4, [str(g)] * 4)
        assert monitor.snapshot().collapsed_group_share == pytest.approx(expect)


def test_no_groups_gives_none() -> None:
    monitor = DriftMonitor(window=256, reference_size=256)
    monitor.observe([1.0, 2.0, 3.0], [1, 2, 3])
    snap = monitor.snapshot()
    assert snap.collapsed_group_share is None and snap.n_groups == 0


def test_statistics_are_none_below_min_samples() -> None:
    monitor = DriftMonitor(window=256, reference_size=256, min_samples=50)
    monitor.observe(np.arange(49.0).tolist(), [1] * 49)
    snap = monitor.snapshot()
    assert snap.psi is None and snap.ks is None and snap.reward_length_corr is None
    assert snap.n_current == 49 and snap.mean_current == pytest.approx(24.0)
    monitor.observe([100.0], [2])
    assert monitor.snapshot().psi == pytest.approx(0.0, abs=1e-12)


def test_reference_fills_from_first_observations_then_freezes() -> None:
    monitor = DriftMonitor(window=200, reference_size=200)
    _fill(monitor, np.zeros(200) + np.linspace(0, 1, 200))
    _fill(monitor, np.linspace(0, 1, 200) + 5.0)
    snap = monitor.snapshot()
    assert snap.n_reference == 200
    assert snap.mean_reference == pytest.approx(0.5)
    assert snap.mean_current == pytest.approx(5.5)
    assert snap.ks == pytest.approx(1.0)


def test_pin_reference_takes_current_window() -> None:
    monitor = DriftMonitor(window=200, reference_size=200)
    _fill(monitor, np.linspace(0, 1, 200))
    _fill(monitor, np.linspace(0, 1, 200) + 5.0)
    assert monitor.snapshot().psi > 1.0
    monitor.pin_reference()
    snap = monitor.snapshot()
    assert snap.reference_pinned
    assert snap.mean_reference == pytest.approx(5.5)
    assert snap.psi == pytest.approx(0.0, abs=1e-12) and snap.ks == 0.0
    # A pinned reference does not move when new data arrive.
    _fill(monitor, np.linspace(0, 1, 200) - 5.0)
    snap = monitor.snapshot()
    assert snap.mean_reference == pytest.approx(5.5) and snap.ks == pytest.approx(1.0)


def test_reset_reference_refills_from_next_observations() -> None:
    monitor = DriftMonitor(window=200, reference_size=150)
    _fill(monitor, np.linspace(0, 1, 200))
    monitor.pin_reference()
    monitor.reset_reference()
    snap = monitor.snapshot()
    assert snap.n_reference == 0 and not snap.reference_pinned and snap.psi is None
    _fill(monitor, np.linspace(0, 1, 200) + 3.0)
    snap = monitor.snapshot()
    assert snap.n_reference == 150
    assert snap.mean_reference == pytest.approx(3.0 + np.linspace(0, 1, 200)[:150].mean())


def test_pin_empty_window_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        DriftMonitor().pin_reference()


def test_nonfinite_rewards_are_dropped_and_counted() -> None:
    monitor = DriftMonitor(window=16, reference_size=16)
    monitor.observe([1.0, float("nan"), float("inf"), 2.0], [1, 2, 3, 4], ["a", "a", "b", "a"])
    snap = monitor.snapshot()
    assert snap.n_current == 2 and snap.nonfinite_dropped == 2
    assert snap.mean_current == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window": 1}, "window"),
        ({"reference_size": 0}, "reference_size"),
        ({"bins": 1}, "bins"),
        ({"min_samples": 1}, "min_samples"),
        ({"collapse_eps": -1.0}, "collapse_eps"),
        ({"collapse_eps": float("nan")}, "collapse_eps"),
    ],
)
def test_constructor_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DriftMonitor(**kwargs)


def test_observe_validation() -> None:
    monitor = DriftMonitor()
    with pytest.raises(ValueError, match="lengths"):
        monitor.observe([1.0, 2.0], [1])
    with pytest.raises(ValueError, match="group_ids"):
        monitor.observe([1.0, 2.0], [1, 2], ["a"])
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        monitor.observe([1.0], [-1])
    assert monitor.snapshot().n_current == 0


def test_psi_and_ks_functions_match_known_values() -> None:
    # Two halves: reference uniform on 10 bins, current all in the first bin.
    ref = np.arange(1000.0)
    cur = np.zeros(1000)
    p_ref, p_cur = np.full(10, 0.1), np.array([1.0] + [1e-4] * 9)
    expected = float(np.sum((p_cur - p_ref) * np.log(p_cur / p_ref)))
    assert psi(ref, cur, bins=10) == pytest.approx(expected)
    d, p = ks_statistic(np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 4.0, 5.0, 6.0]))
    assert d == pytest.approx(0.5)
    assert 0.0 < p <= 1.0
    with pytest.raises(ValueError):
        psi(np.array([]), cur)


def test_discrete_rewards_do_not_break_psi() -> None:
    rng = np.random.default_rng(9)
    ref = rng.integers(0, 3, N).astype(float)
    same = rng.integers(0, 3, N).astype(float)
    shifted = rng.choice([0.0, 1.0, 2.0], N, p=[0.1, 0.1, 0.8])
    assert psi(ref, same) < 0.1
    assert psi(ref, shifted) > 0.25


def test_state_roundtrip_through_bytes() -> None:
    rng = np.random.default_rng(10)
    monitor = DriftMonitor(window=300, reference_size=200)
    monitor.observe(
        rng.normal(size=300).tolist(), rng.integers(1, 99, 300).tolist(), [str(i // 4) for i in range(300)]
    )
    monitor.observe([float("nan")], [1])
    state = decode_state(encode_state(monitor.to_state()))
    restored = DriftMonitor.from_state(state, window=300, reference_size=200)
    assert restored.snapshot() == monitor.snapshot()
    with pytest.raises(ValueError, match="bytes"):
        decode_state(encode_state(monitor.to_state())[:-3])


def test_merge_states_pools_replicas() -> None:
    rng = np.random.default_rng(11)
    # Replica A saw a normal stream, replica B a shifted one; the fleet sees a mixture.
    a = DriftMonitor(window=1000, reference_size=1000)
    b = DriftMonitor(window=1000, reference_size=1000)
    _fill(a, rng.normal(0, 1, 1000))
    _fill(b, rng.normal(0, 1, 1000))
    _fill(a, rng.normal(0, 1, 1000))
    _fill(b, rng.normal(2, 1, 1000))
    # Groups split across replicas count once.
    a.observe([1.0, 1.0], [3, 3], ["shared", "shared"])
    b.observe([1.0], [3], ["shared"])
    merged = DriftMonitor.from_state(merge_states([a.to_state(), b.to_state()]))
    snap = merged.snapshot()
    assert snap.n_current == 2000 and snap.n_reference == 2000  # each window holds its last 1000
    assert snap.mean_shift == pytest.approx(1.0, abs=0.15)
    assert snap.n_groups == 1 and snap.collapsed_group_share == 1.0
    assert a.snapshot().psi < 0.1 < b.snapshot().psi
    with pytest.raises(ValueError, match="at least one"):
        merge_states([])


def test_concurrent_observers_lose_nothing() -> None:
    monitor = DriftMonitor(window=8 * 500, reference_size=100)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(50):
            monitor.observe(rng.normal(size=10).tolist(), [1] * 10)
            monitor.snapshot()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = monitor.snapshot()
    assert snap.n_current == 4000 and snap.n_reference == 100
