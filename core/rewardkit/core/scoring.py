"""Batched reward computation: the :class:`Scorer` chooses the path for a batch once, and knows every path.

Paths (each ends in ``forward.scores_from_hidden``, so the reward rule, head and normalisation are the same):

- plain: one padded forward (``forward.plain_forward``);
- prefix-shared: items sharing a token prefix run it once (``rewardkit.core.prefix``), the rest on the plain path;
- padding-free (CPU): each prefix group as one shared forward, every other item alone, unpadded (a padded batch
  needs an explicit attention mask, which sends SDPA down its slow masked path: batch 4 measured ~25-35% slower per
  token than single items);
- ABC dense: the plain path with the attention rows captured (``rewardkit.core.abc``), never prefix-shared;
- prompt KV cache across batches (``rewardkit.core.prefix_cache``, ``prefix_cache_bytes`` > 0): items whose prefix
  is stored run only the rest; the others take the paths above and store their prompt's KV on the way;
- read-out (a checkpoint whose head reads the mean over the response, another layer, or adds the LM's
  log-likelihood: ``CheckpointMeta.plain_readout`` false): plain padded forwards (unpadded, one item each, when
  padding-free) through ``forward.readout``. No in-batch prefix sharing (it keeps only the reward token's state); with
  the KV cache, chat items whose prompt is stored run from the token before their response on
  (``score_readout_cached``), and padding-free mates in one batch reuse the first one's prompt through the cache.

The scorer is the contract between the server's scheduler and a model (TGI's ``Model``/``Batch`` split): it takes
already-encoded items and returns one :class:`ItemScore` each, in order. It owns no queue and no threads.

Example::

    scorer = Scorer(rm)
    scores = scorer.score_batch([fmt.encode(item)])
    scores[0].reward
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rewardkit.core.abc import score_with_rows
from rewardkit.core.formatting import EncodedItem
from rewardkit.core.forward import (
    ItemScore,
    normalise,
    pad_batch,
    plain_forward,
    readout_forward,
    readout_tail_start,
    reward_indices,
    reward_position,
    scores_from_hidden,
)
from rewardkit.core.loading import RewardModel
from rewardkit.core.prefix import PrefixSharer, find_prefix_groups
from rewardkit.core.prefix_cache import (
    DEFAULT_BLOCK,
    Match,
    PrefixKVCache,
    kv_of,
    run_tail,
    run_tail_readout,
    run_tails_packed,
    run_tails_readout,
)

Store = dict[int, int]  # id(item) -> leading tokens of it to store in the KV cache after its forward

__all__ = ["ItemScore", "Scorer", "pad_batch", "reference_score", "reward_indices"]


class Scorer:
    """Scores batches of encoded items with one reward model.

    ``padding_free``: score non-dense items unpadded (one forward per item or prefix group), the server's CPU choice.
    ``prefix_cache_bytes``: > 0 keeps prompts' KV across batches (LRU, at most that many bytes; needs
    ``prefix_sharing``); counters in ``.kv.stats``. ``want_ll``: every ItemScore also gets ``ll`` (the response's
    mean log-likelihood), through the read-out path (training's LL feature).
    """

    def __init__(self, rm: RewardModel, padding_side: str = "right", prefix_sharing: bool = True,
                 padding_free: bool = False, prefix_cache_bytes: int = 0, prefix_cache_block: int = DEFAULT_BLOCK,
                 want_ll: bool = False) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        self.rm = rm
        self.padding_side = padding_side
        self.padding_free = padding_free
        # -- prefix sharing (rewardkit.core.prefix): items sharing a token prefix run it once; counters in .prefix.stats
        self.prefix_sharing = prefix_sharing
        self.prefix = PrefixSharer()
        self.kv: PrefixKVCache | None = (PrefixKVCache(prefix_cache_bytes, prefix_cache_block, self.prefix.min_prefix)
                                         if prefix_sharing and prefix_cache_bytes > 0 else None)
        # also compute the response's mean log-likelihood (ItemScore.ll) when the read-out has no LL term (training)
        self.want_ll = want_ll

    @property
    def plain(self) -> bool:
        """The model reads the last layer at the reward token and nothing else: every fast path applies."""
        return self.rm.meta.plain_readout and not self.want_ll

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return normalise(self.rm, raw)  # type: ignore[no-any-return]

    # -- the one entry point of the server's model worker ----------------------------------------------------------
    @torch.inference_mode()
    def score(self, items: Sequence[EncodedItem], return_hidden: bool = False, dense: Sequence[bool] | None = None,
              abc_layers: Sequence[int] | None = None) -> list[ItemScore]:
        """Score a mixed batch in order: items flagged in ``dense`` with their ABC attention rows (``abc_layers``
        required then), the others on the padding-free or the batched path."""
        if not items:
            return []
        dense_i = [i for i, d in enumerate(dense or ()) if d]
        if not dense_i:
            return self._score_scalar(items, return_hidden)
        if abc_layers is None:
            raise ValueError("dense items need abc_layers")
        other_i = [i for i in range(len(items)) if i not in set(dense_i)]
        out: list[ItemScore | None] = [None] * len(items)
        if other_i:
            for i, s in zip(other_i, self._score_scalar([items[i] for i in other_i], return_hidden), strict=True):
                out[i] = s
        encs = [items[i] for i in dense_i]
        if self.padding_free:  # one unpadded forward per item keeps SDPA's causal kernel
            rows = [s for e in encs for s in score_with_rows(self.rm, [e], self.padding_side, return_hidden, abc_layers)]
        else:
            rows = score_with_rows(self.rm, encs, self.padding_side, return_hidden, abc_layers)
        for i, s in zip(dense_i, rows, strict=True):
            out[i] = s
        return [s for s in out if s is not None]

    def _score_scalar(self, items: Sequence[EncodedItem], return_hidden: bool) -> list[ItemScore]:
        cached = self.kv is not None and self.prefix.supported(self.rm)
        if not self.plain:
            return self.score_readout_cached(items, return_hidden) if cached else self.score_readout(items, return_hidden)
        if cached:
            return self.score_cached(items, return_hidden)
        return self.score_unpadded(items, return_hidden) if self.padding_free else self.score_batch(items, return_hidden)

    @torch.inference_mode()
    def score_cached(self, items: Sequence[EncodedItem], return_hidden: bool = False) -> list[ItemScore]:
        """The KV-cache path: items with a stored prefix run only their rest (mates of one entry packed in one
        forward); the others take the usual paths and store their prompt's KV. Results in the order of ``items``."""
        assert self.kv is not None
        rm, kv = self.rm, self.kv
        ridx = [reward_position(it.input_ids, rm.pad_token_id, rm.meta.reward_token_rule) for it in items]
        matches = [kv.lookup(it.input_ids, r) for it, r in zip(items, ridx, strict=True)]
        store = {id(it): n for it, r, mt in zip(items, ridx, matches, strict=True)
                 if (n := kv.store_len(it, r, mt)) and kv.admit()}
        out: list[ItemScore | None] = [None] * len(items)
        by_entry: dict[tuple[int, int], list[int]] = {}
        for i, mt in enumerate(matches):
            # A short reuse (a shared system prompt) is not used: the item stays in the batch, where its mates can
            # share their whole prompt (in-batch groups), and it stores its prompt. Measured on SmolLM2 over HTTP,
            # K = 8: running every system-prompt hit on its own cut throughput to 0.34x of the cache-off server.
            if mt is not None and mt.length < self.prefix.min_fraction * len(items[i].input_ids):
                mt = matches[i] = None
            kv.count(mt)
            if mt is None:
                continue
            if id(items[i]) in store:  # it also stores (a longer prompt than the match): alone, keep its KV
                n = store.pop(id(items[i]))
                h, cache = run_tail(rm, mt.entry.kv, mt.length, items[i].input_ids[mt.length:ridx[i] + 1])
                kv.put(items[i].input_ids[:n], kv_of(cache, 0, 0, n))
                out[i] = scores_from_hidden(rm, [items[i]], h[None], return_hidden)[0]
            else:
                by_entry.setdefault((id(mt.entry), mt.length), []).append(i)
        for idx in by_entry.values():
            self._score_hits(items, idx, matches[idx[0]], ridx, return_hidden, out)
        rest = [i for i, s in enumerate(out) if s is None]
        if rest:
            part = [items[i] for i in rest]
            done = self.score_unpadded(part, return_hidden, store) if self.padding_free else self.score_batch(
                part, return_hidden, store=store)
            for i, s in zip(rest, done, strict=True):
                out[i] = s
        return [s for s in out if s is not None]

    def _score_hits(self, items: Sequence[EncodedItem], idx: list[int], mt: Match | None, ridx: list[int],
                    return_hidden: bool, out: list[ItemScore | None]) -> None:
        """Items ``idx`` that share one stored prefix (``mt``: same entry, same length): only their rest runs."""
        assert mt is not None
        tails = [items[i].input_ids[mt.length:ridx[i] + 1] for i in idx]
        h = (run_tails_packed(self.rm, mt.entry.kv, mt.length, tails) if len(idx) > 1
             else run_tail(self.rm, mt.entry.kv, mt.length, tails[0])[0][None])
        for i, s in zip(idx, scores_from_hidden(self.rm, [items[i] for i in idx], h, return_hidden), strict=True):
            out[i] = s

    def _store_prefix(self, ids: Sequence[int], cache: object) -> None:
        assert self.kv is not None
        self.kv.put(ids, kv_of(cache, 0, 0, len(ids)))

    def _keeper(self, items: Sequence[EncodedItem], store: Store | None) -> Callable[[Any, int], None] | None:
        """The ``on_cache`` of a padded forward over ``items`` that stores the prompts ``store`` names (None: none)."""
        rows = [(r, store[id(it)]) for r, it in enumerate(items) if store and id(it) in store]
        kv = self.kv
        if not rows or kv is None:
            return None

        def keep(cache: Any, width: int) -> None:
            for r, n in rows:  # left padding: a row's tokens end at the right edge (positions count real tokens)
                start = width - len(items[r].input_ids) if self.padding_side == "left" else 0
                kv.put(items[r].input_ids[:n], kv_of(cache, r, start, n))

        return keep

    def _plain(self, items: Sequence[EncodedItem], store: Store | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward.plain_forward``; with ``store`` naming some of ``items``, the same forward keeps its cache and
        their prompts' KV go into the KV cache."""
        return plain_forward(self.rm, items, self.padding_side, on_cache=self._keeper(items, store))

    @torch.inference_mode()
    def score_readout_cached(self, items: Sequence[EncodedItem], return_hidden: bool = False) -> list[ItemScore]:
        """The KV-cache path of a read-out model (pooled states, LL term). A chat item whose prompt is stored runs
        only the tokens from ``forward.readout_tail_start`` on; an item that found none stores its prompt.
        Padding-free, items run one after another and each looks up the cache first, so a group's mates in one batch
        reuse the first one's prompt; batched, the hits on one entry run in one forward and the rest in one padded
        forward. Plain text (no response start) has nothing to reuse: it is not looked up."""
        assert self.kv is not None
        rm, kv = self.rm, self.kv
        out: list[ItemScore | None] = [None] * len(items)
        rest: list[int] = []
        store: Store = {}
        pending: set[tuple[int, ...]] = set()
        hits: dict[tuple[int, int], tuple[Match, list[tuple[int, int]]]] = {}  # (entry, length) -> match, (i, r)
        for i, it in enumerate(items):
            r = reward_position(it.input_ids, rm.pad_token_id, rm.meta.reward_token_rule)
            lim = readout_tail_start(rm, it, r, self.want_ll)
            if lim < kv.min_prefix:
                rest.append(i)
                continue
            mt = kv.lookup(it.input_ids, lim)
            short = mt is not None and mt.length < self.prefix.min_fraction * len(it.input_ids)
            if short and not self.padding_free:
                mt = None  # a short reuse is not worth leaving the padded batch (see score_cached)
            kv.count(mt, reuse=not short)  # a shared system prompt alone does not keep every store admitted (K = 1)
            n = kv.store_len(it, r, None)
            keep = n > 0 and (mt is None or mt.length < min(n, lim)) and kv.admit()
            if mt is None and not self.padding_free:  # into the padded forward; one mate per prompt stores it
                if keep and (prompt := tuple(it.input_ids[:n])) not in pending:
                    store[id(it)] = n
                    pending.add(prompt)
                rest.append(i)
                continue
            if mt is not None and not keep and not self.padding_free:  # batched: mates of one entry in one forward
                hits.setdefault((id(mt.entry), mt.length), (mt, []))[1].append((i, r))
                continue
            if mt is None:  # padding-free: the item alone, storing its prompt on the way
                h, ll = readout_forward(rm, [it], self.padding_side, self.want_ll,
                                        on_cache=self._keeper([it], {id(it): n} if keep else None))
            else:
                h, ll, cache = run_tail_readout(rm, mt.entry.kv, mt.length, it, r, self.want_ll)
                if keep:
                    kv.put(it.input_ids[:n], kv_of(cache, 0, 0, n))
            out[i] = scores_from_hidden(rm, [it], h, return_hidden, ll=ll)[0]
        for mt, group in hits.values():
            part = [items[i] for i, _ in group]
            h, ll = run_tails_readout(rm, mt.entry.kv, mt.length, part, [r for _, r in group], self.want_ll)
            for (i, _), s in zip(group, scores_from_hidden(rm, part, h, return_hidden, ll=ll), strict=True):
                out[i] = s
        if rest:
            part = [items[i] for i in rest]
            if self.padding_free:
                done = self.score_readout(part, return_hidden)
            else:
                h, ll = readout_forward(rm, part, self.padding_side, self.want_ll, on_cache=self._keeper(part, store))
                done = scores_from_hidden(rm, part, h, return_hidden, ll=ll)
            for i, s in zip(rest, done, strict=True):
                out[i] = s
        return [s for s in out if s is not None]

    # -- the paths -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_batch(self, items: Sequence[EncodedItem], return_hidden: bool = False,
                    abc_layers: Sequence[int] | None = None, store: Store | None = None) -> list[ItemScore]:
        """Score items in order, batched. ``abc_layers``: also capture the attention rows ABC needs (plain path).
        ``store``: items whose prompt KV goes into the KV cache on the way (``score_cached`` sets it)."""
        if not items:
            return []
        if abc_layers is not None:
            return score_with_rows(self.rm, items, self.padding_side, return_hidden, abc_layers)
        if not self.plain:
            return self.score_readout(items, return_hidden, batched=True)
        if self.prefix_sharing:
            shared = self.score_shared(items, return_hidden, store)
            if shared is not None:
                return shared
        hidden, idx = self._plain(items, store)
        h_r = hidden[torch.arange(len(items), device=hidden.device), idx]  # (B, H)
        return scores_from_hidden(self.rm, items, h_r, return_hidden)

    def score_shared(self, items: Sequence[EncodedItem], return_hidden: bool = False,
                     store: Store | None = None) -> list[ItemScore] | None:
        """Prefix reuse; None when nothing in the batch is worth sharing (the caller runs the plain path). Items in no
        group go back through ``score_batch`` (which may find smaller groups among them)."""
        sharer = self.prefix
        if len(items) < 2:
            return None
        groups = find_prefix_groups([it.input_ids for it in items], sharer.min_prefix, min_fraction=sharer.min_fraction)
        if not groups:
            return None
        if not sharer.supported(self.rm):
            sharer.stats.fallbacks += 1
            return None
        out: list[ItemScore | None] = [None] * len(items)
        sharer.stats.batches += 1
        for g in groups:
            members = [items[i] for i in g.indices]
            on_prefix = (functools.partial(self._store_prefix, members[0].input_ids[:g.prefix_len])
                         if self.kv is not None and store and any(id(m) in store for m in members) else None)
            h = sharer.group_hidden(self.rm, items, g, on_prefix)
            for i, s in zip(g.indices, scores_from_hidden(self.rm, members, h, return_hidden), strict=True):
                out[i] = s
            sharer.stats.groups += 1
            sharer.stats.items_shared += len(g.indices)
            sharer.stats.prefix_tokens_saved += g.saved_tokens
            sharer.stats.tokens_total += sum(len(m.input_ids) for m in members)
        rest = [i for i, s in enumerate(out) if s is None]
        if rest:
            for i, s in zip(rest, self.score_batch([items[i] for i in rest], return_hidden=return_hidden, store=store),
                            strict=True):
                out[i] = s
        return [s for s in out if s is not None]

    @torch.inference_mode()
    def score_unpadded(self, items: Sequence[EncodedItem], return_hidden: bool = False,
                       store: Store | None = None) -> list[ItemScore]:
        """Padding-free scoring: each prefix group as one ``score_batch`` call (shared prefix), every other item
        alone (an unpadded forward keeps SDPA's causal kernel). Results in the order of ``items``."""
        groups = find_prefix_groups([it.input_ids for it in items], self.prefix.min_prefix,
                                    min_fraction=self.prefix.min_fraction) if self.prefix_sharing and len(items) > 1 else []
        if groups and not self.prefix.supported(self.rm):
            groups = []
        parts = [list(g.indices) for g in groups]
        grouped = {i for g in groups for i in g.indices}
        parts += [[i] for i in range(len(items)) if i not in grouped]
        out: list[ItemScore | None] = [None] * len(items)
        for part in parts:
            for i, s in zip(part, self.score_batch([items[i] for i in part], return_hidden=return_hidden, store=store),
                            strict=True):
                out[i] = s
        return [s for s in out if s is not None]

    @torch.inference_mode()
    def score_readout(self, items: Sequence[EncodedItem], return_hidden: bool = False, batched: bool = False
                      ) -> list[ItemScore]:
        """The read-out path (see the module docstring): one padded forward, or one unpadded forward per item when
        padding-free (and not ``batched``)."""
        parts = [[it] for it in items] if self.padding_free and not batched else [list(items)]
        out: list[ItemScore] = []
        for part in parts:
            h, ll = readout_forward(self.rm, part, self.padding_side, self.want_ll)
            out += scores_from_hidden(self.rm, part, h, return_hidden, ll=ll)
        return out


@torch.inference_mode()
def reference_score(rm: RewardModel, item: EncodedItem) -> float:
    """The plain single-item forward of the HF model (no padding, no batching): what parity is measured against.

    For a read-out other than the plain one, the same single unpadded forward through ``forward.readout``."""
    if not rm.meta.plain_readout:
        h, ll = readout_forward(rm, [item], "right")
        return scores_from_hidden(rm, [item], h, False, ll=ll)[0].reward
    ids = torch.tensor([item.input_ids], dtype=torch.long, device=rm.device)
    logits = rm.model(input_ids=ids).logits  # (1, 1)
    return float(normalise(rm, float(logits[0, 0].float())))
