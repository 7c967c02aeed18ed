"""Batched reward computation: pad, one forward of the body, read the hidden state at the reward token, head.

The scorer is the contract between the server's scheduler and a model (TGI's ``Model``/``Batch`` split): it takes
already-encoded items and returns one :class:`ItemScore` each, in order. It owns no queue and no threads.

Example::

    scorer = Scorer(rm)
    scores = scorer.score_batch([fmt.encode(item)])
    scores[0].reward
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from rewardkit.core.formatting import EncodedItem
from rewardkit.core.loading import RewardModel


@dataclasses.dataclass
class ItemScore:
    """Result for one item. ``hidden`` is the last-layer hidden state at the reward token (for R2M), when asked."""

    reward: float
    num_tokens: int
    truncated: bool
    raw_reward: float
    hidden: torch.Tensor | None = None
    # -- ABC (rewardkit.core.abc), set only when scored with abc_layers: the head-mean attention row of the reward
    # token over the item's own tokens (n,) fp32 CPU, the reward token's index, entropy (nats) of the response weights
    attention: torch.Tensor | None = None
    reward_index: int | None = None
    attention_entropy: float | None = None


def reward_indices(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, rule: str) -> torch.Tensor:
    """Index of the token where the reward is read, per row. (B, T) -> (B,).

    ``transformers``: rightmost token whose id is not pad_token_id (as ``*ForSequenceClassification``), which skips a
    trailing eos when pad == eos. ``last_attended``: rightmost position with attention_mask 1 (OpenRLHF).
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    if rule == "transformers":
        keep = (input_ids != pad_token_id) & attention_mask.bool()  # (B, T)
    elif rule == "last_attended":
        keep = attention_mask.bool()
    else:
        raise ValueError(f"unknown reward_token_rule {rule!r}")
    return (positions * keep).argmax(-1)  # (B,)


def pad_batch(items: Sequence[EncodedItem], pad_token_id: int, padding_side: str, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest item. Returns input_ids, attention_mask, position_ids, each (B, T).

    Position ids count attended tokens only, so left padding does not shift absolute positions (GPT-2 style models).
    """
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, sl] = torch.tensor(it.input_ids, dtype=torch.long)
        mask[row, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return ids.to(device), mask.to(device), pos.to(device)


class Scorer:
    """Scores batches of encoded items with one reward model."""

    def __init__(self, rm: RewardModel, padding_side: str = "right", prefix_sharing: bool = True) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        self.rm = rm
        self.padding_side = padding_side
        # -- prefix sharing (rewardkit.core.prefix): items sharing a token prefix run it once; counters in .prefix.stats
        from rewardkit.core.prefix import PrefixSharer

        self.prefix_sharing = prefix_sharing
        self.prefix = PrefixSharer()

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.rm.meta.norm_mean) / self.rm.meta.norm_std

    @torch.inference_mode()
    def score_batch(self, items: Sequence[EncodedItem], return_hidden: bool = False,
                    abc_layers: Sequence[int] | None = None) -> list[ItemScore]:
        """Score items in order. ``abc_layers``: also capture the attention rows ABC needs (plain path only)."""
        if not items:
            return []
        # -- ABC dense rewards (rewardkit.core.abc): plain padded path with the attention row captured --
        if abc_layers is not None:
            from rewardkit.core.abc import score_batch_with_rows

            return score_batch_with_rows(self, items, return_hidden, abc_layers)
        # -- end ABC --
        # -- prefix sharing (rewardkit.core.prefix): None when no group is worth it or the model is unsupported --
        if self.prefix_sharing:
            from rewardkit.core.prefix import score_with_shared_prefixes

            shared = score_with_shared_prefixes(self, items, return_hidden)
            if shared is not None:
                return shared
        # -- end prefix sharing --
        rm = self.rm
        ids, mask, pos = pad_batch(items, rm.pad_token_id, self.padding_side, rm.device)
        out = rm.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        idx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)  # (B,)
        h_r = hidden[torch.arange(len(items), device=hidden.device), idx]  # (B, H)
        raw = rm.head(h_r).squeeze(-1).float()  # (B,)
        rewards = self.normalise(raw)
        raw_l, rew_l = raw.tolist(), rewards.tolist()
        return [
            ItemScore(reward=rew_l[i], raw_reward=raw_l[i], num_tokens=len(it.input_ids), truncated=it.truncated,
                      hidden=h_r[i].float().cpu() if return_hidden else None)
            for i, it in enumerate(items)
        ]


@torch.inference_mode()
def reference_score(rm: RewardModel, item: EncodedItem) -> float:
    """The plain single-item forward of the HF model (no padding, no batching): what parity is measured against."""
    ids = torch.tensor([item.input_ids], dtype=torch.long, device=rm.device)
    logits = rm.model(input_ids=ids).logits  # (1, 1)
    raw = float(logits[0, 0].float())
    return (raw - rm.meta.norm_mean) / rm.meta.norm_std
