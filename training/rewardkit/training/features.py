"""Preference pairs -> the server's inputs -> encoded items, and reward-token features for frozen-backbone training.

Train/serve parity starts here: a pair becomes two :class:`~rewardkit.core.formatting.ScoreItem` exactly as a
client would send them (``{prompt, response}`` for plain strings, ``{messages}`` for conversations), and is encoded
by the same :class:`~rewardkit.core.formatting.Formatter` the server uses. The hidden states come from the server's
own :class:`~rewardkit.core.scoring.Scorer` (``return_hidden=True``), so a head trained on them scores served text
exactly as it scored training text.

Example::

    enc, report = encode_pairs(pairs, Formatter(rm.tokenizer, max_length=1024))
    h_c, h_r = extract_features(rm, enc)           # (N, H) each, fp32 CPU
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from rewardkit.core.checkpoint import atomic_save_safetensors
from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem
from rewardkit.core.loading import RewardModel
from rewardkit.core.scoring import Scorer
from rewardkit.training.data import LoadReport, PreferencePair, drop_too_long

log = logging.getLogger(__name__)

__all__ = ["EncodedPair", "encode_pairs", "extract_features", "pair_batches", "to_score_item"]


def to_score_item(prompt: str | list[dict[str, str]], response: str | list[dict[str, str]]) -> ScoreItem:
    """What a client would send for this (prompt, response): ``{prompt, response}``, ``{messages}`` or ``{text}``."""
    if isinstance(response, list):
        msgs = list(prompt) + list(response) if isinstance(prompt, list) else list(response)
        return ScoreItem(messages=[{"role": m["role"], "content": m["content"]} for m in msgs])
    if isinstance(prompt, list):
        raise ValueError("prompt is a message list but the response is a string; give both as the same kind")
    if prompt == "":
        return ScoreItem(text=response)  # implicit-prompt texts are already whole
    return ScoreItem(prompt=prompt, response=response)


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A pair after formatting: its source pair, the two encoded texts, and its position in the loaded list."""

    pair: PreferencePair
    chosen: EncodedItem
    rejected: EncodedItem
    index: int

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens


def encode_pairs(pairs: Sequence[PreferencePair], fmt: Formatter, *, max_drop_fraction: float = 0.5
                 ) -> tuple[list[EncodedPair], LoadReport]:
    """Encode both sides of each pair; drop (and count) pairs whose longer side exceeds ``fmt.max_length``."""
    encoded: dict[int, EncodedPair] = {}
    lengths: dict[int, int] = {}
    for i, p in enumerate(pairs):
        c = fmt.encode(to_score_item(p.prompt, p.chosen), index=i, truncate=True)
        r = fmt.encode(to_score_item(p.prompt, p.rejected), index=i, truncate=True)
        encoded[id(p)] = EncodedPair(pair=p, chosen=c, rejected=r, index=i)
        lengths[id(p)] = max(c.original_length, r.original_length)
    kept, report = drop_too_long(pairs, lambda p: lengths[id(p)], fmt.max_length, max_drop_fraction=max_drop_fraction)
    return [encoded[id(p)] for p in kept], report


def pair_batches(pairs: Sequence[EncodedPair], max_tokens: int, max_pairs: int = 256) -> list[list[int]]:
    """Group pair indices, sorted by length, so that 2 * pairs * longest text <= ``max_tokens`` (at least one pair).

    Both sides of a pair stay in one batch: they share the prompt, which the scorer's prefix sharing runs once.
    """
    order = sorted(range(len(pairs)), key=lambda i: max(pairs[i].chosen.num_tokens, pairs[i].rejected.num_tokens))
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, pairs[i].chosen.num_tokens, pairs[i].rejected.num_tokens)
        if cur and (2 * (len(cur) + 1) * w > max_tokens or len(cur) >= max_pairs):
            batches.append(cur)
            cur, w = [], max(pairs[i].chosen.num_tokens, pairs[i].rejected.num_tokens)
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def _body_fingerprint(rm: RewardModel) -> list[float]:
    """Per-parameter sums of the body: features depend on the body's weights (an adapter merged in), not the head."""
    with torch.no_grad():
        return [round(float(p.detach().double().sum()), 6) for p in rm.body.parameters()]


def _cache_key(rm: RewardModel, pairs: Sequence[EncodedPair], with_ll: bool = False) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([rm.meta.backbone, rm.meta.reward_token_rule, str(rm.dtype), _body_fingerprint(rm)]).encode())
    if not rm.meta.plain_readout or with_ll:  # plain keys stay as they were, so existing caches still hit
        h.update(json.dumps([rm.meta.readout, rm.meta.readout_layer, with_ll]).encode())
    for ep in pairs:
        h.update(json.dumps([ep.chosen.input_ids, ep.rejected.input_ids]).encode())
    return h.hexdigest()[:20]


def extract_features(rm: RewardModel, pairs: Sequence[EncodedPair], *, max_tokens: int = 4096,
                     cache_dir: str | Path | None = None, progress: bool = True, with_ll: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head reads for both sides: ``(N, H)``, ``(N, H)`` fp32 on CPU (the last layer at the reward token,
    or the model's read-out, ``rewardkit.core.forward.readout``). ``with_ll``: one more column, the backbone's mean
    log-likelihood of the response, ``(N, H + 1)``.

    With ``cache_dir``, features are stored as safetensors under a key of the model and the exact token ids, and
    reused on the next call with the same inputs.
    """
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"features-{_cache_key(rm, pairs, with_ll)}.safetensors"
        if cache_path.is_file():
            from safetensors.torch import load_file

            t = load_file(str(cache_path))
            log.info("feature_cache hit=%s pairs=%d", cache_path, len(pairs))
            return t["chosen"], t["rejected"]
    from tqdm.auto import tqdm

    # Prefix sharing off: on this data (short shared prompts, whole-batch system message) it measured slower on CPU.
    scorer = Scorer(rm, prefix_sharing=False, want_ll=with_ll)
    width = rm.hidden_size + int(with_ll)
    h_c = torch.zeros(len(pairs), width)
    h_r = torch.zeros(len(pairs), width)
    total = sum(p.num_tokens for p in pairs)
    with tqdm(total=total, unit="tok", desc="features", disable=not progress, dynamic_ncols=True) as bar:
        for batch in pair_batches(pairs, max_tokens):
            items = [pairs[i].chosen for i in batch] + [pairs[i].rejected for i in batch]
            scores = scorer.score_batch(items, return_hidden=True)
            for j, i in enumerate(batch):
                sc, sr = scores[j], scores[len(batch) + j]
                assert sc.hidden is not None and sr.hidden is not None
                h_c[i, :rm.hidden_size], h_r[i, :rm.hidden_size] = sc.hidden, sr.hidden
                if with_ll:
                    assert sc.ll is not None and sr.ll is not None
                    h_c[i, -1], h_r[i, -1] = sc.ll, sr.ll
            bar.update(sum(pairs[i].num_tokens for i in batch))
    if cache_path is not None:
        atomic_save_safetensors({"chosen": h_c, "rejected": h_r}, cache_path)
        log.info("feature_cache wrote=%s pairs=%d", cache_path, len(pairs))
    return h_c, h_r
