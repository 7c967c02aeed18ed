"""ABC: token-level (dense) rewards from the reward model's own attention (Chan et al. 2024, "Dense Reward for Free").

The reward R is read at one token. ABC spreads it over the response tokens in proportion to how much that token
attends to each of them in the last layer (heads averaged):

    r_t = beta * a_t * R + (1 - beta) * R * [t = T]          a = attention row over the response, renormalised

so ``sum_t r_t = R``. ``T`` is the last response token.

Cheap by design: the model keeps its fused SDPA kernel (``rewardkit.core.attention``). We register an attention
function, ``abc_sdpa``, that calls
transformers' ``sdpa_attention_forward`` for the real output and, only while a :func:`capture` is active on this
thread (a ``ContextVar``) and only for the selected layers, computes the ONE attention row needed per batch item:
``softmax(q[b, :, t_b] @ k[b]^T * scaling + mask[b, t_b])`` averaged over heads, with post-RoPE queries and keys
(GQA handled by grouping the query heads over their key/value head). That is B x H x T work per captured layer,
against the forward's B x T x T x H. The mask function registered under the same name is transformers' ``sdpa_mask``
(without it, transformers would build no mask at all for an unknown implementation name).

Example::

    rm = load_reward_model(path)                      # loads with attn_implementation="abc_sdpa"
    s = Scorer(rm).score_batch([enc], abc_layers=resolve_layers(rm, AbcOptions()))[0]
    d = dense_rewards(enc, s, AbcOptions(beta=0.8))    # d.token_rewards sums to s.reward
    policy = project_to_spans(d, [(0, 3), (3, 9)])      # onto the caller's tokens, still sums to s.reward
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rewardkit.core.attention import (
    ATTN_NAME,
    AttentionCapture,
    abc_sdpa_attention,
    attention_row,
    capture,
    register_attention,
)
from rewardkit.core.errors import ConfigError, InputError
from rewardkit.core.formatting import EncodedItem
from rewardkit.core.forward import (
    ItemScore,
    needs_all_layers,
    pad_batch,
    readout,
    reward_indices,
    scores_from_hidden,
)

if TYPE_CHECKING:
    from rewardkit.core.loading import RewardModel

__all__ = [
    "ATTN_NAME",
    "AbcOptions",
    "AttentionCapture",
    "DenseResult",
    "abc_sdpa_attention",
    "attention_row",
    "capture",
    "dense_rewards",
    "project_to_spans",
    "register_attention",
    "resolve_layers",
    "response_weights",
    "score_with_rows",
    "validate_spans",
]


# --- options --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AbcOptions:
    """How the attention row becomes a dense reward.

    ``beta``: share of R spread by attention; the rest goes to the last response token (paper: 0.8 in the main runs,
    reward rose with beta up to 1.0 in its sweep). ``layer``: which layer's attention (negative counts from the end;
    default -1, the last layer, as the paper and its code do). ``num_layers``: average the rows of this many layers
    ending at ``layer`` (a smoother, less head-specific credit; 1 = the paper). ``renormalize``: rescale the weights
    over the response tokens to sum to 1 (the paper's code does; False keeps the raw attention share, so the prompt's
    share of attention is simply not distributed and ``sum r_t = R (1 - beta (1 - sum a_t))``).
    """

    beta: float = 0.8
    layer: int = -1
    num_layers: int = 1
    renormalize: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise InputError(f"beta must be in [0, 1], got {self.beta}", field="beta")
        if self.num_layers < 1:
            raise ConfigError(f"abc num_layers must be >= 1, got {self.num_layers}")


def resolve_layers(rm: RewardModel, opts: AbcOptions) -> tuple[int, ...]:
    """Absolute layer indices whose rows are averaged, e.g. (29,) for SmolLM2's last layer."""
    config: Any = rm.model.config
    n = int(config.num_hidden_layers)
    last = opts.layer + n if opts.layer < 0 else opts.layer
    first = last - opts.num_layers + 1
    if not 0 <= first <= last < n:
        raise ConfigError(f"abc layer={opts.layer} num_layers={opts.num_layers} is outside the model's {n} layers")
    return tuple(range(first, last + 1))


# --- scoring with rows ----------------------------------------------------------------------------------------------
def score_with_rows(rm: RewardModel, items: Sequence[EncodedItem], padding_side: str, return_hidden: bool,
                    layers: Sequence[int]) -> list[ItemScore]:
    """The plain padded forward (no prefix sharing) with the attention rows captured.

    Each ItemScore gets ``attention`` (the row over the item's own tokens, (n,) fp32 on CPU), ``reward_index`` (in the
    item's tokens) and ``attention_entropy`` (nats, of the renormalised weights over the response tokens). The
    capture only reads q and k, so the reward is bit-identical to the plain path on the same batch.
    """
    ids, mask, pos = pad_batch(items, rm.pad_token_id, padding_side, rm.device)
    idx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)  # (B,)
    with capture(layers, idx) as cap:
        out = rm.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                      output_hidden_states=needs_all_layers(rm))
    rows = cap.mean_row().cpu()  # (B, T)
    # the reward R is whatever the model's read-out gives (the weights a_t are always the reward token's attention)
    h_r, ll = readout(rm, items, out, idx, padding_side)  # (B, H), (B,) or None
    idx_l = idx.tolist()
    width = ids.shape[1]
    extra = []
    for i, it in enumerate(items):
        n = len(it.input_ids)
        start = width - n if padding_side == "left" else 0
        row = rows[i, start:start + n].clone()  # (n,)
        r_idx = int(idx_l[i]) - start
        w = response_weights(it, row, r_idx, renormalize=True)[1]
        ent = max(0.0, float(-(w[w > 0] * np.log(w[w > 0])).sum())) if w.size else 0.0
        extra.append({"attention": row, "reward_index": r_idx, "attention_entropy": ent})
    return scores_from_hidden(rm, items, h_r, return_hidden, extra, ll=ll)


# --- from the row to the dense reward -------------------------------------------------------------------------------
def response_weights(enc: EncodedItem, row: torch.Tensor, reward_index: int, renormalize: bool = True
                     ) -> tuple[list[int], np.ndarray]:
    """(response token indices, their attention weights a_t) from the row over the item's tokens.

    Tokens after the reward token get 0 (causal). With ``renormalize`` the weights sum to 1 (when any is > 0).
    """
    keep = enc.response_token_indices()
    a = row.double().numpy()[keep] if keep else np.zeros(0)
    if keep:
        a = np.where(np.asarray(keep) <= reward_index, a, 0.0)
    if renormalize and a.size and a.sum() > 0:
        a = a / a.sum()
    return keep, a


@dataclasses.dataclass
class DenseResult:
    """Dense reward over the RM's response tokens. ``spans``: character spans in the response (token pieces outside
    the response are clipped off); ``tokens``: the response text of each span; ``token_rewards`` sums to ``reward``
    (renormalised variant)."""

    reward: float
    token_rewards: np.ndarray  # (n,) float64
    spans: list[tuple[int, int]]
    tokens: list[str]
    weights: np.ndarray  # (n,) the a_t used
    beta: float

    @property
    def entropy(self) -> float:
        w = self.weights[self.weights > 0]
        return max(0.0, float(-(w * np.log(w)).sum())) if w.size else 0.0


def dense_rewards(enc: EncodedItem, score: ItemScore, opts: AbcOptions) -> DenseResult:
    """r_t = beta a_t R + (1 - beta) R [t = T] over the response tokens (see the module docstring)."""
    if score.attention is None or score.reward_index is None:
        raise ConfigError("dense_rewards needs an ItemScore scored with abc_layers (attention rows captured)")
    keep, a = response_weights(enc, score.attention, score.reward_index, opts.renormalize)
    big_r = float(score.reward)
    r = opts.beta * a * big_r
    if keep:
        r[-1] += (1.0 - opts.beta) * big_r
    rs, re_ = enc.response_start, enc.response_end
    spans = [(max(s, rs) - rs, min(e, re_) - rs) for s, e in (enc.offsets[i] for i in keep)]
    resp = enc.response
    return DenseResult(reward=big_r, token_rewards=r, spans=spans, tokens=[resp[s:e] for s, e in spans], weights=a,
                       beta=opts.beta)


# --- the caller's tokens --------------------------------------------------------------------------------------------
def validate_spans(response: str, spans: Sequence[Sequence[int]], field: str) -> list[tuple[int, int]]:
    """Check caller spans (character offsets in ``response``, Python ``str`` indices, i.e. code points): inside it,
    start < end, in order, covering every non-whitespace character. Raises InputError naming ``{field}[j]``.

    Spans must not overlap, with one exception real tokenizers need: byte-level BPE splits a multi-byte character
    over several tokens and reports that character's span for each of them (SmolLM2: ``' ñ'`` (7, 9) then ``'ñ'``
    (8, 9); ``'🙂'`` twice as (1, 2)). So a span may share its first character with the previous span when that
    character is multi-byte in UTF-8, provided it does not end before the previous one.
    """
    out: list[tuple[int, int]] = []
    n = len(response)
    prev_s, prev_e = 0, 0
    for j, sp in enumerate(spans):
        if len(sp) != 2:
            raise InputError(f"{field}[{j}]: a span is [start, end], got {list(sp)}", field=f"{field}[{j}]")
        s, e = int(sp[0]), int(sp[1])
        if not 0 <= s < e <= n:
            raise InputError(f"{field}[{j}]: span [{s}, {e}] must satisfy 0 <= start < end <= {n} (the response's "
                             "length in characters)", field=f"{field}[{j}]")
        if s < prev_e:
            split_char = (s == prev_e - 1 and s >= prev_s and e >= prev_e and len(response[s].encode("utf-8")) > 1)
            if not split_char:
                raise InputError(f"{field}[{j}]: span [{s}, {e}] overlaps or runs back over the previous span "
                                 f"[{prev_s}, {prev_e}]; spans must be in order and not overlap (except on one "
                                 "multi-byte character split between byte-level tokens)", field=f"{field}[{j}]")
        for c in range(prev_e, s):  # the gap before this span: whitespace only
            if not response[c].isspace():
                raise InputError(f"{field}[{j}]: character {c} ({response[c]!r}) before span [{s}, {e}] is not covered "
                                 "by any span; spans must cover the response's non-whitespace characters",
                                 field=f"{field}[{j}]")
        out.append((s, e))
        prev_s, prev_e = s, max(e, prev_e)
    for c in range(prev_e, n):
        if not response[c].isspace():
            where = f"{field}[{len(out) - 1}]" if out else field
            raise InputError(f"{where}: character {c} ({response[c]!r}) after the last span is not covered; spans must "
                             "cover the response's non-whitespace characters", field=where)
    return out


def project_to_spans(dense: DenseResult, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Rewards over the caller's spans: each RM token's reward is split over the caller spans its characters overlap,
    in proportion to the overlap. An RM token that overlaps none (whitespace between caller tokens) goes to the next
    caller span (the previous one at the end), so the sum is kept. Returns (len(spans),) float64."""
    out = np.zeros(len(spans))
    if not spans:
        return out
    starts = np.asarray([s for s, _ in spans])
    ends = np.asarray([e for _, e in spans])
    for (s, e), r in zip(dense.spans, dense.token_rewards, strict=True):
        ov = np.clip(np.minimum(ends, e) - np.maximum(starts, s), 0, None)  # (K,) characters in common
        tot = ov.sum()
        if tot > 0:
            out += r * ov / tot
        else:
            k = int(np.searchsorted(starts, s, side="left"))
            out[min(k, len(spans) - 1)] += r
    return out
