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

and every training signal is a :class:`Comparison` between two slots. With ``mode=frozen`` (the only mode this trainer
supports: see docs/results.md for why that is the budget that fits here) the backbone runs once per slot through the
BT trainer's feature extraction (and its cache), the baseline is the frozen-backbone BT head trained in-process on the
original pairs exactly as ``rewardkit train bt`` trains it (or a given checkpoint), and the RRM head trains from zero
on the kept comparisons. The checkpoint format, run log and metrics are the BT trainer's.

Example::

    result = train_rrm(RRMConfig(train_file="data/testbed", output_dir="runs/rrm", num_epochs=30))
    result.metrics["augmentation"]["kept"]        # {"chosen_vs_off": ..., "rejected_vs_off": ..., "tie": ...}
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.formatting import EncodedItem, Formatter
from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.core.losses import bt_loss, bt_tie_loss, pair_stats
from rewardkit.training.bt import (
    LOG_FILE,
    RESULT_FILE,
    RunLog,
    TrainResult,
    _batches_forever,
    _load_pairs,
    _lr_lambda,
    _make_accelerator,
    _save,
    _set_seed,
    _train_frozen,
)
from rewardkit.training.config import RRMConfig
from rewardkit.training.features import EncodedPair, encode_pairs, extract_features, to_score_item

log = logging.getLogger(__name__)

__all__ = ["KINDS", "Comparison", "RRMConfig", "augment", "draw_partners", "filter_comparisons", "rrm_loss",
           "train_rrm"]

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


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A seeded shuffle of range(n) with its fixed points removed by swapping each with its right neighbour.

    Swapping a fixed point ``i`` with position ``i+1`` (wrapping to 0) puts a different value at ``i`` and ``i`` at
    ``i+1``; positions already checked stay non-fixed, so one pass suffices and the result is still a permutation.
    """
    perm = list(range(n))
    rng.shuffle(perm)
    for i in range(n):
        if perm[i] == i:
            nxt = (i + 1) % n
            perm[i], perm[nxt] = perm[nxt], perm[i]
    return perm


def draw_partners(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Partners ``j[i]``, ``k[i]`` from two independent seeded shuffles, never ``i`` itself. Needs ``n >= 2``.

    Example::

        >>> j, k = draw_partners(5, seed=0)
        >>> all(j[i] != i and k[i] != i for i in range(5))
        True
    """
    if n < 2:
        raise ValueError(f"RRM augmentation needs at least 2 training pairs to draw partners from, got {n}")
    return (_derangement(n, random.Random(f"rewardkit-rrm:{seed}:j")),
            _derangement(n, random.Random(f"rewardkit-rrm:{seed}:k")))


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


# ---------------------------------------------------------------------------------------------- training


def _slot_features(rm: RewardModel, cfg: RRMConfig, items: Sequence[EncodedItem], enc: Sequence[EncodedPair]
                   ) -> torch.Tensor:
    """Reward-token hidden states of every slot, (S, H), through the BT trainer's cached feature extraction."""
    # Pseudo-pairs (slot 6i+2 with 6i+3, 6i+4 with 6i+5) so the same extractor and cache serve the off-prompt slots;
    # the original pairs go through exactly the call the baseline made, so they are cache hits.
    pseudo = [EncodedPair(pair=enc[i].pair, chosen=items[SLOTS_PER_EXAMPLE * i + s],
                          rejected=items[SLOTS_PER_EXAMPLE * i + s + 1], index=i)
              for i in range(len(enc)) for s in (2, 4)]
    kw = dict(max_tokens=cfg.feature_batch_tokens, cache_dir=cfg.feature_cache_dir or None,
              progress=not cfg.disable_tqdm)
    h_c, h_r = extract_features(rm, enc, **kw)  # type: ignore[arg-type]
    a_c, a_r = extract_features(rm, pseudo, **kw)  # type: ignore[arg-type]
    feats = torch.zeros(len(items), rm.hidden_size)
    base = torch.arange(len(enc)) * SLOTS_PER_EXAMPLE  # (N,)
    feats[base], feats[base + 1] = h_c, h_r
    feats[base + 2], feats[base + 3] = a_c[0::2], a_r[0::2]
    feats[base + 4], feats[base + 5] = a_c[1::2], a_r[1::2]
    return feats


@torch.no_grad()
def _baseline_rewards(cfg: RRMConfig, rm: RewardModel, items: Sequence[EncodedItem], feats: torch.Tensor,
                      trained_head: torch.Tensor | None) -> torch.Tensor:
    """Raw baseline rewards of every slot, (S,): the in-process BT head on the features, or a given checkpoint."""
    if trained_head is not None:
        return feats @ trained_head.squeeze(0)
    base = load_reward_model(cfg.baseline_model, device=str(rm.device), dtype="float32")
    from rewardkit.core.scoring import Scorer

    scorer, out = Scorer(base), torch.zeros(len(items))
    for s in range(0, len(items), 32):
        for j, sc in enumerate(scorer.score_batch(items[s:s + 32])):
            out[s + j] = sc.raw_reward
    return out


def _optimise_comparisons(cfg: RRMConfig, accelerator: Any, x: torch.Tensor, comps: Sequence[Comparison],
                          run_log: RunLog) -> tuple[nn.Linear, int, dict[str, float], float]:
    """Train a zero-initialised linear head on the scaled slot features ``x`` (S, H) with :func:`rrm_loss`.

    Returns the head, steps, last logged stats and seconds per epoch (a pass over ``comps``).
    """
    from tqdm.auto import tqdm

    a = torch.tensor([c.a for c in comps], device=x.device)
    b = torch.tensor([c.b for c in comps], device=x.device)
    lab = torch.tensor([c.label for c in comps], device=x.device)
    n = len(comps)
    per_epoch = -(-n // (cfg.batch_size * cfg.gradient_accumulation_steps))
    total = cfg.max_steps or max(1, int(-(-per_epoch * cfg.num_epochs // 1)))
    head = nn.Linear(x.shape[1], 1, bias=False).to(x.device)
    nn.init.zeros_(head.weight)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_ratio * total)))
    batches = _batches_forever(n, cfg.batch_size, cfg.seed)
    window: list[dict[str, float]] = []
    last = {"loss": float("nan"), "accuracy": float("nan"), "margin": float("nan")}
    t0 = time.perf_counter()
    for step in tqdm(range(1, total + 1), desc="train rrm", unit="step", disable=cfg.disable_tqdm, dynamic_ncols=True):
        for _ in range(cfg.gradient_accumulation_steps):
            idx = torch.tensor(next(batches), device=x.device)
            r_a, r_b = head(x[a[idx]]).squeeze(-1), head(x[b[idx]]).squeeze(-1)  # (B,) each
            loss = rrm_loss(r_a, r_b, lab[idx], cfg.center_rewards_coefficient) / cfg.gradient_accumulation_steps
            loss.backward()
            pref = lab[idx] == 1.0
            stats = pair_stats(r_a[pref].detach(), r_b[pref].detach()) if pref.any() else {"accuracy": float("nan"),
                                                                                             "margin": float("nan")}
            window.append({"loss": float(loss.detach()) * cfg.gradient_accumulation_steps, **stats})
        if cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(head.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % cfg.logging_steps == 0 or step == total:
            last = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "accuracy", "margin")}
            run_log.write(step=step, epoch=step / per_epoch, lr=sched.get_last_lr()[0], **last)
            window = []
    sec_per_epoch = (time.perf_counter() - t0) / (total / per_epoch)
    return head, total, last, sec_per_epoch


def train_rrm(cfg: RRMConfig, command: str | None = None) -> TrainResult:
    """Train an RRM reward model as ``cfg`` says and write a rewardkit checkpoint to ``cfg.output_dir``."""
    cfg.validate()
    t0 = time.time()
    _set_seed(cfg.seed)
    accelerator = _make_accelerator(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, train_path, load_report = _load_pairs(cfg.train_file, "train", cfg.max_train_pairs, cfg.seed,
                                                 cfg.max_drop_fraction)
    rm = load_reward_model(cfg.model, device=str(accelerator.device), dtype="float32",
                           reward_token_rule=cfg.reward_token_rule)
    fmt = Formatter(rm.tokenizer, max_length=cfg.max_length)
    enc, len_report = encode_pairs(pairs, fmt, max_drop_fraction=cfg.max_drop_fraction)
    seed = cfg.seed if cfg.augment_seed < 0 else cfg.augment_seed
    slots, comps = augment(len(enc), seed)
    items = encode_slots(enc, slots, fmt)
    run_log = RunLog(out / LOG_FILE)
    run_log.write(event="start", trainer="rrm", config=dataclasses.asdict(cfg), pairs=len(enc), slots=len(items),
                  load=load_report, too_long=len_report.to_dict())
    try:
        # 1. features of every slot; the cache (a temporary one when none is configured) makes the baseline's own
        #    extraction of the original pairs below a cache hit instead of a second backbone pass
        t_feat = time.time()
        with tempfile.TemporaryDirectory(prefix="rrm-features-") as tmp:
            if not cfg.feature_cache_dir:
                cfg = dataclasses.replace(cfg, feature_cache_dir=tmp)
            feats = _slot_features(rm, cfg, items, enc)  # (S, H)
            t_feat = time.time() - t_feat
            # 2. the baseline: BT head on the original pairs, exactly the BT trainer's frozen path
            trained_head = None
            t_base = time.time()
            if not cfg.baseline_model:
                base_log = RunLog(out / "baseline_log.jsonl")
                try:
                    _train_frozen(cfg, accelerator, rm, enc, base_log)
                finally:
                    base_log.close()
                trained_head = rm.head.weight.detach().float().cpu().clone()  # (1, H) reads raw hidden states
            t_base = time.time() - t_base
        if cfg.feature_cache_dir.startswith(tmp):
            cfg = dataclasses.replace(cfg, feature_cache_dir="")
        # 3. the filter
        base_r = _baseline_rewards(cfg, rm, items, feats, trained_head)  # (S,)
        kept, counts = filter_comparisons(comps, base_r, cfg.tau)
        log.info("rrm_filter tau=%s total=%s kept=%s", cfg.tau, counts["total"], counts["kept"])
        run_log.write(event="filter", tau=cfg.tau, **counts)
        # 4. the RRM head on original + kept, from zero, features scaled as the BT trainer scales them
        scale = feats.std(dim=0).clamp(min=1e-6)  # (H,)
        head, steps, last, sec_epoch = _optimise_comparisons(cfg, accelerator, (feats / scale).to(accelerator.device),
                                                             kept, run_log)
        n = len(enc)
        train_stats = _install_head(rm, feats, head.weight.detach().float().cpu() / scale, n)
        metrics: dict[str, Any] = {
            "train_loss_last": last["loss"], "train_accuracy": train_stats["accuracy"],
            "train_margin_raw": train_stats["margin"], "steps": steps, "train_pairs": n,
            "train_comparisons": len(kept), "augmentation": {"tau": cfg.tau, "seed": seed, **counts},
            "seconds": round(time.time() - t0, 1), "seconds_baseline": round(t_base, 1),
            "seconds_slot_features": round(t_feat, 1), "seconds_per_epoch_head": round(sec_epoch, 4),
        }
        if cfg.eval_file:
            from rewardkit.training.bt import _evaluate_split

            metrics["eval"] = _evaluate_split(cfg, rm)
        _save(cfg, rm, out, None, command, steps, metrics, train_path, load_report, len_report.to_dict())
        _mark_rrm(out, rm, counts)
        run_log.write(event="end", **{k: v for k, v in metrics.items() if k != "eval"})
    finally:
        run_log.close()
    import hashlib

    rm.head_version = f"head-{hashlib.sha256(rm.head.weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]}"
    return TrainResult(output_dir=out, rm=rm, metrics=metrics, steps=steps)


def _install_head(rm: RewardModel, feats: torch.Tensor, w: torch.Tensor, n: int) -> dict[str, float]:
    """Put the trained weights ``w`` (1, H), which read raw hidden states, into the model's head and normalise its
    rewards over the N original pairs (chosen then rejected, as BT does). Returns the pairs' train stats."""
    with torch.no_grad():
        rm.head.weight.copy_(w.to(rm.head.weight.dtype))
        if rm.head.bias is not None:
            rm.head.bias.zero_()
    base = torch.arange(n) * SLOTS_PER_EXAMPLE
    raw = feats @ w.squeeze(0)  # (S,)
    orig = torch.cat([raw[base], raw[base + 1]])  # (2N,)
    rm.meta.norm_mean, rm.meta.norm_std = float(orig.mean()), float(orig.std().clamp(min=1e-6))
    return pair_stats(raw[base], raw[base + 1])


def _mark_rrm(out: Path, rm: RewardModel, counts: dict[str, dict[str, int]]) -> None:
    """The BT saver wrote provenance for a BT run; record that this one is RRM (same format otherwise)."""
    meta = rm.meta
    meta.provenance = {**meta.provenance, "trainer": "rrm", "augmentation": counts}
    meta.description = "RRM reward model (frozen backbone, causal augmentation + BT filter) trained by rewardkit train rrm"
    ckpt.atomic_write_bytes(out / ckpt.META_FILE, meta.to_json().encode("utf-8"))
    res = json.loads((out / RESULT_FILE).read_text(encoding="utf-8"))
    res["trainer"] = "rrm"
    ckpt.atomic_write_bytes(out / RESULT_FILE, json.dumps(res, indent=2, sort_keys=True).encode("utf-8"))
