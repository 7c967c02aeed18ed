"""Parity of the batched scorer with a plain single-item forward, for Llama (GQA, RoPE) and GPT-2 tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import Scorer, pad_batch, reference_score, reward_indices

ITEMS = [
    ScoreItem(prompt="What is 2+2?", response="4"),
    ScoreItem(prompt="Name a European capital and explain why it matters. " * 3, response="Paris, because of history."),
    ScoreItem(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"}]),
    ScoreItem(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 * 8?"},
                        {"role": "assistant", "content": "56"}]),
    ScoreItem(text="The quick brown fox jumps over the lazy dog."),
    ScoreItem(text="x"),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_single_forward(arch: str, side: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir)
    fmt = Formatter(rm.tokenizer, max_length=256)
    encs = [fmt.encode(it, i) for i, it in enumerate(ITEMS)]
    assert len({e.num_tokens for e in encs}) > 3  # really mixed lengths
    got = [s.reward for s in Scorer(rm, padding_side=side).score_batch(encs)]
    want = [reference_score(rm, e) for e in encs]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-4)


def test_chat_vs_plain_is_the_same_text(tiny_llama_dir: Path) -> None:
    """prompt/response goes through the chat template, so it scores like the equivalent messages item."""
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=256)
    a = fmt.encode(ScoreItem(prompt="hi", response="yo"))
    b = fmt.encode(ScoreItem(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    assert a.input_ids == b.input_ids and a.response == "yo" == b.response
    s = Scorer(rm).score_batch([a, b])
    assert s[0].reward == pytest.approx(s[1].reward, rel=1e-5, abs=1e-6)  # same ids; rows differ only by GEMM rounding


def test_reward_index_rules() -> None:
    ids = torch.tensor([[5, 6, 9, 0, 0], [0, 0, 5, 6, 9], [5, 9, 9, 0, 0]])  # pad = 9: row 2 ends with eos==pad
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert reward_indices(ids, mask, 9, "transformers").tolist() == [1, 3, 0]
    assert reward_indices(ids, mask, 9, "last_attended").tolist() == [2, 4, 2]


def test_position_ids_ignore_left_padding(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=64)
    encs = [fmt.encode(ScoreItem(text="a b c d e f")), fmt.encode(ScoreItem(text="a"))]
    _, mask, pos = pad_batch(encs, rm.pad_token_id, "left", torch.device("cpu"))
    row = int(mask[1].sum())
    assert pos[1, -row:].tolist() == list(range(row)) and pos[0, 0].item() == 0


def test_hidden_returned_matches_head(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=64)
    s = Scorer(rm).score_batch([fmt.encode(ScoreItem(text="hello world"))], return_hidden=True)[0]
    assert s.hidden is not None and s.hidden.shape == (rm.hidden_size,)
    assert float(rm.head(s.hidden)) == pytest.approx(s.raw_reward, rel=1e-6, abs=1e-6)
