"""A prompt KV cache across requests: the first item of a GRPO group stores its prompt's keys and values, and mates
that arrive later, in other requests and other batches, run only their completion against them.

Trainers send one sample per request (verl's reward loop, OpenRLHF, slime), many in flight, so the K completions of
one prompt are spread over several batches and in-batch sharing (``rewardkit.core.prefix``) catches only part of
the reuse. vLLM's automatic prefix caching solves the same problem for generation; this is its scoring analogue.

Design (why):

- **Whole entries, found by block hashes.** An entry holds one contiguous KV tensor per layer for a token prefix
  (fast to use: no gather of scattered blocks, one ``torch.cat`` per layer per forward). It is indexed under the
  chained hash of each ``block``-token boundary of its ids, so an item finds the entry sharing its longest
  block-aligned prefix without knowing where its prompt ends. That is what plain-text items need (OpenRLHF's
  ``query`` is prompt and response in one string). The match is then verified on the ids (no trust in a hash) and
  extended token by token up to the entry's length: reuse is exact to the token.
- **What is stored.** Chat items (a known response start) store their prompt part. Plain-text items store every
  token up to the reward token; mates reuse the part they share. An item stores only when the cache did not already
  give it its prompt (chat), or at least half of it (plain), so K mates store one entry, not K.
- **Admission.** Storing costs a cache-keeping forward and a copy (measured ~7-13% per item on the 2-layer tiny
  model, nothing visible on SmolLM2). When the last ``ADMIT_WINDOW`` stores brought no reuse (K = 1 traffic), only
  one candidate in ``ADMIT_SAMPLE``, drawn at random, is stored until a reuse happens again; then every candidate is
  (a counter would alias with the group size: with K = 8 in a row it always picked a group's last mate). A hit on a
  shared system prompt alone (under ``min_fraction`` of the item) is not a reuse here: every K = 1 item has one.
- **Bounded by bytes, LRU.** ``max_bytes`` caps the KV tensors held. The least recently used entries are evicted
  first. An entry larger than the whole budget is not stored.
- **Exact.** A token's keys and values depend only on the tokens before it and their positions, so KV taken from a
  full forward (right or left padded: positions count attended tokens) is the prompt's KV. Rewards match a full
  forward within fp32 GEMM rounding (tests: atol 1e-5, rtol 1e-4). The cache holds no rewards and no head output:
  a head swap needs no invalidation. A change of the body's weights does (``clear()``; the server never changes
  them in place).
- **Read-out models** (pooled states over the response, the LM's log-likelihood: the default model) need every
  response token's states of one layer, and the last layer's state one token before the response. A chat item
  reuses at most the tokens before that one (``forward.readout_tail_start``: the stored prompt less one token) and
  runs the rest with every layer's states (``run_tail_readout``). Plain text has no response start, so the pooled
  states cover every token: nothing is reused and nothing is looked up.
- **ABC dense items** need the reward token's attention over the prompt's keys per head; they take the plain path
  (no lookup, no store), as in-batch prefix sharing does.

The caller (``Scorer``) checks ``prefix.probe_support`` first: models whose cache is not a full-attention
``DynamicCache`` never reach this module.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from rewardkit.core.formatting import EncodedItem
from rewardkit.core.forward import CACHE_KW, needs_all_layers, output_cache, readout
from rewardkit.core.loading import RewardModel
from rewardkit.core.prefix import packed_forward

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (1, kv_heads, P, head_dim)

DEFAULT_BLOCK = 16
ADMIT_WINDOW = 64  # stores without any reuse before admission is sampled
ADMIT_SAMPLE = 16  # then one candidate in this many is stored (at random)


@dataclasses.dataclass
class KVCacheStats:
    """Cumulative counters (read by the metrics layer). ``hits``: items that reused a stored prefix; ``misses``:
    items looked up that found none (or one shorter than ``min_prefix``); ``tokens_saved``: prefix tokens not
    recomputed; ``bytes`` and ``entries``: what is held now."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    tokens_saved: int = 0
    bytes: int = 0
    entries: int = 0

    def snapshot(self) -> KVCacheStats:
        return dataclasses.replace(self)


@dataclasses.dataclass(eq=False)
class Entry:
    ids: tuple[int, ...]
    kv: KV
    nbytes: int
    hashes: list[int]


@dataclasses.dataclass(frozen=True)
class Match:
    """``entry``'s first ``length`` tokens are the item's first ``length`` tokens."""

    entry: Entry
    length: int


def block_hashes(ids: Sequence[int], block: int, upto: int) -> list[int]:
    """Chained hashes of ``ids`` at every ``block`` boundary <= ``upto``: hashes[j] covers ids[:(j + 1) * block]."""
    out: list[int] = []
    h = 0
    for end in range(block, upto + 1, block):
        h = hash((h, tuple(ids[end - block:end])))
        out.append(h)
    return out


def prompt_len(item: EncodedItem) -> int | None:
    """Tokens before the response (the first token covering response text), or None for text with no response
    start (plain text: the whole string may be the response)."""
    if item.response_start <= 0:
        return None
    first = next((i for i, (s, e) in enumerate(item.offsets) if e > s and e > item.response_start), None)
    return len(item.input_ids) if first is None else first


class PrefixKVCache:
    """LRU of prompt KV keyed by token ids, at most ``max_bytes`` of tensors. Thread-safe (one lock)."""

    def __init__(self, max_bytes: int, block: int = DEFAULT_BLOCK, min_prefix: int = 16) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.max_bytes = max_bytes
        self.block = block
        self.min_prefix = max(min_prefix, 1)
        self.stats = KVCacheStats()
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recently used first
        self._index: dict[int, Entry] = {}  # block-boundary hash -> the entry most recently stored under it
        self._lock = threading.Lock()
        self._stores_since_reuse = 0
        self._rng = random.Random(0)  # seeded: the same traffic stores the same prompts

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self.stats.bytes = self.stats.entries = 0

    # -- lookup ----------------------------------------------------------------------------------------------------
    def lookup(self, ids: Sequence[int], limit: int) -> Match | None:
        """The longest stored prefix of ``ids`` of at most ``limit`` tokens (>= ``min_prefix``), or None. Counts
        nothing: the caller decides whether a match is worth using and records it (``count``)."""
        with self._lock:
            # An entry is indexed under every block boundary of its ids, so the boundaries present for an item form
            # a run from the first: walk it and stop at the first absent one (a K = 1 miss costs one or two hashes).
            found: list[tuple[int, Entry]] = []
            h, b = 0, self.block
            for end in range(b, limit + 1, b):
                h = hash((h, tuple(ids[end - b:end])))
                e = self._index.get(h)
                if e is None:
                    break
                found.append((end, e))
            for end, e in reversed(found):
                m = self._common(e.ids, ids, min(limit, len(e.ids)))
                if m >= self.min_prefix and m >= end:  # verified on the ids, not on the hash
                    if 2 * m >= len(e.ids):  # a short reuse (a system prompt) does not keep a long entry alive: the
                        self._entries.move_to_end(id(e))  # newest entry holding those tokens is indexed for them
                    return Match(e, m)
            return None

    def count(self, used: Match | None, reuse: bool = True) -> None:
        """Record one looked-up item: a hit (``used``: the match it runs against) or a miss. ``reuse`` false: a
        short hit (a shared system prompt) that does not show the stores are paying off (see Admission)."""
        with self._lock:
            if used is None:
                self.stats.misses += 1
                return
            self.stats.hits += 1
            self.stats.tokens_saved += used.length
            if reuse:
                self._stores_since_reuse = 0

    @staticmethod
    def _common(a: Sequence[int], b: Sequence[int], n: int) -> int:
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    # -- store -----------------------------------------------------------------------------------------------------
    def store_len(self, item: EncodedItem, reward_idx: int, match: Match | None) -> int:
        """How many leading tokens of ``item`` to store after its forward (0: none)."""
        m = match.length if match else 0
        p = prompt_len(item)
        if p is not None:  # chat: the prompt part, unless the cache already gave it
            n = min(p, reward_idx + 1)
            return n if n >= self.min_prefix and m < n else 0
        n = reward_idx + 1  # plain text: everything computed; mates reuse what they share
        return n if n >= self.min_prefix and m < n / 2 else 0

    def admit(self) -> bool:
        """Whether a candidate for storing should be stored (see Admission in the module docstring)."""
        # At random, not every ADMIT_SAMPLE-th: a counter aliases with the group size (K = 8 mates in a row, every
        # 16th candidate is always a group's last mate, whose store no mate reuses, so admission never recovered).
        return self._stores_since_reuse < ADMIT_WINDOW or self._rng.random() * ADMIT_SAMPLE < 1

    def put(self, ids: Sequence[int], kv: KV) -> bool:
        """Store ``kv`` (tensors for exactly ``len(ids)`` tokens, owned by the cache from now on). False when it
        is larger than the whole budget."""
        ids = tuple(ids)
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        if nbytes > self.max_bytes or len(ids) < self.min_prefix:
            return False
        hashes = block_hashes(ids, self.block, len(ids))
        with self._lock:
            while self._entries and self.stats.bytes + nbytes > self.max_bytes:
                self._evict(next(iter(self._entries.values())))
            e = Entry(ids, kv, nbytes, hashes)
            self._entries[id(e)] = e
            for h in hashes:
                self._index[h] = e
            self.stats.stores += 1
            self._stores_since_reuse += 1
            self.stats.bytes += nbytes
            self.stats.entries = len(self._entries)
            return True

    def _evict(self, e: Entry) -> None:
        del self._entries[id(e)]
        for h in e.hashes:
            if self._index.get(h) is e:
                del self._index[h]
        self.stats.evictions += 1
        self.stats.bytes -= e.nbytes
        self.stats.entries = len(self._entries)


# -- forwards against a stored prefix ----------------------------------------------------------------------------------

def kv_of(cache: Any, row: int, start: int, length: int) -> KV:
    """Compact copies of one row's KV over positions [start, start + length) of a model output's cache."""
    return [(layer.keys[row:row + 1, :, start:start + length].clone(),
             layer.values[row:row + 1, :, start:start + length].clone()) for layer in cache.layers]


def dynamic_cache(kv: KV, length: int, rows: int = 1) -> Any:
    """A fresh ``DynamicCache`` over the first ``length`` tokens of stored KV, shared by ``rows`` batch rows (the
    stored tensors are not changed: the forward concatenates into new ones)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=[(k[:, :, :length].expand(rows, -1, -1, -1),
                                         v[:, :, :length].expand(rows, -1, -1, -1)) for k, v in kv])


def _tail_forward(rm: RewardModel, kv: KV, m: int, tail: Sequence[int], all_layers: bool = False) -> Any:
    """One item's tokens after a stored prefix of ``m`` tokens: the model output (its cache covers m + len(tail))."""
    dev = rm.device
    ids = torch.tensor([list(tail)], dtype=torch.long, device=dev)
    pos = torch.arange(m, m + len(tail), device=dev)[None]
    mask = torch.ones((1, m + len(tail)), dtype=torch.long, device=dev)
    return rm.body(input_ids=ids, attention_mask=mask, position_ids=pos, **{CACHE_KW: dynamic_cache(kv, m)},
                   use_cache=True, output_hidden_states=all_layers)


def run_tail(rm: RewardModel, kv: KV, m: int, tail: Sequence[int]) -> tuple[torch.Tensor, Any]:
    """One item's tokens after a stored prefix of ``m`` tokens. Returns (hidden state of its last token (H,), the
    cache after the forward, covering m + len(tail) tokens)."""
    out = _tail_forward(rm, kv, m, tail)
    return out.last_hidden_state[0, -1], output_cache(out)


def run_tails_packed(rm: RewardModel, kv: KV, m: int, tails: Sequence[Sequence[int]]) -> torch.Tensor:
    """Several items' tokens after one stored prefix of ``m`` tokens, packed in one row (``prefix.packed_forward``
    on a fresh cache). Returns each one's last hidden state, (n, H)."""
    return packed_forward(rm, dynamic_cache(kv, m), m, tails)[0]


def run_tail_readout(rm: RewardModel, kv: KV, m: int, item: EncodedItem, reward_idx: int, want_ll: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """A read-out model's item after a stored prefix of ``m`` tokens (at most ``forward.readout_tail_start``): its
    other tokens run against the prefix, with every layer's states when the read-out needs them. Returns (what the
    head reads (1, H), the LL term (1,) or None, the cache after the forward, covering the whole item)."""
    out = _tail_forward(rm, kv, m, item.input_ids[m:], needs_all_layers(rm))
    idx = torch.tensor([reward_idx - m], device=rm.device)
    h, ll = readout(rm, [item], out, idx, "right", want_ll, starts=[-m])
    return h, ll, output_cache(out)


def run_tails_readout(rm: RewardModel, kv: KV, m: int, items: Sequence[EncodedItem], reward_idx: Sequence[int],
                      want_ll: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Several read-out items after one stored prefix of ``m`` tokens, in one right-padded forward whose rows all
    attend to the prefix's KV (the batched, GPU path; padding-free runs :func:`run_tail_readout` per item).
    Returns (what the head reads (B, H), the LL term (B,) or None)."""
    dev, b = rm.device, len(items)
    tails = [it.input_ids[m:] for it in items]
    width = max(len(t) for t in tails)
    ids = torch.full((b, width), rm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, m + width), dtype=torch.long)
    mask[:, :m] = 1
    for r, t in enumerate(tails):
        ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[r, m:m + len(t)] = 1
    pos = torch.arange(m, m + width)[None].expand(b, width)
    out = rm.body(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                  **{CACHE_KW: dynamic_cache(kv, m, rows=b)}, use_cache=True, output_hidden_states=needs_all_layers(rm))
    idx = torch.tensor([r - m for r in reward_idx], device=dev)
    return readout(rm, items, out, idx, "right", want_ll, starts=[-m] * b)
