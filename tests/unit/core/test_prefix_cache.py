"""The prompt KV cache across batches: exact rewards (chat and plain text, left/right padding, padding-free, GPT-2
and Llama), reuse across batches, LRU eviction under a byte budget, head swaps, and dense items left alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rewardkit.core import abc
from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem
from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.core.prefix_cache import PrefixKVCache, block_hashes, prompt_len
from rewardkit.core.scoring import Scorer, reference_score

ATOL, RTOL = 1e-5, 1e-4

PROMPTS = ["The quick brown fox jumps over the lazy dog. What is the capital of France? Paris, Berlin, Madrid, "
           "Rome, Lisbon, Vienna and Warsaw are European capitals. Please answer in exactly three words.",
           "Convert 3 kilometres to metres, then 7 metres to centimetres, and say which is larger. " * 2]
COMPLETIONS = ["Paris.", "The capital of France is Paris, I hope this helps! Great question.",
               "Twelve plus thirty is forty-two. 12 + 30 = 42. 7 * 8 = 56. " * 2, "x", ""]


def chat_items(rm: RewardModel) -> list[EncodedItem]:
    fmt = Formatter(rm.tokenizer, max_length=512)
    return [fmt.encode(ScoreItem(prompt=p, response=c)) for p in PROMPTS for c in COMPLETIONS]


def text_items(rm: RewardModel) -> list[EncodedItem]:
    """Plain text, prompt and response in one string (OpenRLHF's ``query``): no response start."""
    fmt = Formatter(rm.tokenizer, max_length=512)
    return [fmt.encode(ScoreItem(text=f"Question: {p}\nAnswer: {c}")) for p in PROMPTS for c in COMPLETIONS]


def one_per_batch(scorer: Scorer, items: list[EncodedItem]) -> list[float]:
    """Every item in its own batch, as single-item requests arriving one after another."""
    return [scorer.score([it])[0].reward for it in items]


def cached_one_per_batch(rm: RewardModel, items: list[EncodedItem], layout: str) -> tuple[Scorer, list[float]]:
    """Shuffle ``items`` (in place), score them one per batch with a KV-cache scorer in ``layout`` and check every
    reward against the plain single forward. Returns the scorer and the references, in the shuffled order."""
    random.Random(3).shuffle(items)
    ref = [reference_score(rm, e) for e in items]
    scorer = Scorer(rm, padding_side="right" if layout == "padding_free" else layout,
                    padding_free=layout == "padding_free", prefix_cache_bytes=64 << 20)
    got = one_per_batch(scorer, items)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    return scorer, ref


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", ["left", "right", "padding_free"])
def test_cached_rewards_equal_full_forwards(kind: str, arch: str, layout: str, tiny_llama_dir: Path,
                                            tiny_gpt2_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir)
    items = chat_items(rm) if kind == "chat" else text_items(rm)
    scorer, ref = cached_one_per_batch(rm, items, layout)
    assert scorer.kv is not None
    st = scorer.kv.stats
    # two prompts: the first item of each stores it; its mates (other batches) reuse it
    assert st.hits >= len(items) - 2 - (2 if kind == "text" else 0), st
    assert st.stores >= 2 and st.tokens_saved > 0 and st.entries == st.stores
    # mixed batches with hits and misses (and in-batch groups) still match
    got2 = [s.reward for b in (items[:4], items[4:]) for s in scorer.score(b)]
    torch.testing.assert_close(torch.tensor(got2), torch.tensor(ref), atol=ATOL, rtol=RTOL)


def test_a_group_stores_once_and_mates_hit(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    items = chat_items(rm)[:5]  # one prompt, K = 5
    scorer = Scorer(rm, padding_free=True, prefix_cache_bytes=64 << 20)
    assert scorer.kv is not None
    one_per_batch(scorer, items)
    st = scorer.kv.stats
    assert (st.stores, st.hits, st.misses) == (1, 4, 1)
    p = prompt_len(items[0])
    assert p is not None and st.tokens_saved == 4 * p  # every mate skipped the whole prompt
    entry = next(iter(scorer.kv._entries.values()))
    assert entry.ids == items[0].input_ids[:p]  # the prompt part only, not the completion


def test_eviction_is_lru_and_bytes_stay_under_the_budget(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=512)
    prompts = [f"Prompt number {i}: " + "describe the weather in detail please. " * 4 for i in range(6)]
    first = [fmt.encode(ScoreItem(prompt=p, response="ok")) for p in prompts]
    probe = Scorer(rm, padding_free=True, prefix_cache_bytes=1 << 30)
    one_per_batch(probe, first[:1])
    assert probe.kv is not None
    one_entry = probe.kv.stats.bytes
    scorer = Scorer(rm, padding_free=True, prefix_cache_bytes=int(2.5 * one_entry))  # room for two
    assert scorer.kv is not None
    one_per_batch(scorer, first[:2])
    one_per_batch(scorer, first[:1])  # touch prompt 0: prompt 1 is now the least recently used
    one_per_batch(scorer, first[2:3])  # a third prompt evicts prompt 1
    st = scorer.kv.stats
    assert st.evictions == 1 and st.entries == 2 and st.bytes <= scorer.kv.max_bytes
    mate = lambda i: fmt.encode(ScoreItem(prompt=prompts[i], response="a different answer"))  # noqa: E731
    p0, p1 = prompt_len(mate(0)), prompt_len(mate(1))
    assert p0 is not None and p1 is not None
    saved = st.tokens_saved
    one_per_batch(scorer, [mate(0)])
    assert scorer.kv.stats.tokens_saved == saved + p0  # kept: the whole prompt reused
    saved = scorer.kv.stats.tokens_saved
    one_per_batch(scorer, [mate(1)])
    assert scorer.kv.stats.tokens_saved - saved < p1 // 2  # evicted: at most the shared system prompt reused
    for i in range(6):  # many prompts: the budget holds
        one_per_batch(scorer, [first[i]])
        assert scorer.kv.stats.bytes <= scorer.kv.max_bytes
    tiny = Scorer(rm, padding_free=True, prefix_cache_bytes=one_entry // 2)  # smaller than one entry: never stored
    got = one_per_batch(tiny, first[:2])
    assert tiny.kv is not None and tiny.kv.stats.entries == 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor([reference_score(rm, e) for e in first[:2]]),
                               atol=ATOL, rtol=RTOL)


def test_head_swap_needs_no_invalidation(tiny_llama_dir: Path) -> None:
    """The cache holds keys and values of the body, never rewards: after the head changes, hits give the new head's
    rewards."""
    rm = load_reward_model(tiny_llama_dir)
    items = chat_items(rm)[:5]
    scorer = Scorer(rm, padding_free=True, prefix_cache_bytes=64 << 20)
    one_per_batch(scorer, items[:1])
    with torch.no_grad():
        rm.head.weight.mul_(-2.0)
    got = one_per_batch(scorer, items[1:])
    assert scorer.kv is not None and scorer.kv.stats.hits == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor([reference_score(rm, e) for e in items[1:]]),
                               atol=ATOL, rtol=RTOL)


def test_dense_items_take_the_plain_path(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    items = chat_items(rm)[:3]
    scorer = Scorer(rm, padding_free=True, prefix_cache_bytes=64 << 20)
    out = scorer.score(items, dense=[True] * 3, abc_layers=abc.resolve_layers(rm, abc.AbcOptions()))
    assert all(s.attention is not None for s in out)
    assert scorer.kv is not None and scorer.kv.stats.hits + scorer.kv.stats.misses == 0  # not looked up


def test_collisions_are_checked_on_ids() -> None:
    cache = PrefixKVCache(1 << 20, block=4, min_prefix=4)
    kv = [(torch.zeros(1, 1, 8, 2), torch.zeros(1, 1, 8, 2))]
    assert cache.put(list(range(8)), kv)
    bad = list(range(8))
    cache._index[block_hashes([9, 9, 9, 9], 4, 4)[0]] = next(iter(cache._entries.values()))  # forge a collision
    assert cache.lookup([9, 9, 9, 9, 1], 5) is None
    assert cache.stats.hits == cache.stats.misses == 0  # lookups count nothing; the scorer records what it uses
    m = cache.lookup(bad[:6] + [42, 43], 8)
    assert m is not None and m.length == 6  # extended past the block boundary (4) to the common prefix
    assert cache.lookup(bad, 3) is None  # limit below min_prefix
    with pytest.raises(ValueError):
        PrefixKVCache(0)


def test_admission_is_sampled_when_stores_bring_no_reuse() -> None:
    from rewardkit.core.prefix_cache import ADMIT_SAMPLE, ADMIT_WINDOW

    cache = PrefixKVCache(1 << 30, block=4, min_prefix=4)
    kv = [(torch.zeros(1, 1, 8, 2), torch.zeros(1, 1, 8, 2))]
    for i in range(ADMIT_WINDOW):  # K = 1 traffic: every store is a new prompt
        assert cache.admit()
        cache.put([1000 + i] * 8, kv)
    admitted = sum(cache.admit() for _ in range(100 * ADMIT_SAMPLE))
    assert 70 <= admitted <= 130  # about 1 in ADMIT_SAMPLE (binomial sd ~10)
    m = cache.lookup([1000] * 8 + [1], 9)
    assert m is not None
    cache.count(m)  # a reuse: every candidate is admitted again
    assert all(cache.admit() for _ in range(5))


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardkit.core.testing import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tied"), arch="llama", layers=3, tie_embeddings=True)


def _readout_model(base: Path, out: Path, readout: str, layer: int, ll_weight: float) -> RewardModel:
    from rewardkit.core.testing import make_readout_checkpoint

    return load_reward_model(make_readout_checkpoint(base, out, readout, layer, ll_weight))


@pytest.mark.parametrize("readout", [("mean_response", 2, 0.7), ("mean_response", -1, 0.0), ("token", -1, 0.5)],
                         ids=["pooled_ll", "pooled_last", "token_ll"])
@pytest.mark.parametrize("layout", ["left", "right", "padding_free"])
def test_readout_models_reuse_the_cache_exactly(readout: tuple[str, int, float], layout: str, tied_llama_dir: Path,
                                                tmp_path: Path) -> None:
    """Read-outs other than the reward token (the default model's pooled states + LL) reuse stored prompts: mates
    run only from the token before their response, and every reward equals the plain single forward."""
    rm = _readout_model(tied_llama_dir, tmp_path / "m", *readout)
    assert not rm.meta.plain_readout
    items = chat_items(rm)
    scorer, ref = cached_one_per_batch(rm, items, layout)
    assert scorer.kv is not None
    st = scorer.kv.stats
    empty = sum(not e.response_token_indices() for e in items)  # "" has no response token: read at its last token
    assert empty == 2
    assert (st.stores, st.hits, st.misses) == (2, len(items) - 2 - empty, 2), st  # two prompts: one store each
    assert st.tokens_saved > 0
    hits = st.hits
    # whole groups in one batch: padding-free, the first mate stores and the others already reuse it
    fresh = Scorer(rm, padding_side=scorer.padding_side, padding_free=scorer.padding_free,
                   prefix_cache_bytes=64 << 20)
    got2 = [s.reward for b in (items[:6], items[6:]) for s in fresh.score(b)]
    torch.testing.assert_close(torch.tensor(got2), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    assert fresh.kv is not None and fresh.kv.stats.stores == 2
    if layout == "padding_free":
        assert fresh.kv.stats.hits == len(items) - 2 - empty
    # a head swap: hits give the new head's rewards
    with torch.no_grad():
        rm.head.weight.mul_(-2.0)
    got3 = one_per_batch(scorer, items)
    torch.testing.assert_close(torch.tensor(got3), torch.tensor([reference_score(rm, e) for e in items]),
                               atol=ATOL, rtol=RTOL)
    assert scorer.kv.stats.hits == hits + len(items) - empty


def test_readout_models_leave_plain_text_and_dense_items_alone(tied_llama_dir: Path, tmp_path: Path) -> None:
    """Plain text has no response start, so a pooled read-out covers every token: nothing to reuse, no lookup."""
    rm = _readout_model(tied_llama_dir, tmp_path / "m", "mean_response", 2, 0.7)
    items = text_items(rm)
    scorer = Scorer(rm, padding_free=True, prefix_cache_bytes=64 << 20)
    got = one_per_batch(scorer, items)
    torch.testing.assert_close(torch.tensor(got), torch.tensor([reference_score(rm, e) for e in items]),
                               atol=ATOL, rtol=RTOL)
    assert scorer.kv is not None and scorer.kv.stats.hits + scorer.kv.stats.misses + scorer.kv.stats.stores == 0
    out = scorer.score(chat_items(rm)[:2], dense=[True, True], abc_layers=[2])
    assert all(s.attention is not None for s in out) and scorer.kv.stats.stores == 0


def test_a_shared_system_prompt_alone_does_not_keep_every_store_admitted(tied_llama_dir: Path,
                                                                        tmp_path: Path) -> None:
    """K = 1 traffic under one long system prompt: every item reuses the system prompt (a short hit) and would store
    its own prompt; short hits do not count as the stores paying off, so admission thins stores out."""
    from rewardkit.core.prefix_cache import ADMIT_SAMPLE, ADMIT_WINDOW

    rm = _readout_model(tied_llama_dir, tmp_path / "m", "mean_response", 2, 0.7)
    fmt = Formatter(rm.tokenizer, max_length=512)
    system = "You are a careful assistant. "
    n = ADMIT_WINDOW + 2 * ADMIT_SAMPLE
    items = [fmt.encode(ScoreItem(messages=[{"role": "system", "content": system},
                                            {"role": "user", "content": f"Question {i}: " + "tell me more. " * 40},
                                            {"role": "assistant", "content": f"Answer {i}."}])) for i in range(n)]
    scorer = Scorer(rm, padding_free=True, prefix_cache_bytes=256 << 20)
    got = one_per_batch(scorer, items)
    torch.testing.assert_close(torch.tensor(got), torch.tensor([reference_score(rm, e) for e in items]),
                               atol=ATOL, rtol=RTOL)
    st = scorer.kv.stats  # type: ignore[union-attr]
    assert st.hits == n - 1  # every later item reused the system prompt ...
    assert ADMIT_WINDOW <= st.stores <= ADMIT_WINDOW + 3, st  # ... but after the window only 1 in ADMIT_SAMPLE stored


def test_admission_recovers_when_grpo_groups_follow_k1_traffic(tied_llama_dir: Path, tmp_path: Path) -> None:
    """After a K = 1 stretch thins admission, GRPO groups of 8 mates in a row must bring full admission back: a
    sampled store of a group's first mates is reused by the rest. (A counter picking every 16th candidate always
    picked a group's last mate, and the cache stayed cold: measured 1.08x cache off instead of 2.06x over HTTP.)"""
    from rewardkit.core.prefix_cache import ADMIT_WINDOW

    rm = _readout_model(tied_llama_dir, tmp_path / "m", "mean_response", 2, 0.7)
    fmt = Formatter(rm.tokenizer, max_length=512)
    enc = lambda p, r: fmt.encode(ScoreItem(prompt=p, response=r))  # noqa: E731
    scorer = Scorer(rm, padding_free=True, prefix_cache_bytes=256 << 20)
    one_per_batch(scorer, [enc(f"Alone {i}: " + "say something useful. " * 6, "ok") for i in range(ADMIT_WINDOW)])
    kv = scorer.kv
    assert kv is not None and kv._stores_since_reuse >= ADMIT_WINDOW  # thinned
    groups = [[enc(f"Group {g}: " + "explain the evidence. " * 6, f"answer {k}") for k in range(8)] for g in range(12)]
    before = kv.stats.snapshot()
    one_per_batch(scorer, [it for g in groups for it in g])
    assert kv._stores_since_reuse < ADMIT_WINDOW  # a reuse happened: every candidate is admitted again
    assert kv.stats.hits - before.hits >= 7 * 6, kv.stats  # and at least half the groups' mates reused their prompt


@pytest.mark.parametrize("layout", ["left", "padding_free"])
def test_a_pooled_gpt2_reuses_the_cache_exactly(layout: str, tmp_path: Path) -> None:
    """GPT-2 (absolute positions, its own cache layout) on the read-out path: hits alone and batched mates."""
    from rewardkit.core.testing import make_tiny_reward_model

    rm = _readout_model(make_tiny_reward_model(tmp_path / "g", arch="gpt2", layers=3), tmp_path / "m",
                        "mean_response", 2, 0.7)
    items = chat_items(rm)
    ref = [reference_score(rm, e) for e in items]
    scorer = Scorer(rm, padding_side="right" if layout == "padding_free" else layout,
                    padding_free=layout == "padding_free", prefix_cache_bytes=64 << 20)
    got = [s.reward for b in (items[:1], items[1:5], items[5:6], items[6:]) for s in scorer.score(b)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    assert scorer.kv is not None and scorer.kv.stats.stores == 2 and scorer.kv.stats.hits >= 6
