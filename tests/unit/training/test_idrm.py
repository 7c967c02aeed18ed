"""Id-RM: character-offset mapping between the MiniLM WordPiece and a byte-level BPE tokenizer, teacher distributions,
the attention KL and its gradient into the student's q/k projections, and an end-to-end run on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.testing import make_tokenizer
from rewardkit.training.idrm import (
    IdRMConfig,
    Teacher,
    align_layer_indices,
    attention_kl,
    idrm_step_loss,
    minilm_dir,
    project_char_mass,
    student_targets,
    teacher_char_mass,
    token_mass_to_chars,
    train_idrm,
)
from rewardkit.training.loop import RewardForward, setup_trainable

TEXT = "The capital of France is Paris, not Berlin."


@pytest.fixture(scope="module")
def wordpiece():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, wordpiece) -> Path:  # type: ignore[no-untyped-def]
    """A tiny random BERT with the real MiniLM WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(out)
    wordpiece.save_pretrained(out)
    return out


def _offsets(tok, text: str) -> tuple[list[str], list[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return tok.convert_ids_to_tokens(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def test_wordpiece_to_bpe_mass_lands_on_the_same_characters(wordpiece) -> None:  # type: ignore[no-untyped-def]
    wp_tokens, wp_off = _offsets(wordpiece, TEXT)
    bpe = make_tokenizer()
    bpe_tokens, bpe_off = _offsets(bpe, TEXT)
    assert wp_tokens != bpe_tokens  # two genuinely different segmentations
    paris = wp_tokens.index("paris")  # uncased WordPiece; offsets still point into the original text
    mass = np.zeros(len(wp_tokens))
    mass[paris] = 1.0
    chars = token_mass_to_chars(mass, wp_off, len(TEXT))
    assert chars.sum() == pytest.approx(1.0)
    s, e = TEXT.index("Paris"), TEXT.index("Paris") + 5
    assert chars[s:e].sum() == pytest.approx(1.0)
    dist = project_char_mass(chars, bpe_off)
    assert dist.sum() == pytest.approx(1.0)
    hit = [i for i, (a, b) in enumerate(bpe_off) if a < e and b > s]
    assert dist[hit].sum() == pytest.approx(1.0)  # every bit of mass sits on BPE tokens covering "Paris"
    miss = [i for i in range(len(bpe_off)) if i not in hit]
    assert np.all(dist[miss] == 0)


def test_uniform_mass_round_trips_proportional_to_characters(wordpiece) -> None:  # type: ignore[no-untyped-def]
    _, wp_off = _offsets(wordpiece, TEXT)
    chars = token_mass_to_chars(np.full(len(wp_off), 1.0 / len(wp_off)), wp_off, len(TEXT))
    bpe_off = _offsets(make_tokenizer(), TEXT)[1]
    dist = project_char_mass(chars, bpe_off)
    assert dist.sum() == pytest.approx(1.0)
    # a token that covers no teacher-covered character (a lone space) gets nothing
    assert all(dist[i] == 0 for i, (a, b) in enumerate(bpe_off) if TEXT[a:b].strip() == "")


def test_overlapping_student_tokens_split_a_character() -> None:
    # byte-level BPE can give two tokens the same multi-byte character: its mass is split, the total stays 1
    dist = project_char_mass(np.array([0.5, 0.5]), [(0, 1), (0, 1), (1, 2)])
    assert dist.tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert project_char_mass(np.zeros(3), [(0, 3)]).tolist() == [0.0]


def test_student_targets_on_a_formatted_chat_item(wordpiece) -> None:  # type: ignore[no-untyped-def]
    bpe = make_tokenizer()
    item = Formatter(bpe).encode(ScoreItem(prompt="What is the capital of France?", response=TEXT))
    assert item.response == TEXT and item.response_start > 0
    wp_tokens, wp_off = _offsets(wordpiece, TEXT)
    mass = np.zeros(len(wp_tokens))
    mass[wp_tokens.index("berlin")] = 1.0
    keep, dist = student_targets(item, token_mass_to_chars(mass, wp_off, len(TEXT)))
    assert dist.sum() == pytest.approx(1.0)
    top = keep[int(dist.argmax())]
    s, e = item.offsets[top]
    assert "Berlin".startswith(item.text[s:e].strip()) or item.text[s:e].strip() in "Berlin"
    with pytest.raises(ValueError, match="characters"):
        student_targets(item, np.zeros(3))


def test_teacher_distribution_includes_cross_response_attention(tiny_teacher_dir: Path) -> None:
    teacher = Teacher(tiny_teacher_dir)
    a, b = "Paris is the capital.", "Berlin is the capital of France, I think."
    ids, types, offs, seg = teacher.build("What is the capital of France?", a, b)
    assert len(ids) == len(types) == len(offs) == len(seg)
    _, att = teacher([(ids, types, offs, seg)], attentions=True)
    assert att is not None
    ma, mb = teacher_char_mass(att[0], seg, offs, len(a), len(b))
    assert ma.sum() == pytest.approx(1.0) and mb.sum() == pytest.approx(1.0)
    # the cross term matters: a uniform [CLS] row would give a different distribution if B's rows were ignored
    only_cls = att[0].clone()
    seg_t = torch.tensor(seg)
    only_cls[seg_t == 2] = 0.0  # B's queries attend nowhere
    ma2, _ = teacher_char_mass(only_cls, seg, offs, len(a), len(b))
    assert not np.allclose(ma, ma2)


def test_teacher_truncation_keeps_response_ends(tiny_teacher_dir: Path) -> None:
    teacher = Teacher(tiny_teacher_dir, max_length=40)
    long_a = " ".join(["filler"] * 60) + " answer"
    ids, _, offs, seg = teacher.build("prompt " * 30, long_a, "short reply")
    assert len(ids) <= 40
    a_off = [o for o, s in zip(offs, seg, strict=True) if s == 1]
    assert a_off[-1][1] == len(long_a)  # the end of A survived


def test_attention_kl_zero_when_matching_and_positive_otherwise() -> None:
    rows = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.1, 0.6, 0.3, 0.0]])
    tgt = [([1, 2], np.array([0.4, 0.6])), ([1, 2], np.array([2 / 3, 1 / 3]))]
    kl = attention_kl(rows, tgt)
    # item 0: q = (0.4, 0.6) equals p -> 0; item 1: q = (2/3, 1/3) equals p -> 0
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    kl2 = attention_kl(rows, [([1, 2], np.array([0.9, 0.1])), ([], np.zeros(0))])
    expected = 0.9 * np.log(0.9 / 0.4) + 0.1 * np.log(0.1 / 0.6)
    assert float(kl2) == pytest.approx(expected, rel=1e-5)  # the empty item is skipped, not averaged in


def test_kl_gradient_reaches_q_and_k_of_the_last_k_layers(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)  # 2 layers, abc_sdpa attention
    cfg = IdRMConfig(model=str(tiny_llama_dir), train_file="x", output_dir="y", lora_target_modules="q_proj,k_proj")
    layers = align_layer_indices(rm, 1)
    assert layers == [1]
    setup_trainable(cfg, rm, layers)
    fmt = Formatter(rm.tokenizer, max_length=64)
    items = [fmt.encode(ScoreItem(prompt="What is 2 + 2?", response=r)) for r in ("2 + 2 = 4.", "It is 5, I think.")]
    targets = []
    for it in items:  # all teacher mass on the first response token
        keep = it.response_token_indices()
        d = np.zeros(len(keep))
        d[0] = 1.0
        targets.append((keep, d))
    fwd = RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule)
    lora = {n: p for n, p in rm.model.named_parameters() if "lora_" in n}
    assert lora and all(".layers.1." in n for n in lora)  # only the last K layers carry adapters
    opt = torch.optim.SGD(lora.values(), lr=0.1)
    before = {n: p.detach().clone() for n, p in lora.items()}
    _, _, kl, _ = idrm_step_loss(fwd, rm, items, targets, layers, eta=1.0)
    kl.backward()  # the KL alone: its gradient must reach the attention projections
    for proj in ("q_proj", "k_proj"):
        grads = [p.grad for n, p in lora.items() if proj in n and "lora_B" in n]
        assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads), proj
    opt.step()
    changed = {n for n, p in lora.items() if not torch.equal(p, before[n])}
    assert any("q_proj" in n for n in changed) and any("k_proj" in n for n in changed)
    # and a step lowers the KL
    opt.zero_grad()
    _, _, kl_after, _ = idrm_step_loss(fwd, rm, items, targets, layers, eta=1.0)
    assert float(kl_after.detach()) < float(kl.detach())


def _rows(n: int = 12) -> list[dict[str, object]]:
    return [{"prompt": f"What is {3 + i} + {11 + i}?", "chosen": f"{3 + i} + {11 + i} = {14 + 2 * i}.",
             "rejected": f"{3 + i} + {11 + i} = {15 + 2 * i}. I hope this helps!"} for i in range(n)]


def test_train_idrm_end_to_end_checkpoint_and_teacher_cache(tiny_llama_dir: Path, tiny_teacher_dir: Path,
                                                            tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    base = dict(model=str(tiny_llama_dir), train_file=str(data), device="cpu", num_epochs=2, batch_size=4,
                learning_rate=1e-2, logging_steps=1, disable_tqdm=True, max_length=64, seed=1, eta=1.0,
                align_layers=1, teacher_model=str(tiny_teacher_dir), teacher_epochs=1, teacher_batch_size=8,
                teacher_cache_dir=str(tmp_path / "cache"))
    res = train_idrm(IdRMConfig(output_dir=str(tmp_path / "a"), **base), command="test")  # type: ignore[arg-type]
    assert res.metrics["teacher"]["cache_hit"] is False and res.metrics["teacher"]["teacher_finetuned"] is True
    assert res.metrics["train_kl_last"] > 0 and res.steps == 6
    assert list((tmp_path / "cache").glob("teacher-*.safetensors"))
    loaded = load_reward_model(tmp_path / "a")  # adapter merged at load: the server's loader, unchanged
    assert loaded.meta.provenance["trainer"] == "idrm" and loaded.meta.provenance["align_layers"] == [1]
    fmt = Formatter(loaded.tokenizer, max_length=64)
    from rewardkit.core.scoring import Scorer

    item = fmt.encode(ScoreItem(prompt="What is 3 + 11?", response="3 + 11 = 14."))
    trained = Scorer(res.rm).score_batch([item])[0].raw_reward
    assert Scorer(loaded).score_batch([item])[0].raw_reward == pytest.approx(trained, abs=1e-5)
    res2 = train_idrm(IdRMConfig(output_dir=str(tmp_path / "b"), **base), command="test")  # type: ignore[arg-type]
    assert res2.metrics["teacher"]["cache_hit"] is True
    assert res2.metrics["train_kl_last"] == pytest.approx(res.metrics["train_kl_last"], rel=1e-4)


def test_train_idrm_full_mode_and_lora_on_every_layer(tiny_llama_dir: Path, tiny_teacher_dir: Path,
                                                      tmp_path: Path) -> None:
    """Id-RM through the shared loop in its two other placements: every weight (full), and LoRA on all layers."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    base = dict(model=str(tiny_llama_dir), train_file=str(data), device="cpu", num_epochs=1, batch_size=4,
                learning_rate=1e-3, disable_tqdm=True, max_length=64, seed=1, eta=1.0, align_layers=1,
                teacher_model=str(tiny_teacher_dir), teacher_epochs=0, teacher_cache_dir=str(tmp_path / "cache"))
    before = load_reward_model(tiny_llama_dir)
    full = train_idrm(IdRMConfig(output_dir=str(tmp_path / "f"), mode="full", **base))  # type: ignore[arg-type]
    assert (tmp_path / "f" / "backbone" / "config.json").is_file()
    moved = [n for (n, p), q in zip(full.rm.model.named_parameters(), before.model.parameters(), strict=True)
             if not torch.equal(p, q)]
    assert any(".layers.0." in n for n in moved)  # full mode trains below the aligned layer too
    loaded = load_reward_model(tmp_path / "f")
    item = Formatter(loaded.tokenizer, max_length=64).encode(ScoreItem(prompt="What is 3 + 11?", response="14."))
    from rewardkit.core.scoring import Scorer

    assert Scorer(loaded).score_batch([item])[0].raw_reward == pytest.approx(
        Scorer(full.rm).score_batch([item])[0].raw_reward, abs=1e-5)
    lora = train_idrm(IdRMConfig(output_dir=str(tmp_path / "l"), lora_layers="all", lora_r=2,  # type: ignore[arg-type]
                                 **base))
    assert lora.metrics["lora_layers"] == "all"
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "l" / "adapter" / "adapter_model.safetensors"))
    assert any(".layers.0." in k for k in keys) and any(".layers.1." in k for k in keys)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="frozen"):
        IdRMConfig(train_file="x", output_dir="y", mode="frozen").validate()
    with pytest.raises(ValueError, match="eta"):
        IdRMConfig(train_file="x", output_dir="y", eta=-1).validate()
    with pytest.raises(ValueError, match="align_layers"):
        IdRMConfig(train_file="x", output_dir="y", align_layers=0).validate()


def test_teacher_difference_head_learns_which_response_wins_in_both_orders(tiny_teacher_dir: Path) -> None:
    """The teacher's pairwise head reads mean(A) - mean(B): a toy preference (the response with "correct" wins)
    is learned in a few steps, in both orders, and swapping A and B flips the logit's sign."""
    from rewardkit.training.idrm import finetune_teacher

    torch.manual_seed(0)
    teacher = Teacher(tiny_teacher_dir, max_length=64)
    good, bad = "the answer is correct", "the answer is wrong"
    ex = []
    for i in range(16):
        p = f"question {i}"
        ex.append((teacher.build(p, good, bad), 1.0, i, 0))
        ex.append((teacher.build(p, bad, good), 0.0, i, 1))
    cfg = IdRMConfig(train_file="x", output_dir="y", teacher_epochs=8, teacher_batch_size=8, teacher_lr=1e-3)
    stats = finetune_teacher(teacher, ex, cfg)
    assert stats["teacher_accuracy"] == 1.0 and stats["teacher_loss"] < 0.5
    with torch.no_grad():
        logits, _ = teacher([e[0] for e in ex])
    assert (logits[0::2] > 0).all() and (logits[1::2] < 0).all()
