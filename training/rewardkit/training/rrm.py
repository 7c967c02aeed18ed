"""RRM: robust reward-model training by causal data augmentation (``rewardkit train rrm``).

Liu et al. 2024, "RRM: Robust Reward Model Training Mitigates Reward Hacking". A Bradley-Terry model can lower its
loss by rewarding artifacts that merely correlate with the label (length, politeness, markdown). RRM adds comparisons
in which the artifacts carry no information and only "does this answer the prompt?" does:

* per training example ``i`` (prompt ``x_i``, responses ``w_i`` > ``l_i``), partners ``j`` and ``k`` come from two
  independent seeded shuffles of the dataset, with no self-pairs (``j != i``, ``k != i``);
* on prompt ``x_i``, 14 triplets: each of ``{w_i, l_i}`` beats each of ``{w_j, l_j, w_k, l_k}`` (8 preference triplets:
  an on-prompt response, even the rejected one, beats an off-prompt one) and every pair among
  ``{w_j, l_j, w_k, l_k}`` is a tie (6 tie triplets: two off-prompt responses are equally useless, whatever their
  length or style);
* ties train with :func:`rewardkit.core.losses.bt_tie_loss` (target 0.5);
* the filter: the baseline BT model scores every triplet and those it already gets right,
  ``|sigmoid(d) - label| < tau``, are dropped; training uses the original pairs plus what is left.

Implementation: every text the run needs is one *slot* in a table, six per example::

    6i + 0: (x_i, w_i)   6i + 1: (x_i, l_i)     (the original pair)
    6i + 2: (x_i, w_j)   6i + 3: (x_i, l_j)   6i + 4: (x_i, w_k)   6i + 5: (x_i, l_k)

and every training signal is a :class:`Comparison` between two slots. The baseline is the frozen-backbone BT head
trained in-process on the original pairs exactly as ``rewardkit train bt --mode frozen`` trains it (or a given
checkpoint, ``baseline_model``). ``augment_ratio`` caps the augmented comparisons kept per original pair (a seeded
sample), so RRM can get the same number of comparisons, and steps, as BT.

* ``mode=frozen``: the backbone runs once per slot through the BT trainer's feature extraction (and its cache), and
  the RRM head trains from zero on the kept comparisons;
* ``mode=lora`` / ``full``: the comparisons' slots go through the backbone every step (LoRA adapters or every
  weight, plus the head), the head starting from the baseline's (a head at zero gives the adapters no gradient).

The loop, run log, checkpoint format and metrics are the shared ones of :mod:`rewardkit.training.loop`.

Example::

    result = train_rrm(RRMConfig(train_file="data/testbed", output_dir="runs/rrm", num_epochs=30))
    result.metrics["augmentation"]["kept"]        # {"chosen_vs_off": ..., "rejected_vs_off": ..., "tie": ...}
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rewardkit.core.formatting import EncodedItem, Formatter
from rewardkit.core.forward import pad_batch
from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.core.losses import bt_loss, bt_tie_loss, pair_stats
from rewardkit.training.bt import train_frozen_head
from rewardkit.training.config import RRMConfig
from rewardkit.training.features import EncodedPair, extract_features, to_score_item
from rewardkit.training.loop import (
    RewardForward,
    RunLog,
    TrainResult,
    finish_run,
    optimise,
    raw_rewards,
    setup_trainable,
    start_run,
)
from rewardkit.training.partners import draw_partners

log = logging.getLogger(__name__)

__all__ = ["KINDS", "Comparison", "RRMConfig", "augment", "draw_partners", "filter_comparisons", "rrm_loss",
           "subsample_comparisons", "train_rrm"]

# Kinds of comparison. "original" is a training pair as given; the three others are RRM's augmented triplets.
KINDS = ("chosen_vs_off", "rejected_vs_off", "tie")
SLOTS_PER_EXAMPLE = 6



@dataclasses.dataclass(frozen=True)
class Comparison:
    """Slot ``a`` vs slot ``b`` with target P(a preferred) = ``label`` (1.0 preference, 0.5 tie)."""

    a: int
    b: int
    label: float
    kind: str  # "original" or one of KINDS
    example: int


# ---------------------------------------------------------------------------------------------- augmentation


def augment(n: int, seed: int) -> tuple[list[tuple[int, int, str]], list[Comparison]]:
    """The slot table and every comparison, original pairs first, for ``n`` examples.

    Returns ``slots`` (``(prompt_example, response_example, "chosen"|"rejected")`` per slot, ``6 n`` of them) and
    ``n + 14 n`` comparisons: the original pair, 8 preference triplets and 6 tie triplets per example.
    """
    js, ks = draw_partners(n, seed)
    slots: list[tuple[int, int, str]] = []
    comps: list[Comparison] = []
    for i in range(n):
        base = SLOTS_PER_EXAMPLE * i
        for src in (i, js[i], ks[i]):
            slots += [(i, src, "chosen"), (i, src, "rejected")]
        comps.append(Comparison(base, base + 1, 1.0, "original", i))
    for i in range(n):
        base = SLOTS_PER_EXAMPLE * i
        off = [base + 2, base + 3, base + 4, base + 5]  # w_j, l_j, w_k, l_k on prompt x_i
        for on, kind in ((base, "chosen_vs_off"), (base + 1, "rejected_vs_off")):
            comps += [Comparison(on, b, 1.0, kind, i) for b in off]
        comps += [Comparison(a, b, 0.5, "tie", i) for a, b in itertools.combinations(off, 2)]
    return slots, comps


def encode_slots(enc: Sequence[EncodedPair], slots: Sequence[tuple[int, int, str]], fmt: Formatter
                 ) -> list[EncodedItem]:
    """Encode every slot; the original pair's slots reuse its encodings (so cached features match BT's exactly)."""
    out: list[EncodedItem] = []
    for s, (p, r, side) in enumerate(slots):
        if p == r:
            out.append(enc[p].chosen if side == "chosen" else enc[p].rejected)
            continue
        src = enc[r].pair
        out.append(fmt.encode(to_score_item(enc[p].pair.prompt, src.chosen if side == "chosen" else src.rejected),
                              index=s, truncate=True))
    return out


# ---------------------------------------------------------------------------------------------- loss and filter


def rrm_loss(r_a: torch.Tensor, r_b: torch.Tensor, label: torch.Tensor,
             center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Mean over comparisons: BT loss where ``label == 1``, tie loss where ``label == 0.5``. Shapes ``(B,)``.

    Each term is the per-comparison loss of :func:`bt_loss` / :func:`bt_tie_loss`, so a batch of only preferences
    equals ``bt_loss`` and a batch of only ties equals ``bt_tie_loss``.
    """
    tie = label == 0.5  # (B,)
    if not bool(((label == 1.0) | tie).all()):
        raise ValueError("label must hold 1.0 (a preferred over b) or 0.5 (tie) only")
    n = r_a.shape[0]
    loss = r_a.new_zeros(())
    if (~tie).any():
        loss = loss + bt_loss(r_a[~tie], r_b[~tie]) * int((~tie).sum()) / n
    if tie.any():
        loss = loss + bt_tie_loss(r_a[tie], r_b[tie]) * int(tie.sum()) / n
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((r_a + r_b) ** 2)
    return loss


def filter_comparisons(comps: Sequence[Comparison], slot_rewards: torch.Tensor, tau: float
                       ) -> tuple[list[Comparison], dict[str, dict[str, int]]]:
    """Keep originals always; keep an augmented triplet only if the baseline gets it wrong enough:
    ``|sigmoid(r[a] - r[b]) - label| >= tau``. Returns the kept list and ``{"total": {kind: n}, "kept": {kind: n}}``.
    """
    total = dict.fromkeys(KINDS, 0)
    kept_n = dict.fromkeys(KINDS, 0)
    kept: list[Comparison] = []
    for c in comps:
        if c.kind == "original":
            kept.append(c)
            continue
        total[c.kind] += 1
        p = float(torch.sigmoid(slot_rewards[c.a] - slot_rewards[c.b]))
        if abs(p - c.label) >= tau:
            kept.append(c)
            kept_n[c.kind] += 1
    return kept, {"total": total, "kept": kept_n}


def subsample_comparisons(kept: Sequence[Comparison], n_pairs: int, ratio: float, seed: int
                          ) -> tuple[list[Comparison], dict[str, int]]:
    """Originals always; at most ``ratio * n_pairs`` augmented comparisons, a seeded uniform sample of the kept ones
    (so the kinds keep their kept proportions, in expectation). ``ratio = 0`` keeps all. Returns the list (originals
    first, then the sample in its original order) and the used count per kind."""
    orig = [c for c in kept if c.kind == "original"]
    aug = [c for c in kept if c.kind != "original"]
    cap = int(round(ratio * n_pairs)) if ratio > 0 else len(aug)
    if cap < len(aug):
        pick = sorted(random.Random(f"rewardkit-rrm-subsample:{seed}").sample(range(len(aug)), cap))
        aug = [aug[i] for i in pick]
    used = dict.fromkeys(KINDS, 0)
    for c in aug:
        used[c.kind] += 1
    return orig + aug, used


# ---------------------------------------------------------------------------------------------- training


def _slot_features(rm: RewardModel, cfg: RRMConfig, items: Sequence[EncodedItem], enc: Sequence[EncodedPair]
                   ) -> torch.Tensor:
    """What the head reads for every slot, (S, H) (or (S, H + 1) with ``ll_feature``: the backbone's mean
    log-likelihood of the response last), through the BT trainer's cached feature extraction."""
    # Pseudo-pairs (slot 6i+2 with 6i+3, 6i+4 with 6i+5) so the same extractor and cache serve the off-prompt slots;
    # the original pairs go through exactly the call the baseline made, so they are cache hits.
    pseudo = [EncodedPair(pair=enc[i].pair, chosen=items[SLOTS_PER_EXAMPLE * i + s],
                          rejected=items[SLOTS_PER_EXAMPLE * i + s + 1], index=i)
              for i in range(len(enc)) for s in (2, 4)]
    kw = dict(max_tokens=cfg.feature_batch_tokens, cache_dir=cfg.feature_cache_dir or None,
              progress=not cfg.disable_tqdm, with_ll=cfg.ll_feature)
    h_c, h_r = extract_features(rm, enc, **kw)  # type: ignore[arg-type]
    a_c, a_r = extract_features(rm, pseudo, **kw)  # type: ignore[arg-type]
    feats = torch.zeros(len(items), h_c.shape[1])
    base = torch.arange(len(enc)) * SLOTS_PER_EXAMPLE  # (N,)
    feats[base], feats[base + 1] = h_c, h_r
    feats[base + 2], feats[base + 3] = a_c[0::2], a_r[0::2]
    feats[base + 4], feats[base + 5] = a_c[1::2], a_r[1::2]
    return feats


@torch.no_grad()
def _scored_rewards(cfg: RRMConfig, rm: RewardModel, items: Sequence[EncodedItem]) -> torch.Tensor:
    """Raw rewards of every slot, (S,), from the ``baseline_model`` checkpoint through the server's Scorer."""
    base = load_reward_model(cfg.baseline_model, device=str(rm.device), dtype="float32")
    from rewardkit.core.scoring import Scorer

    scorer, out = Scorer(base), torch.zeros(len(items))
    for s in range(0, len(items), 32):
        for j, sc in enumerate(scorer.score_batch(items[s:s + 32])):
            out[s + j] = sc.raw_reward
    return out


def _comparison_stats(r_a: torch.Tensor, r_b: torch.Tensor, lab: torch.Tensor) -> dict[str, float]:
    pref = lab == 1.0
    if not bool(pref.any()):
        return {"accuracy": float("nan"), "margin": float("nan")}
    return pair_stats(r_a[pref].detach(), r_b[pref].detach())


def _train_head_on_features(cfg: RRMConfig, accelerator: Any, feats: torch.Tensor, comps: Sequence[Comparison],
                            run_log: RunLog, hidden_size: int) -> tuple[torch.Tensor, int, dict[str, float], float]:
    """Frozen mode: a zero-initialised linear head on the scaled slot features with :func:`rrm_loss` (plus, as in
    ``train bt``, ``l2 * |w|^2`` over the first ``hidden_size`` standardised features: an LL column is unpenalised).

    Returns the weights reading raw features (1, H[+1]), steps, last logged stats and seconds per epoch.
    """
    scale = feats.std(dim=0).clamp(min=1e-6)  # (H,) as the BT trainer scales its features
    x = (feats / scale).to(accelerator.device)
    a = torch.tensor([c.a for c in comps], device=x.device)
    b = torch.tensor([c.b for c in comps], device=x.device)
    lab = torch.tensor([c.label for c in comps], device=x.device)
    head = nn.Linear(x.shape[1], 1, bias=False).to(x.device)
    nn.init.zeros_(head.weight)
    head = accelerator.prepare(head)

    def step(batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.tensor(batch, device=x.device)
        r_a, r_b = head(x[a[idx]]).squeeze(-1), head(x[b[idx]]).squeeze(-1)  # (B,) each
        loss = rrm_loss(r_a, r_b, lab[idx], cfg.center_rewards_coefficient)
        if cfg.l2:
            w = head.weight[:, :hidden_size]
            loss = loss + cfg.l2 * (w * w).sum()
        return loss, _comparison_stats(r_a, r_b, lab[idx])

    steps, last, sec_epoch = optimise(cfg, accelerator, head, step, len(comps), run_log, "train rrm")
    return accelerator.unwrap_model(head).weight.detach().float().cpu() / scale, steps, last, sec_epoch


def _train_backbone(cfg: RRMConfig, accelerator: Any, rm: RewardModel, items: Sequence[EncodedItem],
                    comps: Sequence[Comparison], run_log: RunLog) -> tuple[Any, int, dict[str, float], float]:
    """LoRA / full mode: each batch's slots through body + head, :func:`rrm_loss` on the comparisons.

    The head starts from whatever ``rm.head`` holds (the baseline's). Returns peft model, steps, stats, s/epoch.
    """
    peft_model = setup_trainable(cfg, rm)
    fwd = accelerator.prepare(RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule))

    def step(batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        cs = [comps[i] for i in batch]
        slots = sorted({c.a for c in cs} | {c.b for c in cs})
        where = {s: j for j, s in enumerate(slots)}
        ids, mask, pos = pad_batch([items[s] for s in slots], rm.pad_token_id, "right", accelerator.device)
        r = fwd(ids, mask, pos)  # (U,) one forward per distinct slot
        r_a = r[torch.tensor([where[c.a] for c in cs], device=r.device)]
        r_b = r[torch.tensor([where[c.b] for c in cs], device=r.device)]
        lab = torch.tensor([c.label for c in cs], device=r.device)
        return rrm_loss(r_a, r_b, lab, cfg.center_rewards_coefficient), _comparison_stats(r_a, r_b, lab)

    steps, last, sec_epoch = optimise(cfg, accelerator, fwd, step, len(comps), run_log, "train rrm", head=rm.head)
    return peft_model, steps, last, sec_epoch


def train_rrm(cfg: RRMConfig, command: str | None = None) -> TrainResult:
    """Train an RRM reward model as ``cfg`` says and write a rewardkit checkpoint to ``cfg.output_dir``."""
    with start_run(cfg, "rrm") as run:
        rm, enc, accelerator = run.rm, run.enc, run.accelerator
        seed = cfg.seed if cfg.augment_seed < 0 else cfg.augment_seed
        slots, comps = augment(len(enc), seed)
        items = encode_slots(enc, slots, run.fmt)
        run.run_log.write(event="augment", slots=len(items), comparisons=len(comps))
        # 1. the baseline (and, in frozen mode or when the filter needs them, every slot's features): the cache (a
        #    temporary one when none is configured) makes the baseline's extraction of the original pairs a cache
        #    hit instead of a second backbone pass
        need_feats = cfg.mode == "frozen" or (cfg.tau > 0 and not cfg.baseline_model)
        feats: torch.Tensor | None = None
        t_feat = t_base = 0.0
        with tempfile.TemporaryDirectory(prefix="rrm-features-") as tmp:
            fcfg = cfg if cfg.feature_cache_dir else dataclasses.replace(cfg, feature_cache_dir=tmp)
            if need_feats:
                t = time.time()
                feats = _slot_features(rm, fcfg, items, enc)  # (S, H)
                t_feat = time.time() - t
            trained_head = None
            if not cfg.baseline_model:
                t = time.time()
                base_log = RunLog(run.out / "baseline_log.jsonl")
                try:
                    train_frozen_head(fcfg, accelerator, rm, enc, base_log, desc="baseline bt")
                finally:
                    base_log.close()
                trained_head = rm.head.weight.detach().float().cpu().clone()  # (1, H) reads raw hidden states
                if cfg.ll_feature:  # (1, H + 1): the LL column's weight last, as the slot features hold it
                    trained_head = torch.cat([trained_head, torch.tensor([[rm.meta.ll_weight]])], dim=1)
                t_base = time.time() - t
        # 2. the filter, then the cap on augmented comparisons
        if cfg.baseline_model:
            base_r = _scored_rewards(cfg, rm, items)
        elif feats is not None:
            base_r = feats @ trained_head.squeeze(0)  # type: ignore[union-attr]
        else:  # tau = 0 in a backbone mode: the filter keeps everything, no baseline rewards needed
            base_r = torch.zeros(len(items))
        kept, counts = filter_comparisons(comps, base_r, cfg.tau)
        used_comps, used = subsample_comparisons(kept, len(enc), cfg.augment_ratio, seed)
        counts = {**counts, "used": used}
        log.info("rrm_filter tau=%s total=%s kept=%s used=%s", cfg.tau, counts["total"], counts["kept"], used)
        run.run_log.write(event="filter", tau=cfg.tau, augment_ratio=cfg.augment_ratio, **counts)
        # 3. the RRM model on original + used comparisons
        peft_model = None
        if cfg.mode == "frozen":
            assert feats is not None
            w, steps, last, sec_epoch = _train_head_on_features(cfg, accelerator, feats, used_comps, run.run_log,
                                                                rm.hidden_size)
            with torch.no_grad():
                rm.head.weight.copy_(w[:, :rm.hidden_size].to(rm.head.weight.dtype))
                if rm.head.bias is not None:
                    rm.head.bias.zero_()
                rm.meta.ll_weight = float(w[0, rm.hidden_size]) if cfg.ll_feature else 0.0
            base = torch.arange(len(enc)) * SLOTS_PER_EXAMPLE
            r = feats @ w.squeeze(0)  # (S,)
            raw = torch.cat([r[base], r[base + 1]])  # (2N,) the original pairs, chosen then rejected
        else:
            peft_model, steps, last, sec_epoch = _train_backbone(cfg, accelerator, rm, items, used_comps, run.run_log)
            raw = raw_rewards(rm, enc, cfg.feature_batch_tokens)
        metrics: dict[str, Any] = {
            "train_comparisons": len(used_comps), "augmentation": {"tau": cfg.tau, "seed": seed,
                                                                   "ratio": cfg.augment_ratio, **counts},
            "seconds_baseline": round(t_base, 1), "seconds_slot_features": round(t_feat, 1),
            "seconds_per_epoch": round(sec_epoch, 4),
        }
        return finish_run(run, raw, peft_model, command, steps, last, metrics,
                          description=f"RRM reward model ({cfg.mode}; causal augmentation + BT filter) trained by "
                                      "rewardkit train rrm",
                          provenance={"augmentation": counts})
