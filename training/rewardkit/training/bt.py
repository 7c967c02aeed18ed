"""Bradley-Terry reward-model training (``rewardkit train bt``): frozen backbone, LoRA, or full fine-tune.

The loss is :func:`rewardkit.core.losses.bt_loss`. Texts are formatted by the server's
:class:`~rewardkit.core.formatting.Formatter` and rewards read by the server's rule, so the written checkpoint scores
exactly as the model did in training. Three modes:

* ``frozen``: the backbone runs once over the data (feature caching through the server's
  :class:`~rewardkit.core.scoring.Scorer`), then a linear head trains on the cached reward-token hidden states. The
  features are divided by their per-dimension std for conditioning; the scale is folded back into the head, so the
  saved head reads raw hidden states. This is what makes CPU training of a 135M backbone take minutes.
* ``lora``: peft LoRA adapters on ``lora_target_modules`` + the head; the adapter is saved in ``DIR/adapter``.
* ``full``: every parameter; the backbone is saved as an HF directory in ``DIR/backbone``.

The loop, set-up and save are the shared ones of :mod:`rewardkit.training.loop` (``accelerate`` on CPU, one GPU or
several, bf16 autocast on GPU, gradient accumulation, a tqdm bar, a JSONL run log ``DIR/train_log.jsonl``).

Example::

    result = train_bt(BTConfig(train_file="data/testbed", output_dir="runs/bt", num_epochs=20))
    result.metrics["train_accuracy"]
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from rewardkit.core.forward import pad_batch
from rewardkit.core.loading import RewardModel
from rewardkit.core.losses import bt_loss, pair_stats
from rewardkit.training.config import BTConfig
from rewardkit.training.features import EncodedPair, extract_features
from rewardkit.training.loop import (
    LOG_FILE,
    RESULT_FILE,
    RewardForward,
    Run,
    RunLog,
    TrainResult,
    finish_run,
    optimise,
    pair_margins,
    raw_rewards,
    setup_trainable,
    start_run,
)

log = logging.getLogger(__name__)

__all__ = ["LOG_FILE", "RESULT_FILE", "RewardForward", "TrainResult", "train_bt", "train_frozen_head"]


def train_frozen_head(cfg: BTConfig, accelerator: Any, rm: RewardModel, enc: list[EncodedPair], run_log: RunLog,
                      desc: str = "train bt") -> tuple[int, dict[str, float], torch.Tensor]:
    """Head-only training on cached features; the head is written into ``rm.head`` (reading raw hidden states).

    Returns steps, last logged stats, and raw training rewards (2N,: chosen then rejected).
    """
    with_ll = cfg.ll_feature
    h_c, h_r = extract_features(rm, enc, max_tokens=cfg.feature_batch_tokens,
                                cache_dir=cfg.feature_cache_dir or None, progress=not cfg.disable_tqdm,
                                with_ll=with_ll)  # (N, H) or (N, H + 1): the LM log-likelihood last
    scale = torch.cat([h_c, h_r]).std(dim=0).clamp(min=1e-6)  # (H,) per-dimension std, folded into the head below
    x_c, x_r = (h_c / scale).to(accelerator.device), (h_r / scale).to(accelerator.device)
    margins = pair_margins(enc)
    head = nn.Linear(h_c.shape[1], 1, bias=False)
    nn.init.zeros_(head.weight)  # deterministic start; the BT gradient at zero is the mean feature difference
    head = accelerator.prepare(head)

    def step(batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.tensor(batch, device=x_c.device)
        m = None if margins is None else margins[idx].to(x_c.device)
        r_c, r_r = head(x_c[idx]).squeeze(-1), head(x_r[idx]).squeeze(-1)
        loss = bt_loss(r_c, r_r, m, cfg.center_rewards_coefficient or None)
        if cfg.l2:
            w = head.weight[:, :rm.hidden_size]  # the LL feature's weight is free
            loss = loss + cfg.l2 * (w * w).sum()
        return loss, pair_stats(r_c.detach(), r_r.detach())

    steps, last, _ = optimise(cfg, accelerator, head, step, len(enc), run_log, desc)
    w = accelerator.unwrap_model(head).weight.detach().float().cpu() / scale  # (1, H[+1]): reads raw features
    with torch.no_grad():
        rm.head.weight.copy_(w[:, :rm.hidden_size].to(rm.head.weight.dtype))
        if rm.head.bias is not None:
            rm.head.bias.zero_()
        rm.meta.ll_weight = float(w[0, rm.hidden_size]) if with_ll else 0.0
        raw = torch.cat([h_c, h_r]) @ w.squeeze(0).to(h_c.dtype)  # (2N,)
    return steps, last, raw


def _train_backbone(run: Run) -> tuple[int, dict[str, float], Any]:
    """LoRA or full fine-tune: batches of pairs through body + head. Returns steps, last stats, peft model or None."""
    cfg, rm, enc, accelerator = run.cfg, run.rm, run.enc, run.accelerator
    peft_model = setup_trainable(cfg, rm)
    fwd = RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule)
    fwd = accelerator.prepare(fwd)
    margins = pair_margins(enc)

    def step(batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        items = [enc[i].chosen for i in batch] + [enc[i].rejected for i in batch]
        ids, mask, pos = pad_batch(items, rm.pad_token_id, "right", accelerator.device)
        r = fwd(ids, mask, pos)  # (2B,)
        m = None if margins is None else margins[torch.tensor(batch)].to(r.device)
        r_c, r_r = r[:len(batch)], r[len(batch):]
        return bt_loss(r_c, r_r, m, cfg.center_rewards_coefficient or None), pair_stats(r_c.detach(), r_r.detach())

    steps, last, _ = optimise(cfg, accelerator, fwd, step, len(enc), run.run_log, "train bt", head=rm.head)
    return steps, last, peft_model


def train_bt(cfg: BTConfig, command: str | None = None) -> TrainResult:
    """Train a BT reward model as ``cfg`` says and write a rewardkit checkpoint to ``cfg.output_dir``."""
    with start_run(cfg, "bt") as run:
        peft_model = None
        if cfg.mode == "frozen":
            steps, last, raw = train_frozen_head(cfg, run.accelerator, run.rm, run.enc, run.run_log)
        else:
            steps, last, peft_model = _train_backbone(run)
            raw = raw_rewards(run.rm, run.enc, cfg.feature_batch_tokens)
        return finish_run(run, raw, peft_model, command, steps, last, {},
                          description=f"Bradley-Terry reward model ({cfg.mode}) trained by rewardkit train bt")
