"""R2M: a reward head that reads the policy's hidden states, aligned online during RL.

After "R2M: Real-Time Aligned Reward Model beyond Semantics" (Huang et al., arXiv 2601.22664).
The reward model's body stays frozen; this module only sees its last-layer hidden state at the
reward token, ``H_last`` (B, D_rm), and the policy's last-layer hidden states over the whole
query+response, ``h`` (B, S, D_p), with a key padding mask (B, S) (True / 1 = a real position).

    q = H_last W_q                    (B, d)
    k = h W_k, v = h W_v              (B, S, d)
    H_agg = softmax(q k^T / sqrt(d)) v W_o          (B, D_rm)
    H_fin = (1 - w) H_agg + w H_last, w = mix_weight(t, T, omega)
    reward = phi(H_fin)               phi: a copy of the RM's scalar head

At w = 1 the head returns exactly the RM's scalar reward. ``W_o`` starts at zero (like LoRA's B),
so an untrained head only rescales the RM's reward (phi(w H_last)), never adds noise to it.

Online update: ``grebt_loss`` on pseudo-pairs (argmax, argmin of the current reward in each group
of K >= 2 rollouts of one prompt) plus the group reward entropy; ``r2m_update_step`` applies one
optimiser step to the head only. ``save_head`` / ``load_head`` write and read one safetensors file
whose header carries the JSON metadata (format, version, round, config), written atomically.

Example::

    cfg = R2MConfig(d_rm=576, d_policy=576, d_attn=256, total_rounds=200)
    head = R2MHead.from_scalar_head(rm.score, cfg)
    opt = make_optimizer(head)
    w = mix_weight(t, cfg.total_rounds, cfg.omega)
    stats = r2m_update_step(head, opt, R2MBatch(h_last, policy_hidden, mask, group_ids), w=w)
    rewards = head(h_last, policy_hidden, mask, w=w)     # (B,)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from rewardkit.core.checkpoint import atomic_write_bytes
from rewardkit.core.errors import InputError, ModelLoadError

__all__ = [
    "HEAD_FORMAT",
    "HEAD_FORMAT_VERSION",
    "GroupSizeError",
    "R2MBatch",
    "R2MConfig",
    "R2MHead",
    "grebt_loss",
    "load_head",
    "make_optimizer",
    "mix_weight",
    "r2m_update_step",
    "read_head_metadata",
    "save_head",
]

HEAD_FORMAT = "rewardkit.r2m_head"
HEAD_FORMAT_VERSION = 1
_META_KEY = "rewardkit.r2m"


@dataclass
class R2MConfig:
    """Configuration of an R2M head and its online update."""

    # -- shapes
    d_rm: int = field(metadata={"help": "Hidden size of the reward model (H_last, input of phi)."})
    d_policy: int = field(metadata={"help": "Hidden size of the policy's last layer (feedback frames' D)."})
    d_attn: int = field(default=2048, metadata={"help": "Width d of the cross-attention (paper: 2048)."})
    # -- mixing schedule
    omega: float = field(default=0.65, metadata={"help": "Floor of w(t) (paper: 0.6 to 0.7)."})
    total_rounds: int = field(default=1000, metadata={"help": "Planned RL rounds T of the cosine schedule."})
    # -- online update
    alpha: float = field(default=0.3, metadata={"help": "Weight of GRE in GREBT: (1-alpha) BT + alpha GRE."})
    lr: float = field(
        default=1e-6, metadata={"help": "Learning rate (paper: 1e-6 dialogue, 5e-7 summaries)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the head."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; <= 0 disables."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal init of W_q, W_k, W_v."})

    def __post_init__(self) -> None:
        for name in ("d_rm", "d_policy", "d_attn", "total_rounds"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"R2MConfig.{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.omega <= 1.0:
            raise ValueError(f"R2MConfig.omega must be in [0, 1], got {self.omega}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"R2MConfig.alpha must be in [0, 1], got {self.alpha}")
        if not self.lr > 0:
            raise ValueError(f"R2MConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"R2MConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.init_std > 0:
            raise ValueError(f"R2MConfig.init_std must be > 0, got {self.init_std}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> R2MConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"R2MConfig: unknown fields {unknown}")
        return cls(**data)


def mix_weight(t: float, total_rounds: int, omega: float) -> float:
    """w(t) = max(0.5 cos(pi t / T) + 0.5, omega); t is clamped to [0, T] so w stays at omega after T.

    >>> mix_weight(0, 100, 0.65), mix_weight(100, 100, 0.65)
    (1.0, 0.65)
    """
    if total_rounds < 1:
        raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega}")
    if t < 0:
        raise ValueError(f"round t must be >= 0, got {t}")
    t = min(t, total_rounds)
    return max(0.5 * math.cos(math.pi * t / total_rounds) + 0.5, omega)


class R2MHead(nn.Module):
    """Single-head sequence-to-token cross-attention from H_last over the policy's hidden states,
    mixed with H_last and scored by phi (a copy of the RM's scalar head)."""

    def __init__(self, cfg: R2MConfig, *, phi_bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.w_q = nn.Linear(cfg.d_rm, cfg.d_attn, bias=False)
        self.w_k = nn.Linear(cfg.d_policy, cfg.d_attn, bias=False)
        self.w_v = nn.Linear(cfg.d_policy, cfg.d_attn, bias=False)
        self.w_o = nn.Linear(cfg.d_attn, cfg.d_rm, bias=False)
        self.phi = nn.Linear(cfg.d_rm, 1, bias=phi_bias)
        for lin in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(lin.weight, std=cfg.init_std)
        nn.init.zeros_(self.w_o.weight)  # an untrained head adds nothing: H_agg = 0

    @classmethod
    def from_scalar_head(cls, score: nn.Linear, cfg: R2MConfig) -> R2MHead:
        """Build a head whose phi is an exact copy of the RM's scalar head ``score`` (D_rm -> 1)."""
        if score.out_features != 1:
            raise ValueError(
                f"score head must have out_features=1 (a scalar reward), got {score.out_features}"
            )
        if score.in_features != cfg.d_rm:
            raise ValueError(f"score head has in_features={score.in_features} but R2MConfig.d_rm={cfg.d_rm}")
        head = cls(cfg, phi_bias=score.bias is not None)
        head.to(dtype=score.weight.dtype)
        with torch.no_grad():
            head.phi.weight.copy_(score.weight)
            if score.bias is not None:
                head.phi.bias.copy_(score.bias)
        return head

    def _check_inputs(self, h_last: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        cfg = self.cfg
        if h_last.ndim != 2 or h_last.shape[1] != cfg.d_rm:
            raise InputError(f"h_last must be (B, {cfg.d_rm}), got {tuple(h_last.shape)}", "h_last")
        if hidden.ndim != 3 or hidden.shape[2] != cfg.d_policy:
            raise InputError(
                f"policy hidden states must be (B, S, {cfg.d_policy}), got {tuple(hidden.shape)}",
                "policy_hidden",
            )
        if hidden.shape[0] != h_last.shape[0] or tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise InputError(
                f"batch shapes disagree: h_last {tuple(h_last.shape)}, policy_hidden {tuple(hidden.shape)}, "
                f"mask {tuple(mask.shape)}",
                "mask",
            )
        if not bool(mask.any(dim=1).all()):
            raise InputError("every item needs at least one unmasked position", "mask")

    def attention(self, h_last: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights softmax(q k^T / sqrt(d)) of the reward token over the policy positions,
        (B, S); masked positions get weight exactly 0."""
        dt = self.w_q.weight.dtype
        keep = mask.to(torch.bool)  # (B, S)
        q = self.w_q(h_last.to(dt))  # (B, d)
        k = self.w_k(hidden.to(dt))  # (B, S, d)
        scores = torch.einsum("bd,bsd->bs", q, k) / math.sqrt(self.cfg.d_attn)  # (B, S)
        return scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # (B, S)

    def aggregate(self, h_last: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """H_agg = softmax(q k^T / sqrt(d)) v W_o, (B, D_rm)."""
        keep = mask.to(torch.bool)  # (B, S)
        attn = self.attention(h_last, hidden, keep)  # (B, S)
        v = self.w_v(hidden.to(self.w_v.weight.dtype))  # (B, S, d)
        v = v.masked_fill(~keep[:, :, None], 0.0)  # padded values cannot leak (0 * inf would be NaN)
        ctx = torch.einsum("bs,bsd->bd", attn, v)  # (B, d)
        return self.w_o(ctx)  # (B, D_rm)

    def forward(
        self, h_last: torch.Tensor, policy_hidden: torch.Tensor, mask: torch.Tensor, *, w: float
    ) -> torch.Tensor:
        """Rewards (B,) for RM states ``h_last`` (B, D_rm), policy states (B, S, D_p), mask (B, S)."""
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"mix weight w must be in [0, 1], got {w}")
        self._check_inputs(h_last, policy_hidden, mask)
        h_last = h_last.to(self.phi.weight.dtype)
        h_agg = self.aggregate(h_last, policy_hidden, mask)  # (B, D_rm)
        h_fin = (1.0 - w) * h_agg + w * h_last  # (B, D_rm); at w = 1: 0 * H_agg + H_last == H_last
        return self.phi(h_fin).squeeze(-1)  # (B, 1) -> (B,)


# ----------------------------------------------------------------------------------------------
# GREBT loss


class GroupSizeError(InputError, ValueError):
    """A group has fewer than 2 rollouts; ``group_id`` names it."""

    def __init__(self, group_id: Hashable, size: int) -> None:
        super().__init__(
            f"group {group_id!r} has {size} member; GREBT needs at least 2 rollouts of one prompt (K >= 2)",
            "group_id",
        )
        self.group_id = group_id


def _group_indices(group_ids: Sequence[Hashable], n: int) -> list[tuple[Hashable, list[int]]]:
    if len(group_ids) != n:
        raise InputError(f"group_ids has {len(group_ids)} entries for {n} rewards", "group_ids")
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)  # insertion order = order of first appearance
    for g, idx in groups.items():
        if len(idx) < 2:
            raise GroupSizeError(g, len(idx))
    return list(groups.items())


def grebt_loss(
    rewards: torch.Tensor,
    group_ids: Sequence[Hashable],
    scores_for_labels: torch.Tensor | None = None,
    *,
    alpha: float = 0.3,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GREBT = (1 - alpha) * BT + alpha * GRE, averaged over groups.

    Args:
        rewards: (B,) rewards from the head being trained (carry gradient).
        group_ids: B group keys; rollouts of one prompt share a key. Every group needs >= 2 members.
        scores_for_labels: (B,) the current (pre-update) rewards that pick the pseudo-pairs; defaults
            to ``rewards.detach()``. Always detached here.
        alpha: weight of the group reward entropy.

    Per group: winner = argmax, loser = argmin of ``scores_for_labels``; BT = -log sigmoid(r_w - r_l)
    (groups whose scores are all equal have no pair and are left out of BT, counted in ``n_tied``);
    GRE = -sum_j p_j log p_j, p = softmax((r - mean) / (std + eps)) over the group's ``rewards``.

    Returns the loss and stats {"bt", "gre", "n_groups", "n_tied", "margin"} (margin: mean r_w - r_l).
    """
    if rewards.ndim != 1:
        raise InputError(f"rewards must be (B,), got {tuple(rewards.shape)}", "rewards")
    labels = rewards.detach() if scores_for_labels is None else scores_for_labels.detach()
    if labels.shape != rewards.shape:
        raise InputError(
            f"scores_for_labels must be {tuple(rewards.shape)}, got {tuple(labels.shape)}", "scores"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    groups = _group_indices(group_ids, rewards.shape[0])
    bt_terms: list[torch.Tensor] = []
    gre_terms: list[torch.Tensor] = []
    diffs: list[torch.Tensor] = []
    for _, idx_list in groups:
        idx = torch.tensor(idx_list, device=rewards.device)  # (K,)
        r = rewards[idx]  # (K,)
        s = labels[idx]  # (K,)
        win, lose = int(s.argmax()), int(s.argmin())
        if s[win] > s[lose]:
            diff = r[win] - r[lose]
            bt_terms.append(-F.logsigmoid(diff))
            diffs.append(diff.detach())
        z = (r - r.mean()) / (r.std(unbiased=False) + eps)  # (K,) standardised within the group
        gre_terms.append(-(z.softmax(-1) * z.log_softmax(-1)).sum())
    bt = torch.stack(bt_terms).mean() if bt_terms else rewards.sum() * 0.0
    gre = torch.stack(gre_terms).mean()
    loss = (1.0 - alpha) * bt + alpha * gre
    stats = {
        "bt": float(bt.detach()),
        "gre": float(gre.detach()),
        "n_groups": float(len(groups)),
        "n_tied": float(len(groups) - len(bt_terms)),
        "margin": float(torch.stack(diffs).mean()) if diffs else 0.0,
    }
    return loss, stats


# ----------------------------------------------------------------------------------------------
# one online update step


@dataclass
class R2MBatch:
    """Inputs of one update: RM states (B, D_rm), policy states (B, S, D_p), mask (B, S), B group keys, and an
    optional fixed offset (B,) added to the head's rewards (the RM's LL term, which the head does not compute)."""

    h_last: torch.Tensor
    policy_hidden: torch.Tensor
    mask: torch.Tensor
    group_ids: Sequence[Hashable]
    offset: torch.Tensor | None = None


def make_optimizer(head: R2MHead, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the head's parameters only (cross-attention + phi), lr/weight decay from its config."""
    return torch.optim.AdamW(
        head.parameters(), lr=head.cfg.lr if lr is None else lr, weight_decay=head.cfg.weight_decay
    )


def r2m_update_step(
    head: R2MHead, optimizer: torch.optim.Optimizer, batch: R2MBatch, *, w: float, alpha: float | None = None
) -> dict[str, float]:
    """One GREBT step on ``head``; returns stats (loss, bt, gre, n_groups, n_tied, margin, grad_norm, applied).

    Pseudo-pairs come from the head's own rewards before the step (the current reward). The inputs
    are detached, so nothing outside the head (the frozen RM body, the policy) receives gradient;
    the optimiser must hold only the head's parameters. A non-finite loss or gradient applies
    nothing (``applied`` = 0): an update applies to the whole batch or not at all.
    """
    own = {id(p) for p in head.parameters()}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in own:
                raise ValueError(
                    "optimizer holds parameters outside the R2M head; build it with make_optimizer(head)"
                )
    a = head.cfg.alpha if alpha is None else alpha
    head.train()
    rewards = head(batch.h_last.detach(), batch.policy_hidden.detach(), batch.mask, w=w)  # (B,)
    if batch.offset is not None:  # the served reward: head + the RM's fixed LL term (no gradient: a constant)
        rewards = rewards + batch.offset.to(rewards.device, rewards.dtype).detach()
    loss, stats = grebt_loss(rewards, batch.group_ids, rewards.detach(), alpha=a)
    stats["loss"] = float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        stats.update(grad_norm=float("nan"), applied=0.0)
        return stats
    loss.backward()
    params = [p for p in head.parameters() if p.grad is not None]
    max_norm = head.cfg.max_grad_norm if head.cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        stats.update(grad_norm=float(grad_norm), applied=0.0)
        return stats
    optimizer.step()
    stats.update(grad_norm=float(grad_norm), applied=1.0)
    return stats


# ----------------------------------------------------------------------------------------------
# save / load


def save_head(
    head: R2MHead,
    path: str | os.PathLike[str],
    *,
    version: int,
    round: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the head to one safetensors file (atomically); its header carries the JSON metadata
    ``{"format", "format_version", "version", "round", "config", "phi_bias", "extra"}``."""
    meta = {
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION,
        "version": int(version),
        "round": int(round),
        "config": dataclasses.asdict(head.cfg),
        "phi_bias": head.phi.bias is not None,
        "extra": extra or {},
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    data = st_save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    out = Path(path)
    atomic_write_bytes(out, data)
    return out


def read_head_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a saved head, read from the safetensors header only (cheap, for listings)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except Exception as e:  # OSError, or safetensors' SafetensorError, which subclasses only Exception
        raise ModelLoadError(f"cannot read R2M head {path}: {e}") from e
    if raw is None:
        raise ModelLoadError(f"{path} is not an R2M head: its safetensors header lacks {_META_KEY!r}")
    try:
        meta: dict[str, Any] = json.loads(raw)
    except ValueError as e:
        raise ModelLoadError(f"{path}: R2M head metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise ModelLoadError(f"{path}: format {meta.get('format')!r} is not {HEAD_FORMAT!r}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > HEAD_FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format_version {meta.get('format_version')!r} is not readable by this rewardkit "
            f"(reads up to {HEAD_FORMAT_VERSION}): upgrade rewardkit"
        )
    return meta


def load_head(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[R2MHead, dict[str, Any]]:
    """Load a head written by ``save_head``; returns (head, metadata). Never unpickles."""
    meta = read_head_metadata(path)
    try:
        cfg = R2MConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: bad R2M head config: {e}") from e
    head = R2MHead(cfg, phi_bias=bool(meta.get("phi_bias", False)))
    state = st_load(Path(path).read_bytes())
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: tensors do not match the R2M head config: {e}") from e
    head.to(next(iter(state.values())).dtype).to(map_location)
    return head, meta
