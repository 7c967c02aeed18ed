"""One forward of a reward model, and the one rule from hidden states to scores: padding, where the reward is read,
head, normalisation. Every scoring path (plain, prefix-shared, ABC with attention rows, R2M's H_last) ends in
:func:`scores_from_hidden`, so the head -> normalise -> ItemScore block exists once.

Layering: ``loading`` and ``attention`` below; ``prefix`` and ``abc`` build on this module; ``scoring.Scorer`` on top
chooses the path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rewardkit.core.formatting import EncodedItem
from rewardkit.core.loading import RewardModel

# transformers renamed a forward's `past_key_values` to `cache` (and warns on every use of the old name); pass and read
# the name the installed version wants, so the first requests print no deprecation noise.
try:
    from transformers.utils.generic import _BCCacheNameMeta  # noqa: F401  (present where `cache` is the new name)

    CACHE_KW = "cache"
except ImportError:  # older transformers
    CACHE_KW = "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output, by the name the installed transformers uses."""
    return out.cache if CACHE_KW == "cache" else out.past_key_values

__all__ = ["CACHE_KW", "ItemScore", "normalise", "output_cache", "pad_batch", "plain_forward", "raw_reward",
           "readout", "readout_forward", "readout_tail_start", "reward_index", "reward_indices", "reward_position",
           "scores_from_hidden"]


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
    # -- the backbone's mean log-likelihood of the response tokens, when the read-out has an LL term (or was asked)
    ll: float | None = None


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


def reward_index(ids: Sequence[int], pad_token_id: int, rule: str) -> int:
    """Where the reward is read in one unpadded item: :func:`reward_indices` for a single row (0 if all pad)."""
    t = torch.tensor([list(ids)], dtype=torch.long)
    return int(reward_indices(t, torch.ones_like(t), pad_token_id, rule)[0])


def reward_position(ids: Sequence[int], pad_token_id: int, rule: str) -> int:
    """:func:`reward_index` in plain Python (no tensors: per-item bookkeeping on the serving path)."""
    if rule == "last_attended":
        return len(ids) - 1 if ids else 0
    if rule != "transformers":
        raise ValueError(f"unknown reward_token_rule {rule!r}")
    return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad_token_id), 0)


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


def plain_forward(rm: RewardModel, items: Sequence[EncodedItem], padding_side: str,
                  on_cache: Callable[[Any, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One padded forward of the body. Returns (last hidden states (B, T, H), reward indices (B,)).

    ``on_cache``: the forward keeps its KV cache and hands it over with the padded width, ``on_cache(cache, T)``
    (the prompt KV cache across requests stores rows of it)."""
    ids, mask, pos = pad_batch(items, rm.pad_token_id, padding_side, rm.device)
    out = rm.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=on_cache is not None)
    if on_cache is not None:
        on_cache(output_cache(out), ids.shape[1])
    return out.last_hidden_state, reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)


def needs_all_layers(rm: RewardModel) -> bool:
    """The read-out reads a layer other than the last: the forward must return every layer's hidden states."""
    return rm.meta.readout_layer != -1


def readout(rm: RewardModel, items: Sequence[EncodedItem], out: Any, idx: torch.Tensor, padding_side: str,
            want_ll: bool = False, starts: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the head reads, (B, H), and the log-likelihood term, (B,) or None, from one padded forward's output.

    ``readout == "token"``: the last layer at the reward token ``idx``. ``"mean_response"``: ``hidden_states[L]``
    (``L = readout_layer``; -1 = the last layer) averaged over the item's response tokens (its last token when it has
    none). The LL term (``ll_weight != 0``, or ``want_ll``): the mean over response tokens of log p(token | prefix)
    under the backbone's tied LM head (the last layer's states times the input embeddings).

    ``starts``: the row position of each item's first token, instead of what ``padding_side`` implies; ``-m`` for a
    forward over an item's tokens after a cached prefix of ``m`` (``readout_tail_start`` says how far that may go).
    """
    meta = rm.meta
    last = out.last_hidden_state  # (B, T, H)
    rows = torch.arange(len(items), device=last.device)
    if meta.readout == "token":
        h = last[rows, idx]  # (B, H)
    else:
        layer = last if meta.readout_layer == -1 else out.hidden_states[meta.readout_layer]  # (B, T, H)
    if meta.readout == "token" and not (meta.ll_weight or want_ll):
        return h, None
    width = last.shape[1]
    pooled, lls = [], []
    model: Any = rm.model
    emb = model.get_input_embeddings().weight if (meta.ll_weight or want_ll) else None  # (V, H) = tied LM head
    for i, it in enumerate(items):
        n = len(it.input_ids)
        start = starts[i] if starts is not None else width - n if padding_side == "left" else 0
        resp = it.response_token_indices() or [n - 1]
        if meta.readout != "token":
            pooled.append(layer[i, [start + k for k in resp]].mean(0))
        if emb is not None:
            prev = [start + k - 1 for k in resp if k >= 1]
            if prev:
                tgt = torch.tensor([it.input_ids[k] for k in resp if k >= 1], device=last.device)
                logp = torch.log_softmax(last[i, prev].float() @ emb.T.float(), dim=-1)  # (R, V)
                lls.append(logp.gather(1, tgt[:, None]).mean())
            else:
                lls.append(last.new_zeros((), dtype=torch.float32))
    if meta.readout != "token":
        h = torch.stack(pooled)
    return h, (torch.stack(lls).float() if emb is not None else None)


def readout_forward(rm: RewardModel, items: Sequence[EncodedItem], padding_side: str, want_ll: bool = False,
                    on_cache: Callable[[Any, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One padded forward and :func:`readout`: the path of every model whose read-out is not the plain one.
    ``on_cache``: as in :func:`plain_forward`."""
    ids, mask, pos = pad_batch(items, rm.pad_token_id, padding_side, rm.device)
    out = rm.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=on_cache is not None,
                  output_hidden_states=needs_all_layers(rm))
    if on_cache is not None:
        on_cache(output_cache(out), ids.shape[1])
    idx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)
    return readout(rm, items, out, idx, padding_side, want_ll)


def readout_tail_start(rm: RewardModel, item: EncodedItem, reward_idx: int, want_ll: bool = False) -> int:
    """How many leading tokens of ``item`` a read-out may take from a cache (0: none): the tokens before the first
    one it reads. The pooled states start at the first response token; the LL term also needs the last layer's state
    one token before it; a token read-out needs the reward token. Plain text has no response start: 0."""
    meta = rm.meta
    if item.response_start <= 0:
        return 0
    resp = item.response_token_indices()
    if not resp:
        return 0
    first = reward_idx if meta.readout == "token" else resp[0]
    if meta.ll_weight or want_ll:
        first = min(first, resp[0] - 1)
    return max(0, min(first, reward_idx))


def normalise(rm: RewardModel, raw: Any) -> Any:
    """The checkpoint's reward normalisation, ``(raw - norm_mean) / norm_std`` (a tensor, an array or a float)."""
    return (raw - rm.meta.norm_mean) / rm.meta.norm_std


def raw_reward(rm: RewardModel, h: torch.Tensor, ll: torch.Tensor | None = None) -> torch.Tensor:
    """The head's raw reward of read-out states ``h`` (B, H), plus ``ll_weight * ll`` when the model has an LL term:
    (B,) fp32. The one place the two parts of a reward are added (scoring and feature-based evaluation)."""
    raw = rm.head(h.to(rm.head.weight.device, rm.head.weight.dtype)).squeeze(-1).float()  # (B,)
    if ll is not None and rm.meta.ll_weight:
        raw = raw + rm.meta.ll_weight * ll.to(raw.device).float()
    return raw


def scores_from_hidden(rm: RewardModel, items: Sequence[EncodedItem], h_r: torch.Tensor, return_hidden: bool,
                       extra: Sequence[dict[str, Any]] | None = None, ll: torch.Tensor | None = None
                       ) -> list[ItemScore]:
    """The read-out states (B, H) of ``items`` -> head (+ ``ll_weight * ll``) -> normalisation -> one ItemScore
    each, in order. ``extra``: per-item ItemScore fields (ABC's attention row, reward index, entropy)."""
    raw = raw_reward(rm, h_r, ll)  # (B,)
    rewards = normalise(rm, raw)
    raw_l, rew_l = raw.tolist(), rewards.tolist()
    ll_l = ll.tolist() if ll is not None else [None] * len(items)
    return [ItemScore(reward=rew_l[i], raw_reward=raw_l[i], num_tokens=len(it.input_ids), truncated=it.truncated,
                      hidden=h_r[i].float().cpu() if return_hidden else None, ll=ll_l[i], **(extra[i] if extra else {}))
            for i, it in enumerate(items)]
