"""Shared-prefix scoring: items of a batch that start with the same token ids (GRPO/RLOO groups: K completions of
one prompt) run that prefix once and score each completion against its key/value cache.

How a batch is scored (``Scorer`` in ``scoring.py`` drives it; this module holds the groups and the cache runs):

1. ``find_prefix_groups`` sorts the items by token ids and picks groups of >= 2 neighbours whose common prefix is at
   least ``min_prefix`` tokens, maximising the tokens saved, sum over groups of (G - 1) * P (dynamic programme over
   the sorted order). Detection is on token ids, never text: items may come from different requests.
2. Per group: one unpadded forward of the prefix (1, P) with ``use_cache=True`` (a ``DynamicCache``); the cache is
   expanded over the completions that need it (``batch_repeat_interleave``); the completions run right-padded in one
   batch (n, C) with a 2-D attention mask over prefix + completion (n, P + C) and position ids P .. P + C - 1.
3. The reward token follows ``forward.reward_indices`` on the item's full ids (the transformers rule skips trailing
   pad ids, so an item whose completion is empty or only pad ids is read from the prefix's hidden states).
   Completions are cut right after their reward token (later tokens cannot change it in a causal model).
4. Items in no group are scored by ``Scorer.score_batch`` (the plain path) on the rest of the batch.

Exactness: equal to the plain path up to fp32 GEMM rounding (tests: atol 1e-5, rtol 1e-4). The completion batch is
always right-padded, whatever the scorer's ``padding_side`` (it only affects the plain path; positions and masks make
both give the same numbers). Dense (ABC) items are routed through the plain path by the scorer (see docs/prefix.md).

Support: decoder-only models whose cache is a ``DynamicCache`` of full-attention ``DynamicLayer`` s (Llama, Qwen2,
Mistral without sliding window, GPT-2, SmolLM2, ...), checked once per model with a numeric probe (prefix + suffix
vs one forward). Anything else falls back to the plain path, logged once.

Example::

    groups = find_prefix_groups([e.input_ids for e in encs], min_prefix=16)
    scores = Scorer(rm, prefix_sharing=True).score_batch(encs)   # dispatches here
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rewardkit.core.formatting import EncodedItem
from rewardkit.core.forward import CACHE_KW, output_cache, pad_batch, reward_indices
from rewardkit.core.loading import RewardModel

log = logging.getLogger(__name__)

DEFAULT_MIN_PREFIX = 16
DEFAULT_MAX_GROUP = 256
DEFAULT_MAX_KV_TOKENS = 32768  # rows x (P + C) per completion chunk: bounds the expanded cache's memory
DEFAULT_MAX_PADDING = 0.25  # largest share of padded completion positions in one chunk
# A group's prefix must be >= this share of its items' mean length. Measured on SmolLM2 / 2-core CPU: K=1 items
# sharing only the chat template's system prompt (~14% of each item) ran 10% slower shared than unshared.
DEFAULT_MIN_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class PrefixGroup:
    """Items (indices into the batch) whose first ``prefix_len`` token ids are identical."""

    indices: tuple[int, ...]
    prefix_len: int

    @property
    def saved_tokens(self) -> int:
        """Prefix tokens not recomputed: every member but one reuses the prefix."""
        return (len(self.indices) - 1) * self.prefix_len


@dataclasses.dataclass
class PrefixStats:
    """Cumulative counters of one scorer (read by the metrics layer; not thread-safe across scorers).

    ``tokens_total``: tokens of the items scored through groups; ``tokens_computed``: tokens the model actually ran
    over for them (one prefix + completions cut at the reward token); ``prefix_tokens_saved``: sum of (G - 1) * P;
    ``forwards``: model forwards of the prefix path (one per prefix, one per completion chunk).
    """

    batches: int = 0
    groups: int = 0
    items_shared: int = 0
    prefix_tokens_saved: int = 0
    tokens_total: int = 0
    tokens_computed: int = 0
    forwards: int = 0
    fallbacks: int = 0

    def snapshot(self) -> PrefixStats:
        return dataclasses.replace(self)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_prefix_groups(seqs: Sequence[Sequence[int]], min_prefix: int = DEFAULT_MIN_PREFIX,
                       max_group: int = DEFAULT_MAX_GROUP, min_fraction: float = 0.0) -> list[PrefixGroup]:
    """Groups of >= 2 sequences sharing >= ``min_prefix`` leading ids, chosen to maximise the ids saved.

    ``min_fraction``: a group's prefix must also be at least this share of its members' mean length (a short
    shared system prompt in front of long, different prompts saves too little to pay for the cached path).

    Sequences sorted lexicographically put every set sharing a prefix next to each other; a group is a run of that
    order and its prefix is the smallest neighbour LCP in the run. A DP over the order picks runs maximising
    sum (G - 1) * P (runs at most ``max_group`` long). Items in no group are not returned.

    >>> find_prefix_groups([[1, 2, 3, 4], [9], [1, 2, 3, 5]], min_prefix=3)
    [PrefixGroup(indices=(0, 2), prefix_len=3)]
    """
    if min_prefix < 1:
        raise ValueError(f"min_prefix must be >= 1, got {min_prefix}")
    n = len(seqs)
    if n < 2:
        return []
    order = sorted(range(n), key=lambda i: tuple(seqs[i]))
    lcp = [common_prefix_len(seqs[order[k]], seqs[order[k + 1]]) for k in range(n - 1)]  # lcp[k]: order k, k+1
    best = [0] * (n + 1)  # best[j]: max saving over order[:j]
    choice = [(0, 0)] * (n + 1)  # (run start, prefix len) of the last run in best[j]; prefix 0 = singleton
    for j in range(1, n + 1):
        best[j], choice[j] = best[j - 1], (j - 1, 0)
        p, total = 1 << 62, len(seqs[order[j - 1]])
        for i in range(j - 2, max(-1, j - 1 - max_group), -1):  # run order[i:j], at least two items
            p = min(p, lcp[i])
            total += len(seqs[order[i]])
            if p < min_prefix:
                break
            if p < min_fraction * total / (j - i):
                continue
            value = best[i] + (j - 1 - i) * p
            if value > best[j]:
                best[j], choice[j] = value, (i, p)
    groups: list[PrefixGroup] = []
    j = n
    while j > 0:
        i, p = choice[j]
        if p > 0:
            groups.append(PrefixGroup(tuple(sorted(order[i:j])), p))
        j = i
    groups.reverse()
    return groups


class PrefixSharer:
    """Holds the support decision (per model), the counters and the knobs of one scorer's prefix path."""

    def __init__(self, min_prefix: int = DEFAULT_MIN_PREFIX, max_kv_tokens: int = DEFAULT_MAX_KV_TOKENS,
                 max_padding: float = DEFAULT_MAX_PADDING, min_fraction: float = DEFAULT_MIN_FRACTION) -> None:
        if min_prefix < 1:
            raise ValueError(f"min_prefix must be >= 1, got {min_prefix}")
        if max_kv_tokens < 1:
            raise ValueError(f"max_kv_tokens must be >= 1, got {max_kv_tokens}")
        if not 0.0 <= max_padding <= 1.0:
            raise ValueError(f"max_padding must be in [0, 1], got {max_padding}")
        self.min_prefix = min_prefix
        self.max_kv_tokens = max_kv_tokens
        self.max_padding = max_padding
        self.min_fraction = min_fraction
        # packed: a group's completions in one row with a block mask (no padding, no cache copies; measured faster
        # on CPU); batched: right-padded rows over the expanded cache (max_padding, max_kv_tokens apply).
        self.mode = "packed"
        self.stats = PrefixStats()
        self._support: dict[int, bool] = {}  # id(model) -> supported
        self._lock = threading.Lock()

    # -- support ------------------------------------------------------------------------------------------------
    def supported(self, rm: RewardModel) -> bool:
        """Whether prefix reuse is exact for this model (checked once, then cached; a refusal is logged once)."""
        key = id(rm.model)
        with self._lock:
            if key not in self._support:
                ok, why = probe_support(rm)
                self._support[key] = ok
                if ok:
                    log.info("prefix sharing enabled model=%s", rm.model_id)
                else:
                    log.warning("prefix sharing disabled model=%s reason=%s; using the plain path", rm.model_id, why)
            return self._support[key]

    # -- scoring ------------------------------------------------------------------------------------------------
    def group_hidden(self, rm: RewardModel, items: Sequence[EncodedItem], group: PrefixGroup,
                     on_prefix: Callable[[Any], None] | None = None) -> torch.Tensor:
        """Hidden states at each member's reward token, (G, H), in ``group.indices`` order. ``on_prefix``: called
        with the prefix's cache right after its forward (the KV cache across batches stores it)."""
        p = group.prefix_len
        members = [items[i] for i in group.indices]
        ids, mask, _ = pad_batch(members, rm.pad_token_id, "right", torch.device("cpu"))  # right-padded: indices
        ridx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule).tolist()  # as if unpadded
        dev = rm.device
        prefix_ids = torch.tensor([members[0].input_ids[:p]], dtype=torch.long, device=dev)  # (1, P)
        out = rm.body(input_ids=prefix_ids, position_ids=torch.arange(p, device=dev)[None], use_cache=True)
        h_prefix = out.last_hidden_state[0]  # (P, H)
        cache = output_cache(out)
        if on_prefix is not None:
            on_prefix(cache)
        result: list[torch.Tensor | None] = [h_prefix[r] if r < p else None for r in ridx]
        need = [k for k, r in enumerate(ridx) if r >= p]  # members whose reward token lies in their completion
        self.stats.tokens_computed += p
        self.stats.forwards += 1
        # Longest completions first; a chunk grows while its padding stays under max_padding and its expanded
        # cache under max_kv_tokens, so completions of very different lengths do not pad each other.
        need.sort(key=lambda k: -ridx[k])
        start = 0
        while start < len(need):
            width = ridx[need[start]] - p + 1
            stop, real = start + 1, width
            while stop < len(need):
                c = ridx[need[stop]] - p + 1
                if self.mode == "packed":  # one row: the mask is (S, P + S) for S packed tokens
                    if (real + c) * (p + real + c) > self.max_kv_tokens * 64:
                        break
                elif ((stop - start + 1) * (p + width) > self.max_kv_tokens
                      or 1 - (real + c) / ((stop - start + 1) * width) > self.max_padding):
                    break
                real += c
                stop += 1
            chunk = need[start:stop]
            rows = len(chunk)
            tails: list[Sequence[int]] = [members[k].input_ids[p:ridx[k] + 1] for k in chunk]
            run = self._run_packed if self.mode == "packed" else self._run_completions
            h_chunk = run(rm, cache, p, tails)
            for row, k in enumerate(chunk):
                result[k] = h_chunk[row]
            start += rows
        assert all(h is not None for h in result)
        return torch.stack(result)  # type: ignore[arg-type]

    def _run_packed(self, rm: RewardModel, cache: object, p: int, tails: list[Sequence[int]]) -> torch.Tensor:
        """Run completions packed into ONE row after the batch-1 prefix cache (``packed_forward``), then crop the
        cache back to the prefix. (n, H)."""
        h, total = packed_forward(rm, cache, p, tails)
        cache.crop(-total)  # type: ignore[attr-defined]  # (1, kv, P + S, d) -> (1, kv, P, d)
        self.stats.tokens_computed += total
        self.stats.forwards += 1
        return h

    def _run_completions(self, rm: RewardModel, cache: object, p: int, tails: list[Sequence[int]]) -> torch.Tensor:
        """Run completions against the batch-1 prefix cache; return the last real token's hidden state, (n, H).

        The cache is expanded to n rows for the forward and restored to the batch-1 prefix afterwards.
        """
        n, width = len(tails), max(len(t) for t in tails)
        dev = rm.device
        ids = torch.full((n, width), rm.pad_token_id, dtype=torch.long)  # (n, C) right-padded
        mask = torch.zeros((n, p + width), dtype=torch.long)  # (n, P + C): prefix + real completion tokens
        mask[:, :p] = 1
        for row, t in enumerate(tails):
            ids[row, : len(t)] = torch.tensor(list(t), dtype=torch.long)
            mask[row, p: p + len(t)] = 1
        pos = torch.arange(p, p + width)[None].expand(n, width)  # (n, C)
        if n > 1:
            cache.batch_repeat_interleave(n)  # type: ignore[attr-defined]  # (1, kv, P, d) -> (n, kv, P, d)
        out = rm.body(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                      **{CACHE_KW: cache}, use_cache=True)
        cache.crop(-width)  # type: ignore[attr-defined]  # (n, kv, P + C, d) -> (n, kv, P, d)
        if n > 1:
            cache.batch_select_indices(torch.tensor([0], device=dev))  # type: ignore[attr-defined]  # (1, kv, P, d)
        last = torch.tensor([len(t) - 1 for t in tails], device=dev)  # (n,)
        self.stats.tokens_computed += sum(len(t) for t in tails)
        self.stats.forwards += 1
        return out.last_hidden_state[torch.arange(n, device=dev), last]  # (n, H)


def packed_forward(rm: RewardModel, cache: object, p: int, tails: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
    """Completions packed into ONE row after a batch-1 cache of ``p`` prefix tokens; each one's last hidden state.

    No padding and no cache expansion: a 4-D additive mask lets each completion token see the prefix and the
    earlier tokens of its own completion only; position ids restart at ``p`` for every completion. Returns
    ((n, H), S: the packed tokens the cache grew by)."""
    dev = rm.device
    lens = [len(t) for t in tails]
    total = sum(lens)
    ids = torch.tensor([[t for tail in tails for t in tail]], dtype=torch.long, device=dev)  # (1, S)
    pos = torch.cat([torch.arange(p, p + n) for n in lens])[None].to(dev)  # (1, S)
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))  # (S,) completion of each token
    ar = torch.arange(total)
    own = (seg[:, None] == seg[None, :]) & (ar[:, None] >= ar[None, :])  # (S, S) causal within a completion
    allowed = torch.cat([torch.ones((total, p), dtype=torch.bool), own], dim=1)  # (S, P + S)
    mask = torch.zeros((1, 1, total, p + total), dtype=rm.dtype)  # (1, 1, S, P + S) additive
    mask.masked_fill_(~allowed[None, None], torch.finfo(rm.dtype).min)
    out = rm.body(input_ids=ids, attention_mask=mask.to(dev), position_ids=pos, **{CACHE_KW: cache}, use_cache=True)
    last = torch.tensor(lens).cumsum(0) - 1  # (n,)
    return out.last_hidden_state[0, last.to(dev)], total  # (n, H)


def probe_support(rm: RewardModel, prefix_len: int = 12, suffix_len: int = 5) -> tuple[bool, str]:
    """Check on a short synthetic sequence that prefix + cached suffix reproduces one plain forward.

    Returns (ok, reason). Refuses encoder-decoder models, caches that are not full-attention ``DynamicCache`` s
    (sliding windows, linear attention, ...), forwards that raise, and numeric mismatches.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cfg = getattr(rm.model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False, "not a decoder-only model"
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if vocab < 2:
        return False, "unknown vocab_size"
    gen = torch.Generator().manual_seed(1234)
    seq = torch.randint(0, vocab, (1, prefix_len + suffix_len), generator=gen)
    seq[seq == rm.pad_token_id] = (rm.pad_token_id + 1) % vocab
    seq = seq.to(rm.device)
    try:
        with torch.inference_mode():
            full = rm.body(input_ids=seq, use_cache=False).last_hidden_state[0, -1].float()
            out = rm.body(input_ids=seq[:, :prefix_len], position_ids=torch.arange(prefix_len, device=rm.device)[None],
                          use_cache=True)
            cache = output_cache(out)
            if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
                return False, f"cache {type(cache).__name__} is not a full-attention DynamicCache"
            mask = torch.ones((1, prefix_len + suffix_len), dtype=torch.long, device=rm.device)
            pos = torch.arange(prefix_len, prefix_len + suffix_len, device=rm.device)[None]
            part = rm.body(input_ids=seq[:, prefix_len:], attention_mask=mask, position_ids=pos,
                           **{CACHE_KW: cache}, use_cache=True).last_hidden_state[0, -1].float()
    except Exception as exc:  # any model whose forward does not take a cache this way is unsupported
        return False, f"cached forward failed: {type(exc).__name__}: {exc}"
    tol = 1e-3 if rm.dtype == torch.float32 else 5e-2
    err = float((full - part).abs().max() / full.abs().max().clamp(min=1e-6))
    if err > tol:
        return False, f"probe mismatch {err:.2e} > {tol:g}"
    return True, "ok"


def prefix_key(item: EncodedItem, min_prefix: int = DEFAULT_MIN_PREFIX) -> int | None:
    """A batching key: hash of the ids before the response (the prompt), or None when that prompt is shorter than
    ``min_prefix`` tokens. Items with equal keys (a GRPO group) should share a batch so the prompt runs once.
    """
    first = next((i for i, (s, e) in enumerate(item.offsets) if e > s and e > item.response_start), None)
    n = len(item.input_ids) if first is None else first
    return hash(item.input_ids[:n]) if n >= min_prefix else None
