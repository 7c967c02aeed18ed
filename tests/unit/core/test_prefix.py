"""Shared-prefix scoring: group detection, and exact parity with the plain path (Llama GQA/RoPE and GPT-2)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem
from rewardkit.core.forward import reward_index, reward_position
from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.core.prefix import PrefixGroup, find_prefix_groups, probe_support
from rewardkit.core.scoring import Scorer, reference_score

ATOL, RTOL = 1e-5, 1e-4


def enc_ids(ids: Sequence[int], truncated: bool = False) -> EncodedItem:
    """An encoded item straight from token ids (for edge cases the formatter cannot produce on demand)."""
    return EncodedItem(input_ids=tuple(ids), offsets=tuple((0, 0) for _ in ids), text="", response_start=0,
                       response_end=0, truncated=truncated, original_length=len(ids))


# -- group detection -----------------------------------------------------------------------------------------------

def test_groups_basic_and_min_prefix() -> None:
    a, b, c = [1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [7, 8]
    assert find_prefix_groups([a, c, b], min_prefix=4) == [PrefixGroup((0, 2), 4)]
    assert find_prefix_groups([a, c, b], min_prefix=5) == []  # shared prefix too short
    assert find_prefix_groups([a], min_prefix=1) == []  # a group needs two items
    assert find_prefix_groups([a, a, a], min_prefix=2) == [PrefixGroup((0, 1, 2), 5)]  # duplicates: whole item
    assert find_prefix_groups([[1, 2, 3], [1, 2, 3, 4, 5]], min_prefix=3) == [PrefixGroup((0, 1), 3)]  # item = prefix
    with pytest.raises(ValueError, match="min_prefix"):
        find_prefix_groups([a, b], min_prefix=0)


def test_groups_prefer_long_prompts_over_a_shared_system_prompt() -> None:
    """Two GRPO groups behind one 20-token system prompt: two groups with their long prompts, not one of 20."""
    system = list(range(100, 120))
    q1, q2 = system + list(range(200, 260)), system + list(range(300, 340))
    seqs = [q1 + [1, k] for k in range(4)] + [q2 + [2, k, k] for k in range(3)]
    random.Random(0).shuffle(seqs)
    groups = find_prefix_groups(seqs, min_prefix=16)
    assert sorted(g.prefix_len for g in groups) == [len(q2) + 1, len(q1) + 1]
    assert sorted(len(g.indices) for g in groups) == [3, 4]
    for g in groups:
        assert all(seqs[i][: g.prefix_len] == seqs[g.indices[0]][: g.prefix_len] for i in g.indices)


def test_min_fraction_skips_a_short_shared_system_prompt() -> None:
    """K=1 items behind one 20-token system prompt, 100 tokens each: sharing 20% is below a 25% floor."""
    system = list(range(100, 120))
    seqs = [system + [1000 + i] * 80 for i in range(6)]
    assert find_prefix_groups(seqs, min_prefix=16) == [PrefixGroup(tuple(range(6)), 20)]
    assert find_prefix_groups(seqs, min_prefix=16, min_fraction=0.25) == []
    grpo = [system + [7] * 60 + [k] * 20 for k in range(4)]  # 80 of 100 shared: kept
    assert find_prefix_groups(seqs + grpo, min_prefix=16, min_fraction=0.25) == [PrefixGroup((6, 7, 8, 9), 80)]


def test_groups_are_optimal_on_small_random_cases() -> None:
    """The DP's saving equals brute force over all partitions of the sorted order (n <= 7)."""
    rng = random.Random(1)
    for _ in range(40):
        n = rng.randint(2, 7)
        seqs = [[rng.choice([1, 2]) for _ in range(rng.randint(1, 6))] for _ in range(n)]
        got = sum(g.saved_tokens for g in find_prefix_groups(seqs, min_prefix=1))
        order = sorted(range(n), key=lambda i: tuple(seqs[i]))

        def lcp(a: Sequence[int], b: Sequence[int]) -> int:
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            return k

        best = 0
        for cuts in range(1 << (n - 1)):  # every partition of the order into runs
            total, start = 0, 0
            for k in range(n):
                if k == n - 1 or cuts >> k & 1:
                    run = [seqs[i] for i in order[start:k + 1]]
                    p = min(lcp(run[0], s) for s in run) if len(run) > 1 else 0
                    total += (len(run) - 1) * p
                    start = k + 1
            best = max(best, total)
        assert got == best, (seqs, got, best)


def test_reward_index_rules() -> None:
    assert reward_index([5, 6, 9, 9], 9, "transformers") == 1
    assert reward_index([9, 9], 9, "transformers") == 0
    assert reward_index([5, 6, 9, 9], 9, "last_attended") == 3
    rng = random.Random(5)
    for _ in range(200):  # the plain-Python twin agrees with the tensor rule
        ids = [rng.choice([5, 6, 9]) for _ in range(rng.randint(1, 6))]
        for rule in ("transformers", "last_attended"):
            assert reward_position(ids, 9, rule) == reward_index(ids, 9, rule), (ids, rule)


# -- exactness -----------------------------------------------------------------------------------------------------

PROMPT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? Paris, Berlin, Madrid, "
          "Rome, Lisbon, Vienna and Warsaw are European capitals. Please answer in exactly three words.")
COMPLETIONS = ["Paris.", "The capital of France is Paris, I hope this helps! Great question.",
               "Twelve plus thirty is forty-two. 12 + 30 = 42. 7 * 8 = 56. 100 - 1 = 99. " * 3, "x", "",
               "- item one\n- item two\n**bold** text"]


def grpo_items(rm: RewardModel, max_length: int = 512) -> list[EncodedItem]:
    """Two GRPO groups (K=6 and K=3, completions from 0 to ~100 tokens), a group of one, and id-level edge cases."""
    fmt = Formatter(rm.tokenizer, max_length=max_length)
    items = [fmt.encode(ScoreItem(prompt=PROMPT, response=c)) for c in COMPLETIONS]
    items += [fmt.encode(ScoreItem(prompt="Convert 3 kilometres to metres. " * 3, response=c)) for c in COMPLETIONS[:3]]
    items.append(fmt.encode(ScoreItem(prompt="hi", response="Hello there!")))  # alone
    base = list(items[0].input_ids[:30])
    pad = rm.pad_token_id
    items += [
        enc_ids(base),  # an item that is exactly the shared prefix of the next ones
        enc_ids(base + [5, 6, 7]),
        enc_ids(base + [5, pad, pad]),  # ends with pad ids (eos == pad): reward read before them
        enc_ids(base + [pad, pad]),  # completion only pad ids: reward read inside the prefix
        enc_ids(base[:-1] + [pad]),  # shares 29 tokens, ends with pad
    ]
    return items


def plain_and_reference(rm: RewardModel, items: list[EncodedItem], side: str) -> tuple[list[float], list[float]]:
    plain = [s.reward for s in Scorer(rm, padding_side=side, prefix_sharing=False).score_batch(items)]
    return plain, [reference_score(rm, e) for e in items]


@pytest.mark.parametrize("mode", ["packed", "batched"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_equals_plain(mode: str, arch: str, side: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir)
    items = grpo_items(rm)
    order = list(range(len(items)))
    random.Random(2).shuffle(order)  # group members arrive interleaved, as from separate requests
    items = [items[i] for i in order]
    scorer = Scorer(rm, padding_side=side)
    assert scorer.prefix_sharing and scorer.prefix.mode == "packed"  # on by default, packed by default
    scorer.prefix.mode = mode
    got = scorer.score_batch(items, return_hidden=True)
    plain, ref = plain_and_reference(rm, items, side)
    torch.testing.assert_close(torch.tensor([s.reward for s in got]), torch.tensor(plain), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.tensor([s.reward for s in got]), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    st = scorer.prefix.stats
    assert st.groups >= 3 and st.items_shared >= 14  # both GRPO groups and the id-level group really shared
    assert st.prefix_tokens_saved > 0 and st.tokens_computed < st.tokens_total
    hidden_plain = Scorer(rm, padding_side=side, prefix_sharing=False).score_batch(items, return_hidden=True)
    for a, b in zip(got, hidden_plain, strict=True):
        assert a.hidden is not None and b.hidden is not None
        torch.testing.assert_close(a.hidden, b.hidden, atol=ATOL, rtol=RTOL)
        assert a.num_tokens == b.num_tokens and a.truncated == b.truncated


@pytest.mark.parametrize("mode", ["packed", "batched"])
def test_truncated_items_and_small_chunks(mode: str, tiny_llama_dir: Path) -> None:
    """Left-truncated items (prompt cut) and a tiny KV budget that splits each group into several chunks."""
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=48)
    long_prompt = PROMPT * 2
    items = [fmt.encode(ScoreItem(prompt=long_prompt, response=c)) for c in COMPLETIONS]
    assert sum(e.truncated for e in items) >= 3
    # equal-length tails that differ at the end: truncated by the same amount, so they still share a prefix
    items += [fmt.encode(ScoreItem(prompt=long_prompt, response=f"answer {d}")) for d in "0123"]
    scorer = Scorer(rm)
    scorer.prefix.mode = mode
    scorer.prefix.max_kv_tokens = 1 if mode == "packed" else 60  # one completion per chunk
    got = [s.reward for s in scorer.score_batch(items)]
    _, ref = plain_and_reference(rm, items, "right")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    st = scorer.prefix.stats
    assert st.groups >= 1
    assert st.forwards >= 2 * st.groups  # several chunks per group
    assert all(s.truncated == e.truncated for s, e in zip(scorer.score_batch(items), items, strict=True))


def test_last_attended_rule(tiny_gpt2_dir: Path) -> None:
    rm = load_reward_model(tiny_gpt2_dir, reward_token_rule="last_attended")
    items = grpo_items(rm)
    got = [s.reward for s in Scorer(rm).score_batch(items)]
    plain, _ = plain_and_reference(rm, items, "right")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), atol=ATOL, rtol=RTOL)


def test_groups_of_one_only_take_the_plain_path(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=256)
    items = [fmt.encode(ScoreItem(prompt=p, response="ok")) for p in ("hi", "What is 2+2?", PROMPT)]
    scorer = Scorer(rm)
    assert scorer.score_shared(items) is None  # nothing worth sharing: caller runs the plain path
    got = [s.reward for s in scorer.score_batch(items)]
    _, ref = plain_and_reference(rm, items, "right")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    assert scorer.prefix.stats.groups == 0


def test_unsupported_model_falls_back_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sliding-window model (its cache is not a full-attention DynamicCache) is scored on the plain path."""
    from transformers import MistralConfig, MistralForSequenceClassification

    from rewardkit.core.testing import make_tokenizer

    tok = make_tokenizer()
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, num_labels=1,
                        pad_token_id=tok.pad_token_id, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = MistralForSequenceClassification(cfg)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rm = load_reward_model(tmp_path / "m")
    ok, why = probe_support(rm)
    assert not ok and "DynamicCache" in why
    items = grpo_items(rm)
    scorer = Scorer(rm)
    with caplog.at_level(logging.WARNING, logger="rewardkit.core.prefix"):
        got = [s.reward for s in scorer.score_batch(items)]
        scorer.score_batch(items)
    assert sum("prefix sharing disabled" in r.getMessage() for r in caplog.records) == 1
    assert scorer.prefix.stats.groups == 0 and scorer.prefix.stats.fallbacks == 2
    plain, _ = plain_and_reference(rm, items, "right")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), atol=ATOL, rtol=RTOL)


def test_probe_accepts_llama_and_gpt2(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    for d in (tiny_llama_dir, tiny_gpt2_dir):
        ok, why = probe_support(load_reward_model(d))
        assert ok, why


@pytest.mark.parametrize("max_padding", [0.0, 1.0])
def test_padding_cap_splits_completion_chunks(max_padding: float, tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=512)
    items = [fmt.encode(ScoreItem(prompt=PROMPT, response=c)) for c in COMPLETIONS[:4]]  # 4 distinct lengths
    scorer = Scorer(rm)
    scorer.prefix.mode = "batched"
    scorer.prefix.max_padding = max_padding
    got = [s.reward for s in scorer.score_batch(items)]
    _, ref = plain_and_reference(rm, items, "right")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    # one prefix forward + one chunk per distinct length (no padding allowed) or a single chunk (any padding)
    assert scorer.prefix.stats.forwards == (1 + 4 if max_padding == 0.0 else 1 + 1)


def test_score_unpadded_groups_and_singles(tiny_gpt2_dir: Path) -> None:
    rm = load_reward_model(tiny_gpt2_dir)
    items = grpo_items(rm)
    scorer = Scorer(rm)
    got = scorer.score_unpadded(items, return_hidden=True)
    _, ref = plain_and_reference(rm, items, "right")
    torch.testing.assert_close(torch.tensor([s.reward for s in got]), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    assert all(s.hidden is not None for s in got)
    assert scorer.prefix.stats.groups >= 3
    off = Scorer(rm, prefix_sharing=False)
    got_off = [s.reward for s in off.score_unpadded(items)]
    torch.testing.assert_close(torch.tensor(got_off), torch.tensor(ref), atol=ATOL, rtol=RTOL)
    assert off.prefix.stats.groups == 0


def test_prefix_key_is_the_prompt(tiny_llama_dir: Path) -> None:
    from rewardkit.core.prefix import prefix_key

    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=512)
    a, b = (fmt.encode(ScoreItem(prompt=PROMPT, response=c)) for c in ("Paris.", "Berlin is not it."))
    other = fmt.encode(ScoreItem(prompt=PROMPT + " Why?", response="Paris."))
    assert prefix_key(a) is not None and prefix_key(a) == prefix_key(b) != prefix_key(other)
    assert prefix_key(fmt.encode(ScoreItem(prompt="hi", response="Paris.")), min_prefix=64) is None  # short prompt
