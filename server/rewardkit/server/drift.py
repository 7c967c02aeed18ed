"""Reward-distribution drift and reward-hacking monitors (pure numpy, thread-safe).

A `DriftMonitor` keeps two samples of scored rewards:

- the *current window*: the last `window` observations (a ring buffer), with each
  observation's response length and optional group id (a GRPO group: several completions
  of the same prompt);
- the *reference*: filled automatically from the first `reference_size` observations, or
  pinned explicitly from the current window with `pin_reference()`.

`snapshot()` compares the two and measures signals of reward hacking inside the window:

==========================  ==================================================================
field                       meaning
==========================  ==================================================================
psi                         population stability index over `bins` quantile bins of the
                            reference (< 0.1 stable, 0.1-0.25 moderate, > 0.25 drift)
ks                          two-sample Kolmogorov-Smirnov statistic (max CDF distance, 0..1)
ks_pvalue                   its asymptotic p-value (Kolmogorov distribution)
mean_shift                  (mean_current - mean_reference) / std_reference: in reference stds
std_ratio                   std_current / std_reference (1 = unchanged)
reward_length_corr          Pearson correlation of reward and response length (current window)
reward_length_spearman      Spearman rank correlation of the same (ties get average ranks)
collapsed_group_share       share of groups in the window whose rewards barely vary (below)
==========================  ==================================================================

A field is ``None`` when it is undefined: fewer than `min_samples` observations in the
sample(s) it needs, a constant sample (zero std), or no group with two members.

Group collapse. Among the groups with at least two members in the current window, a group
is *collapsed* when the std of its rewards is at most ``collapse_eps * std(window rewards)``.
The threshold is relative to the window's spread on purpose: reward models are unnormalised
(one model's rewards live in [-2, 2], another's in [-30, 30]), so an absolute epsilon would
mean different things per model; relative to the spread, "collapsed" means "the reward no
longer separates the completions of this prompt compared with how it separates prompts",
which is what makes GRPO's group-normalised advantages pure noise. If the whole window is
constant, every group counts as collapsed.

Aggregation across replicas. `to_state()` returns a plain dict (numpy arrays, strings,
numbers); `encode_state`/`decode_state` turn it into bytes (a small JSON header followed by
raw little-endian arrays, no pickle) for Redis. `merge_states(states)` pools several
replicas' windows and references, and `DriftMonitor.from_state(merged)` gives a monitor whose
`snapshot()` describes the whole fleet.

Example::

    monitor = DriftMonitor(window=1024, reference_size=1024)
    monitor.observe(rewards=[0.3, -1.2], lengths=[57, 130], group_ids=["p1", "p1"])
    snap = monitor.snapshot()   # psi etc. are None until min_samples observations
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "DriftMonitor",
    "DriftSnapshot",
    "decode_state",
    "encode_state",
    "ks_statistic",
    "merge_states",
    "psi",
]

STATE_VERSION = 1
PSI_EPS = 1e-4
"""Floor for a bin's proportion in PSI, so an empty bin gives a large but finite term."""


@dataclass(frozen=True)
class DriftSnapshot:
    """Drift statistics at one instant; see the module docstring for each field."""

    psi: float | None
    ks: float | None
    ks_pvalue: float | None
    mean_shift: float | None
    std_ratio: float | None
    reward_length_corr: float | None
    reward_length_spearman: float | None
    collapsed_group_share: float | None
    n_groups: int
    n_current: int
    n_reference: int
    reference_pinned: bool
    mean_current: float | None
    std_current: float | None
    mean_reference: float | None
    std_reference: float | None
    nonfinite_dropped: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, JSON-serialisable (for an admin endpoint or a log line)."""
        return asdict(self)


# --------------------------------------------------------------------------- statistics


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10, eps: float = PSI_EPS) -> float:
    """Population stability index of `current` against `reference`.

    Bin edges are the reference's inner quantiles (duplicates merged, so discrete rewards
    give fewer, wider bins); each proportion is floored at `eps`.
    ``PSI = sum((p_cur - p_ref) * ln(p_cur / p_ref))``.

    >>> round(psi(np.arange(100.0), np.arange(100.0)), 6)
    0.0
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.size == 0 or cur.size == 0:
        raise ValueError("psi needs non-empty reference and current samples")
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    n_bins = edges.size + 1
    p_ref = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=n_bins) / ref.size
    p_cur = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=n_bins) / cur.size
    p_ref = np.maximum(p_ref, eps)
    p_cur = np.maximum(p_cur, eps)
    return float(np.sum((p_cur - p_ref) * np.log(p_cur / p_ref)))


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value.

    >>> ks_statistic(np.zeros(50), np.ones(50))[0]
    1.0
    """
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_statistic needs non-empty reference and current samples")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    return d, _kolmogorov_pvalue(d, a.size, b.size)


def _kolmogorov_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic two-sided p-value (Stephens' small-sample correction of the effective n)."""
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = 2.0 * (-1.0) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return float(min(max(total, 0.0), 1.0))


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata 'average')."""
    sorter = np.argsort(x, kind="mergesort")
    inv = np.empty(sorter.size, dtype=np.intp)
    inv[sorter] = np.arange(sorter.size)
    xs = x[sorter]
    starts = np.concatenate([[True], xs[1:] != xs[:-1]])
    dense = np.cumsum(starts)[inv]  # 1-based id of each value's tie block
    bounds = np.concatenate([np.nonzero(starts)[0], [x.size]])
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    xc = x - x.mean()
    yc = y - y.mean()
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if denom == 0.0:
        return None
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def _collapsed_share(
    rewards: np.ndarray, group_ids: Sequence[str | None], eps: float
) -> tuple[float | None, int]:
    """Share of groups (>= 2 members in the window) whose reward std <= eps * window std."""
    members: dict[str, list[int]] = {}
    for i, gid in enumerate(group_ids):
        if gid is not None:
            members.setdefault(gid, []).append(i)
    groups = [idx for idx in members.values() if len(idx) >= 2]
    if not groups:
        return None, 0
    threshold = eps * float(rewards.std())
    collapsed = sum(1 for idx in groups if float(rewards[idx].std()) <= threshold)
    return collapsed / len(groups), len(groups)


# --------------------------------------------------------------------------- monitor


class DriftMonitor:
    """Sliding-window reward drift monitor; all public methods are thread-safe.

    Args:
        window: observations kept in the current window (ring buffer).
        reference_size: observations that fill the reference automatically.
        bins: quantile bins for PSI.
        collapse_eps: relative std threshold for a collapsed group (see module docstring).
        min_samples: statistics are ``None`` while a sample they need is smaller than this.
    """

    def __init__(
        self,
        window: int = 2048,
        reference_size: int = 2048,
        bins: int = 10,
        collapse_eps: float = 1e-3,
        min_samples: int = 100,
    ) -> None:
        _check_int("window", window, 2)
        _check_int("reference_size", reference_size, 2)
        _check_int("bins", bins, 2)
        _check_int("min_samples", min_samples, 2)
        if not (isinstance(collapse_eps, int | float) and math.isfinite(collapse_eps) and collapse_eps >= 0):
            raise ValueError(f"collapse_eps must be a finite number >= 0, got {collapse_eps!r}")
        self.window = window
        self.reference_size = reference_size
        self.bins = bins
        self.collapse_eps = float(collapse_eps)
        self.min_samples = min_samples
        self._lock = threading.Lock()
        self._rewards: deque[float] = deque(maxlen=window)
        self._lengths: deque[int] = deque(maxlen=window)
        self._groups: deque[str | None] = deque(maxlen=window)
        self._reference: list[float] = []
        self._pinned = False
        self._nonfinite = 0

    # -- input ------------------------------------------------------------------------

    def observe(
        self,
        rewards: Sequence[float],
        lengths: Sequence[int],
        group_ids: Sequence[str | None] | None = None,
    ) -> None:
        """Record scored items: one reward, response length (tokens) and group id each.

        Non-finite rewards are dropped and counted (`DriftSnapshot.nonfinite_dropped`).
        """
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        n = r.size
        if len(lengths) != n:
            raise ValueError(f"lengths must have one entry per reward ({n}), got {len(lengths)}")
        if group_ids is not None and len(group_ids) != n:
            raise ValueError(f"group_ids must have one entry per reward ({n}), got {len(group_ids)}")
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if n and lens.min() < 0:
            raise ValueError(f"lengths must be >= 0, got {int(lens.min())}")
        keep = np.isfinite(r)
        groups: list[str | None] = list(group_ids) if group_ids is not None else [None] * n
        with self._lock:
            self._nonfinite += int(n - keep.sum())
            for i in np.nonzero(keep)[0]:
                value = float(r[i])
                self._rewards.append(value)
                self._lengths.append(int(lens[i]))
                self._groups.append(groups[i])
                if not self._pinned and len(self._reference) < self.reference_size:
                    self._reference.append(value)

    def pin_reference(self) -> None:
        """Make the current window the reference and stop automatic filling."""
        with self._lock:
            if not self._rewards:
                raise ValueError("pin_reference: the current window is empty; observe rewards first")
            self._reference = list(self._rewards)
            self._pinned = True

    def reset_reference(self) -> None:
        """Drop the reference; it refills from the next `reference_size` observations."""
        with self._lock:
            self._reference = []
            self._pinned = False

    # -- output -----------------------------------------------------------------------

    def snapshot(self) -> DriftSnapshot:
        """Compute the drift statistics of the current window against the reference."""
        with self._lock:
            cur = np.fromiter(self._rewards, dtype=np.float64, count=len(self._rewards))
            lens = np.fromiter(self._lengths, dtype=np.float64, count=len(self._lengths))
            groups = list(self._groups)
            ref = np.asarray(self._reference, dtype=np.float64)
            pinned = self._pinned
            nonfinite = self._nonfinite
        return self._compute(cur, lens, groups, ref, pinned, nonfinite)

    def _compute(
        self,
        cur: np.ndarray,
        lens: np.ndarray,
        groups: list[str | None],
        ref: np.ndarray,
        pinned: bool,
        nonfinite: int,
    ) -> DriftSnapshot:
        enough_cur = cur.size >= self.min_samples
        enough_ref = ref.size >= self.min_samples
        psi_v = ks_v = ks_p = mean_shift = std_ratio = pearson = spearman = None
        if enough_cur and enough_ref:
            psi_v = psi(ref, cur, self.bins)
            ks_v, ks_p = ks_statistic(ref, cur)
            ref_std = float(ref.std())
            if ref_std > 0.0:
                mean_shift = float((cur.mean() - ref.mean()) / ref_std)
                std_ratio = float(cur.std() / ref_std)
        if enough_cur:
            pearson = _pearson(cur, lens)
            spearman = _pearson(_rankdata(cur), _rankdata(lens))
        collapsed, n_groups = _collapsed_share(cur, groups, self.collapse_eps) if cur.size else (None, 0)
        return DriftSnapshot(
            psi=psi_v,
            ks=ks_v,
            ks_pvalue=ks_p,
            mean_shift=mean_shift,
            std_ratio=std_ratio,
            reward_length_corr=pearson,
            reward_length_spearman=spearman,
            collapsed_group_share=collapsed,
            n_groups=n_groups,
            n_current=int(cur.size),
            n_reference=int(ref.size),
            reference_pinned=pinned,
            mean_current=float(cur.mean()) if cur.size else None,
            std_current=float(cur.std()) if cur.size else None,
            mean_reference=float(ref.mean()) if ref.size else None,
            std_reference=float(ref.std()) if ref.size else None,
            nonfinite_dropped=nonfinite,
        )

    # -- replica aggregation ------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """This monitor's samples as a plain dict (see `encode_state` for bytes)."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "rewards": np.fromiter(self._rewards, dtype=np.float64, count=len(self._rewards)),
                "lengths": np.fromiter(self._lengths, dtype=np.int64, count=len(self._lengths)),
                "group_ids": list(self._groups),
                "reference": np.asarray(self._reference, dtype=np.float64),
                "reference_pinned": self._pinned,
                "nonfinite_dropped": self._nonfinite,
            }

    @classmethod
    def from_state(cls, state: dict[str, Any], **kwargs: Any) -> DriftMonitor:
        """Build a monitor holding `state`'s samples (e.g. the output of `merge_states`).

        The window and reference capacities grow to hold the whole state, so a merged
        fleet-wide state is not truncated. `kwargs` go to the constructor.
        """
        _check_state(state)
        rewards = np.asarray(state["rewards"], dtype=np.float64)
        reference = np.asarray(state["reference"], dtype=np.float64)
        kwargs["window"] = max(kwargs.get("window", 2048), rewards.size, 2)
        # A restored reference keeps its fill status: full stays full, partial keeps filling.
        kwargs.setdefault("reference_size", 2048)
        kwargs["reference_size"] = max(kwargs["reference_size"], reference.size, 2)
        monitor = cls(**kwargs)
        monitor._rewards.extend(rewards.tolist())
        monitor._lengths.extend(np.asarray(state["lengths"], dtype=np.int64).tolist())
        monitor._groups.extend(state["group_ids"])
        monitor._reference = reference.tolist()
        monitor._pinned = bool(state["reference_pinned"])
        monitor._nonfinite = int(state.get("nonfinite_dropped", 0))
        return monitor


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool several replicas' states: windows and references are concatenated.

    Group ids are shared across replicas (a group split over two replicas is one group).
    The merged reference counts as pinned only when every replica's reference is pinned.
    """
    if not states:
        raise ValueError("merge_states needs at least one state, got an empty sequence")
    for s in states:
        _check_state(s)
    return {
        "version": STATE_VERSION,
        "rewards": np.concatenate([np.asarray(s["rewards"], dtype=np.float64) for s in states]),
        "lengths": np.concatenate([np.asarray(s["lengths"], dtype=np.int64) for s in states]),
        "group_ids": [g for s in states for g in s["group_ids"]],
        "reference": np.concatenate([np.asarray(s["reference"], dtype=np.float64) for s in states]),
        "reference_pinned": all(bool(s["reference_pinned"]) for s in states),
        "nonfinite_dropped": sum(int(s.get("nonfinite_dropped", 0)) for s in states),
    }


# --------------------------------------------------------------------------- bytes


def encode_state(state: dict[str, Any]) -> bytes:
    """Serialise a state: u32 header length, JSON header, then raw little-endian arrays."""
    _check_state(state)
    rewards = np.ascontiguousarray(state["rewards"], dtype="<f8")
    lengths = np.ascontiguousarray(state["lengths"], dtype="<i8")
    reference = np.ascontiguousarray(state["reference"], dtype="<f8")
    header = {
        "version": STATE_VERSION,
        "n": int(rewards.size),
        "n_reference": int(reference.size),
        "group_ids": list(state["group_ids"]),
        "reference_pinned": bool(state["reference_pinned"]),
        "nonfinite_dropped": int(state.get("nonfinite_dropped", 0)),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + rewards.tobytes() + lengths.tobytes() + reference.tobytes()


def decode_state(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_state`; raises ValueError on malformed input."""
    if len(data) < 4:
        raise ValueError(f"drift state: need at least 4 bytes, got {len(data)}")
    (hlen,) = struct.unpack_from("<I", data, 0)
    if 4 + hlen > len(data):
        raise ValueError(f"drift state: header length {hlen} exceeds the {len(data)}-byte payload")
    header = json.loads(data[4 : 4 + hlen])
    if header.get("version") != STATE_VERSION:
        raise ValueError(
            f"drift state: unsupported version {header.get('version')!r}, expected {STATE_VERSION}"
        )
    n, n_ref = int(header["n"]), int(header["n_reference"])
    expected = 4 + hlen + 8 * (2 * n + n_ref)
    if len(data) != expected:
        raise ValueError(
            f"drift state: expected {expected} bytes for n={n}, n_reference={n_ref}, got {len(data)}"
        )
    off = 4 + hlen
    rewards = np.frombuffer(data, dtype="<f8", count=n, offset=off).astype(np.float64)
    lengths = np.frombuffer(data, dtype="<i8", count=n, offset=off + 8 * n).astype(np.int64)
    reference = np.frombuffer(data, dtype="<f8", count=n_ref, offset=off + 16 * n).astype(np.float64)
    state = {
        "version": STATE_VERSION,
        "rewards": rewards,
        "lengths": lengths,
        "group_ids": list(header["group_ids"]),
        "reference": reference,
        "reference_pinned": bool(header["reference_pinned"]),
        "nonfinite_dropped": int(header["nonfinite_dropped"]),
    }
    _check_state(state)
    return state


def _check_state(state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"drift state: unsupported version {state.get('version')!r}, expected {STATE_VERSION}"
        )
    n = len(state["rewards"])
    if len(state["lengths"]) != n or len(state["group_ids"]) != n:
        raise ValueError(
            f"drift state: rewards ({n}), lengths ({len(state['lengths'])}) and group_ids "
            f"({len(state['group_ids'])}) must have the same length"
        )


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
